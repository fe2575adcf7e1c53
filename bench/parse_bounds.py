"""How fast a recipe or family description with a YAML alias bomb is refused,
against loading the plain one: a benchmark, not a test (tests/test_bounded_parsing.py
keeps the refusal itself, under a hang guard of a minute; it used to assert
one second).

    python bench/parse_bounds.py [--repeat 200]

In one process, alternately: load_recipe of recipes/tiny.yaml (the baseline)
and of the same recipe with a 12-line "billion laughs" description (9**9
strings once expanded), then load_description of llama.yaml and of it with
the bomb under `legacy_names`. Prints medians, the ratios to the baselines,
and the refusals against the former 1 s limit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_bounded_parsing import RECIPE_HEAD, billion_laughs  # noqa: E402

from layersplice.architectures import DESCRIPTION_DIR, load_description  # noqa: E402
from layersplice.errors import LayerspliceError  # noqa: E402
from layersplice.planning.recipe import load_recipe  # noqa: E402

LIMIT_S = 1.0


def seconds(load, path: Path) -> float:
    start = time.perf_counter()
    try:
        load(path)
    except LayerspliceError:
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        bomb_recipe, bomb_description = Path(work) / "bomb.yaml", Path(work) / "bomb-arch.yaml"
        bomb_recipe.write_text(billion_laughs(RECIPE_HEAD, "description"))
        llama = DESCRIPTION_DIR / "llama.yaml"
        bomb_description.write_text(billion_laughs(llama.read_text(), "legacy_names"))
        cases = {
            "recipe": (load_recipe, ROOT / "recipes" / "tiny.yaml", bomb_recipe),
            "description": (load_description, llama, bomb_description),
        }
        for name, (load, plain, bomb) in cases.items():
            times: dict[str, list[float]] = {"plain": [], "bomb": []}
            for _ in range(args.repeat):
                times["plain"].append(seconds(load, plain))
                times["bomb"].append(seconds(load, bomb))
            plain_s, bomb_s = statistics.median(times["plain"]), statistics.median(times["bomb"])
            print(f"{name}: plain {plain_s * 1e3:.2f} ms, alias bomb refused in {bomb_s * 1e3:.2f} ms "
                  f"(slowest {max(times['bomb']) * 1e3:.2f} ms): {bomb_s / plain_s:.2f}x the plain load, "
                  f"{bomb_s / LIMIT_S:.4f} of the former {LIMIT_S:.0f} s limit")


if __name__ == "__main__":
    main()

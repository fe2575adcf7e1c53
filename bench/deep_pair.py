"""A deeper fixture-like pair for bench/search_orders.py: too many blocks for an exhaustive search.

fixtures/make_tiny_pair.py's recipe (its text, tokenizer, teacher training,
1/2/2 init-student and distillation settings) with a 28-layer teacher instead
of 16: the student keeps 15 layers, 13 two-layer blocks and 2 one-layer
blocks, so the middle sizes have up to C(13, 6) * 4 = 6,864 sets of blocks.
The pair (about 12 MB) is written to OUT (default bench/.cache/deep-pair,
not committed) and reused when it is there.

    python bench/deep_pair.py [--out bench/.cache/deep-pair]     # about 40 minutes on 1 thread
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from fixture_script import make_tiny_pair

TEACHER_LAYERS = 28
DEFAULT_OUT = Path(__file__).resolve().parent / ".cache" / "deep-pair"


def deep_pair(out: Path = DEFAULT_OUT) -> tuple[Path, Path]:
    """(teacher, student) directories, trained now unless OUT holds them already."""
    teacher_dir, student_dir = out / "teacher", out / "student"
    if (student_dir / "model.safetensors").is_file():
        return teacher_dir, student_dir
    recipe = make_tiny_pair()
    recipe.TEACHER = {**recipe.TEACHER, "num_hidden_layers": TEACHER_LAYERS}
    torch.set_num_threads(recipe.THREADS)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_file, documents = recipe.write_text(work)
        teacher_ce = recipe.train_teacher(data_file, recipe.train_tokenizer(documents), work / "teacher")
        val = recipe.distill_student(work / "teacher", recipe.init_student(work / "teacher", work / "init"),
                                     work / "distilled", data_file)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        shutil.copytree(work / "teacher", teacher_dir)
        student_dir.mkdir()
        for name in recipe.MODEL_FILES:
            shutil.copyfile(work / "distilled" / name, student_dir / name)
    print(f"deep pair: teacher held-out CE {teacher_ce:.3f}; student {val[0]:.3f} after init-student, "
          f"{val[-1]:.3f} after distillation; {time.perf_counter() - started:.0f} s", flush=True)
    return teacher_dir, student_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the pair is written (and reused)")
    deep_pair(parser.parse_args().out)


if __name__ == "__main__":
    main()

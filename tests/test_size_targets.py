"""--params picks the size nearest a parameter count, --max-bytes the largest that fits."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from layersplice.cli.main import cli
from layersplice.units import parse_params

ARCH, COPIED = "llama", (0, 2, 4, 5)


def sizes(pair) -> list[dict]:
    args = ["plan", "--teacher", str(pair.teacher_dir), "--student", str(pair.student_dir), "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    unique = {s["layers"]: s for s in json.loads(result.output)["sizes"]}
    return sorted(unique.values(), key=lambda s: s["parameters"])


def chosen(pair, *options: str) -> tuple[dict, str]:
    args = ["plan", "--teacher", str(pair.teacher_dir), "--student", str(pair.student_dir), "--json", *options]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["chosen"], result.stderr


def test_params_picks_the_nearest_size_and_says_which(checkpoints):
    pair = checkpoints(ARCH, COPIED)
    family = sizes(pair)
    for size in family:
        for nudge in (-1, 1):
            pick, said = chosen(pair, "--params", str(size["parameters"] + nudge))
            assert (pick["layers"], pick["parameters"]) == (size["layers"], size["parameters"])
            assert f"{size['layers']} layers" in said and "nearest --params" in said
    # Halfway between two sizes the smaller one wins.
    a, b = family[0], family[1]
    assert chosen(pair, "--params", str((a["parameters"] + b["parameters"]) // 2))[0]["layers"] == a["layers"]


def test_max_bytes_picks_the_largest_size_that_fits(checkpoints):
    pair = checkpoints(ARCH, COPIED)
    family = sizes(pair)
    for smaller, larger in zip(family, family[1:]):
        pick, said = chosen(pair, "--max-bytes", str(larger["bytes"] - 1))
        assert pick["layers"] == smaller["layers"] and "largest within --max-bytes" in said
        assert chosen(pair, "--max-bytes", str(larger["bytes"]))[0]["layers"] == larger["layers"]


def test_build_with_params_writes_the_chosen_size(checkpoints, build, tmp_path):
    pair = checkpoints(ARCH, COPIED)
    middle = sizes(pair)[1]
    out = build(pair, tmp_path / "out", "--params", f"{middle['parameters'] / 1000:.1f}K")
    provenance = json.loads((out / "layersplice.json").read_text())
    assert len(provenance["layers"]) == middle["layers"]
    assert provenance["choice"]["params"] == f"{middle['parameters'] / 1000:.1f}K"


@pytest.mark.parametrize("options, message", [
    (("--max-bytes", "1kB"), "no size fits"),
    (("--params", "lots"), "cannot read parameter count"),
    (("--params", "1M", "--keep", "2"), "exactly one of"),
])
def test_size_target_errors_are_one_line(checkpoints, tmp_path, options, message):
    pair = checkpoints(ARCH, COPIED)
    args = ["build", "--teacher", str(pair.teacher_dir), "--student", str(pair.student_dir),
            "--out", str(tmp_path / "o"), *options]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_parse_params_reads_units():
    assert parse_params("1.5B") == 1_500_000_000
    assert parse_params("350m") == 350_000_000
    assert parse_params("20K") == 20_000
    assert parse_params("1234") == 1234

"""bench/science.py --quick as a smoke test: every comparison runs and lands in
the table and the PNG (2 distill steps, so the numbers themselves mean
nothing; bench/SCIENCE.md holds a full run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from layersplice.evaluation.plot import DPI, FIGURE_INCHES

REPOSITORY = Path(__file__).resolve().parent.parent


def test_science_quick_writes_one_row_per_size_every_comparison_and_the_plot(tmp_path):
    png = tmp_path / "science.png"
    result = subprocess.run([sys.executable, str(REPOSITORY / "bench" / "science.py"), "--quick", "--out", str(png)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    student, teacher = (json.loads((REPOSITORY / "fixtures" / name / "config.json").read_text())["num_hidden_layers"]
                        for name in ("tiny-student", "tiny-teacher"))
    assert [int(row[0].split()[0]) for row in rows] == list(range(student, teacher + 1))
    for row in (rows[0], rows[-1]):  # every order patches nothing at the student and everything at the teacher
        assert len({row[2], row[3], row[4]}) == 1, row
    assert rows[-1][2] == rows[-1][5]  # naive dropping of no layer is the teacher
    assert sum(bool(row[6].strip()) for row in rows) == 2  # two sizes distilled directly
    assert all(row[7].strip() and row[8].strip() for row in rows)  # both ablations at every size
    for claim in ("beats naive dropping", "direct distillation", "without the cosine term", "from a random init"):
        assert claim in result.stdout
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (int(FIGURE_INCHES[0] * DPI), int(FIGURE_INCHES[1] * DPI))

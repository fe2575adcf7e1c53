"""The plain way to write an interpolated model, for bench/build.py to compare with:
load teacher and student with transformers, splice, save_pretrained.

    python bench/transformers_splice.py TEACHER STUDENT LAYERS OUT

Order "last" (METHOD.md §4): the student's first layers up to the cut, then
the teacher's layers from the cut on, with the teacher's final norm and head
and the student's embeddings. Llama-shaped models only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def main(teacher_dir: str, student_dir: str, layers: int, out: str) -> None:
    copied = json.loads((Path(student_dir) / "student_config.json").read_text())["copied_teacher_layers"]
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.bfloat16)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.bfloat16)
    n_teacher = teacher.config.num_hidden_layers
    keep = next(s for s in range(len(copied)) if s + n_teacher - copied[s] == layers)
    student.model.layers = torch.nn.ModuleList([*student.model.layers[:keep], *teacher.model.layers[copied[keep]:]])
    student.model.norm = teacher.model.norm
    student.lm_head = teacher.lm_head
    student.config.num_hidden_layers = len(student.model.layers)
    student.save_pretrained(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])

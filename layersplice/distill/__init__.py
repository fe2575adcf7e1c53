"""Boomerang distillation of a student from its teacher (METHOD.md §3).

data -> teacher forward (no grad) -> student forward -> three loss terms -> step.
`loop.distill` is the whole run; torchrun and FSDP2 wrap it (parallel.py), they
do not fork it.
"""

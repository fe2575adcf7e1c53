"""Typed user errors. The CLI catches them once and prints one line; exit code 2."""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USER = 2


class LayerspliceError(Exception):
    """A problem with the user's input or request: printed as one line, exit code 2."""

    exit_code = EXIT_USER


class CheckpointError(LayerspliceError):
    """A checkpoint cannot be read or is inconsistent."""


class ArchitectureError(LayerspliceError):
    """The model family cannot be described or inferred."""


class NonFiniteError(CheckpointError):
    """A tensor that a command computes from or casts holds NaN or infinity, or would."""


class AlignmentError(LayerspliceError):
    """The teacher/student alignment is missing or does not fit the checkpoints."""


class RecipeError(LayerspliceError):
    """A recipe file is invalid."""


class OutputError(LayerspliceError):
    """The output path cannot be written as asked."""

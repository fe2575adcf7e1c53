"""Recipe files (recipes/*.yaml): a strict schema whose errors name the line at fault."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from layersplice import schema
from layersplice.checkpoint.bounded import YAML_LIMIT, read_bounded
from layersplice.errors import RecipeError
from layersplice.planning.alignment import AlignmentSpec

DEFAULT_OUT = "out/{name}-{layers}L"


@dataclass(frozen=True)
class RecipeAlignment:
    first: int | None = None
    every: int | None = None
    last: int | None = None
    copied_teacher_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        rule = (self.first, self.every, self.last)
        if self.copied_teacher_layers is not None and any(v is not None for v in rule):
            raise ValueError("give either first/every/last or copied_teacher_layers, not both")
        if any(v is None for v in rule) and any(v is not None for v in rule):
            raise ValueError("first, every and last go together: give all three")

    def spec(self, origin: str) -> AlignmentSpec:
        if self.copied_teacher_layers is not None:
            return AlignmentSpec(copied=tuple(self.copied_teacher_layers), origin=origin)
        if self.first is not None:
            return AlignmentSpec(rule=(self.first, self.every, self.last), origin=origin)
        return AlignmentSpec(origin=origin)


@dataclass(frozen=True)
class Recipe:
    """One teacher/student pair and how to export its sizes (unknown keys are errors)."""

    name: str
    teacher: str
    student: str
    teacher_revision: str | None = None
    student_revision: str | None = None
    teacher_id: str | None = None  # the Hub repo a local teacher is a copy of, for the cards
    student_id: str | None = None
    hub_owner: str | None = None  # where the sizes will be uploaded: cards load them as hub_owner/<folder>
    alignment: RecipeAlignment = field(default_factory=RecipeAlignment)
    order: Literal["last", "first", "kl", "search"] = "last"
    calib: str | None = None  # calibration text of order kl or search, relative to the recipe
    out: str = DEFAULT_OUT
    dtype: Literal["F32", "BF16", "F16"] | None = None
    shard_size: str = "5GB"
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError("name must be a plain word usable in a directory name")

    def calib_path(self, base: Path) -> Path | None:
        """The calibration text, relative to the recipe's folder."""
        return None if self.calib is None else (base / self.calib).expanduser()

    def output_path(self, layers: int | str) -> Path:
        return Path(self.out.format(name=self.name, layers=layers))


def load_recipe(path: Path) -> tuple[Recipe, Path]:
    """Parse a recipe; local model paths resolve relative to the recipe's folder."""
    text = read_bounded(path, YAML_LIMIT, "recipe", RecipeError)
    shape = "a recipe is a YAML mapping of keys such as name, teacher, student"
    return schema.load_yaml(Recipe, text, path, RecipeError, "recipe", shape), path.parent


def model_reference(value: str, base: Path) -> str:
    """A local path relative to the recipe if it exists or looks like a path; else a hub id."""
    candidate = (base / value).expanduser()
    if value.startswith((".", "/", "~")) or candidate.is_dir():
        return str(candidate)
    return value

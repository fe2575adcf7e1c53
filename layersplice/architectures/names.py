"""Tensor names across families that share a names_as family.

A splice of two families writes every tensor under the names of the output
family. A layer or head of the other model is first taken apart into canonical
tensors (its names in the names_as family, a fused tensor cut into row ranges)
and then put together under the output family's names (canonical tensors the
output family fuses become one tensor made of several row ranges). Rows of a
row-major tensor are contiguous bytes, so both directions stay byte copies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from layersplice.checkpoint.safetensors_format import TensorInfo
from layersplice.errors import ArchitectureError

# A tensor as the plan writes it: one source range, or the row ranges of a fused tensor.
Parts = tuple[TensorInfo, ...]


@dataclass(frozen=True)
class NameMap:
    """A family's own tensor paths -> canonical paths (several for a fused tensor).

    `spelling` holds one checkpoint's own names by canonical name, so that a
    tensor renamed into that checkpoint's family is named as the checkpoint
    itself names it (GPT-2 with or without 'transformer.', BERT's legacy
    LayerNorm.gamma).
    """

    entries: tuple[tuple[str, tuple[str, ...]], ...] = ()
    legacy: tuple[tuple[str, str], ...] = ()
    spelling: Mapping[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)

    @classmethod
    def of(cls, renames: Mapping[str, str | tuple[str, ...]], legacy: Mapping[str, str] | None = None) -> NameMap:
        entries = [(own, (canon,) if isinstance(canon, str) else tuple(canon)) for own, canon in renames.items()]
        return cls(tuple(sorted(entries, key=lambda e: -len(e[0]))), tuple((legacy or {}).items()))

    def canonical(self, name: str) -> tuple[str, ...]:
        for old, new in self.legacy:
            if name == old or name.endswith("." + old):
                name = name[: len(name) - len(old)] + new
        for own, canon in self.entries:
            rest = _under(name, own)
            if rest is not None:
                return tuple(c + rest for c in canon)
        return (name,)

    def spelled_like(self, names: Iterable[str]) -> NameMap:
        """This map, naming tensors as `names` (one checkpoint's own) do."""
        spelling = {}
        for name in names:
            group = self.canonical(name)
            spelling.update((c, (name, group)) for c in group)
        return replace(self, spelling=spelling)

    def own(self, canonical: str) -> tuple[str, tuple[str, ...]]:
        """The own tensor holding a canonical tensor, and every canonical tensor it holds, in row order."""
        if canonical in self.spelling:
            return self.spelling[canonical]
        for own, canon in self.entries:
            for c in canon:
                rest = _under(canonical, c)
                if rest is not None:
                    return own + rest, tuple(x + rest for x in canon)
        return canonical, (canonical,)


def _under(name: str, path: str) -> str | None:
    """What follows `path` in `name` ('' or '.rest'), or None when name is not under path."""
    if name == path:
        return ""
    if name.startswith(path + "."):
        return name[len(path):]
    return None


def canonical_rows(tensor_sets: Iterable[Mapping[str, TensorInfo]], names: Iterable[NameMap]) -> dict[str, int]:
    """Row counts of canonical tensors that some model stores unfused (needed to cut fused ones).

    A canonical tensor seen with different row counts is left out, so cutting
    a fused tensor around it fails loudly instead of guessing.
    """
    rows: dict[str, int] = {}
    ambiguous: set[str] = set()
    for tensors, name_map in zip(tensor_sets, names):
        for name, info in tensors.items():
            canon = name_map.canonical(name)
            if len(canon) == 1 and info.shape:
                if rows.setdefault(canon[0], info.shape[0]) != info.shape[0]:
                    ambiguous.add(canon[0])
    return {k: v for k, v in rows.items() if k not in ambiguous}


def translate(
    tensors: Mapping[str, TensorInfo], source: NameMap, target: NameMap, rows: Mapping[str, int]
) -> dict[str, Parts]:
    """Tensors named in the source family, renamed (and cut or fused) into the target family's names."""
    canonical: dict[str, TensorInfo] = {}
    for name, info in tensors.items():
        canonical.update(_cut(name, info, source.canonical(name), rows))
    out: dict[str, Parts] = {}
    for name in canonical:
        own, group = target.own(name)
        if own in out:
            continue
        missing = [g for g in group if g not in canonical]
        if missing:
            raise ArchitectureError(f"{own} needs {missing[0]}, which the other model does not have")
        out[own] = tuple(canonical[g] for g in group)
    return out


def _cut(name: str, info: TensorInfo, canon: tuple[str, ...], rows: Mapping[str, int]) -> dict[str, TensorInfo]:
    if len(canon) == 1:
        return {canon[0]: info}
    counts = [rows.get(c) for c in canon]
    unknown = [c for c, n in zip(canon, counts) if n is None]
    total = info.shape[0] if info.shape else 0
    if len(unknown) == 1:
        counts[canon.index(unknown[0])] = total - sum(n for n in counts if n is not None)
    if len(unknown) > 1 or sum(counts) != total or min(counts) <= 0:
        raise ArchitectureError(
            f"cannot cut fused {name} {list(info.shape)} into {', '.join(canon)}: "
            "the other model does not show the size of each part"
        )
    row_bytes = info.nbytes // total
    parts, first = {}, 0
    for c, n in zip(canon, counts):
        parts[c] = TensorInfo(
            f"{info.name}[{first}:{first + n}]", info.file, info.start + first * row_bytes,
            info.start + (first + n) * row_bytes, info.dtype, (n, *info.shape[1:]),
        )
        first += n
    return parts


def parts_shape(parts: Parts) -> tuple[int, ...]:
    """The shape of a tensor written from these row ranges."""
    first = parts[0].shape
    if len(parts) == 1:
        return first
    if any(p.shape[1:] != first[1:] or p.dtype != parts[0].dtype for p in parts):
        listed = ", ".join(f"{p.name} {p.dtype} {list(p.shape)}" for p in parts)
        raise ArchitectureError(f"cannot fuse {listed}: their dtypes or trailing dimensions differ")
    return (sum(p.shape[0] for p in parts), *first[1:])

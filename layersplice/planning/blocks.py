"""Which student blocks to replace by their teacher blocks (METHOD.md §4).

Every function returns the set of patched block indices; block i is student
layer i. Patch order 'last' walks blocks from the end, 'first' from the start.
An order is nested (each size patches the blocks of the size below and more),
except SizeChoices, which --order search makes: one set of blocks per size.
"""

from __future__ import annotations

from dataclasses import dataclass

from layersplice.errors import LayerspliceError
from layersplice.planning.alignment import Alignment

ORDERS = ("last", "first", "kl", "search")
# --order search: sizes with at most this many candidate sets are searched
# exhaustively, the others by a beam this wide. 256 is the most sets any size
# between student and teacher of a 9-block student has (one two-layer block
# and eight one-layer ones), so every 9-block student is searched exhaustively.
SEARCH_BUDGET = 256
BEAM = 4


@dataclass(frozen=True)
class SizeChoices:
    """The blocks patched at each size between student and teacher, chosen size by size (not nested).

    The student's and the teacher's own sizes are the pure student and teacher.
    """

    sizes: tuple[tuple[int, tuple[int, ...]], ...]  # (layers, patched blocks, sorted), fewest layers first


# "last", "first", the blocks themselves in the order they are patched (what
# --order kl chooses and --order-file reads back), or one choice per size.
Order = str | tuple[int, ...] | SizeChoices


def check_choices(alignment: Alignment, choices: SizeChoices) -> SizeChoices:
    """Refuse choices that name a block the student lacks or whose layer count is not their size."""
    ends = (alignment.n_student, alignment.n_teacher)
    for layers, blocks in choices.sizes:
        bad = [b for b in blocks if not 0 <= b < alignment.n_student]
        if bad:
            raise LayerspliceError(
                f"the search choice for {layers} layers names block {bad[0]}, but the student has blocks "
                f"0..{alignment.n_student - 1}; was it made for another student?"
            )
        if size_of(alignment, frozenset(blocks)) != layers or not ends[0] < layers < ends[1]:
            raise LayerspliceError(
                f"the search choice for {layers} layers patches blocks {list(blocks)}, which make a model of "
                f"{size_of(alignment, frozenset(blocks))} layers; was it made for another student?"
            )
    if len({layers for layers, _ in choices.sizes}) != len(choices.sizes):
        raise LayerspliceError("the search choices name one size twice")
    return choices


def describe_order(order: Order) -> str | tuple[int, ...]:
    """The order as plan shows it: its name, the blocks of a recorded order, or 'search'."""
    return "search" if isinstance(order, SizeChoices) else order


def choice_sets(alignment: Alignment, choices: SizeChoices) -> list[frozenset[int]]:
    """The student, each chosen size, the teacher: fewest layers first."""
    middle = [frozenset(blocks) for _, blocks in sorted(choices.sizes)]
    return [frozenset(), *middle, frozenset(range(alignment.n_student))]


def patch_order(alignment: Alignment, order: str | tuple[int, ...]) -> list[int]:
    blocks = list(range(alignment.n_student))
    if isinstance(order, tuple):
        if sorted(order) != blocks:
            raise LayerspliceError(
                f"patch order {list(order)} does not name each of the student's blocks "
                f"0..{alignment.n_student - 1} exactly once"
            )
        return list(order)
    if order == "last":
        return blocks[::-1]
    if order == "first":
        return blocks
    raise LayerspliceError(f"unknown order {order!r}: use one of {', '.join(ORDERS)}")


def size_of(alignment: Alignment, patched: frozenset[int]) -> int:
    """Number of layers of the model with these blocks patched."""
    return alignment.n_student + sum(alignment.block_length(b) - 1 for b in patched)


def by_keep(alignment: Alignment, keep: int, order: Order) -> frozenset[int]:
    """Keep `keep` student blocks; patch the rest, starting at the patched end."""
    if not 0 <= keep <= alignment.n_student:
        raise LayerspliceError(
            f"--keep {keep} is out of range: the student has {alignment.n_student} blocks (0..{alignment.n_student})"
        )
    if isinstance(order, SizeChoices):
        return _one_choice(alignment, order, lambda s: alignment.n_student - len(s) == keep, f"--keep {keep}",
                           lambda s: alignment.n_student - len(s), "blocks kept")
    return frozenset(patch_order(alignment, order)[: alignment.n_student - keep])


def _one_choice(alignment: Alignment, choices: SizeChoices, fits, asked: str, measure, what: str) -> frozenset[int]:
    """The one size of a search whose patched blocks fit; an error naming the alternatives otherwise."""
    sets = choice_sets(alignment, choices)
    found = [s for s in sets if fits(s)]
    if len(found) == 1:
        return found[0]
    if found:
        sizes = ", ".join(str(size_of(alignment, s)) for s in found)
        raise LayerspliceError(f"{asked} fits several sizes of the search ({sizes} layers); choose one with --layers")
    reachable = ", ".join(map(str, sorted({measure(s) for s in sets})))
    raise LayerspliceError(f"{asked} is not a size of the search; its sizes have {what}: {reachable} (see `layersplice plan`)")


def multi_layer_blocks(alignment: Alignment) -> int:
    return sum(1 for b in range(alignment.n_student) if alignment.block_length(b) > 1)


def _multi_in(alignment: Alignment, patched: frozenset[int]) -> int:
    return sum(1 for b in patched if alignment.block_length(b) > 1)


def by_patch(alignment: Alignment, k: int, order: Order) -> frozenset[int]:
    """The reference's count: the longest run, in patch order, holding exactly k multi-layer blocks."""
    if k < 0:
        raise LayerspliceError(f"--patch {k} is out of range: use 0..{multi_layer_blocks(alignment)}")
    if isinstance(order, SizeChoices):
        k = min(k, multi_layer_blocks(alignment))
        return _one_choice(alignment, order, lambda s: _multi_in(alignment, s) == k, f"--patch {k}",
                           lambda s: _multi_in(alignment, s), "multi-layer blocks patched")
    # As in the reference, any k from the number of multi-layer blocks up patches everything.
    patched: list[int] = []
    seen = 0
    for block in patch_order(alignment, order):
        if alignment.block_length(block) > 1:
            if seen == k:
                break
            seen += 1
        patched.append(block)
    return frozenset(patched)


def by_layers(alignment: Alignment, layers: int, order: Order) -> frozenset[int]:
    """The model with `layers` layers along the patch order.

    The pure student and the pure teacher answer their own sizes; in between,
    the answer is the reference's `--patch k` of that size.
    """
    if layers == alignment.n_student:
        return frozenset()
    if layers == alignment.n_teacher:
        return frozenset(range(alignment.n_student))
    if isinstance(order, SizeChoices):
        return _one_choice(alignment, order, lambda s: size_of(alignment, s) == layers, f"--layers {layers}",
                           lambda s: size_of(alignment, s), "layers")
    reachable = []
    for k in range(multi_layer_blocks(alignment) + 1):
        patched = by_patch(alignment, k, order)
        if size_of(alignment, patched) == layers:
            return patched
        reachable.append(size_of(alignment, patched))
    sizes = sorted({alignment.n_student, alignment.n_teacher, *reachable})
    raise LayerspliceError(
        f"--layers {layers} is not reachable in order {order!r}; reachable sizes: "
        f"{', '.join(map(str, sizes))} (see `layersplice plan`)"
    )


def by_blocks(alignment: Alignment, blocks: tuple[int, ...]) -> frozenset[int]:
    bad = [b for b in blocks if not 0 <= b < alignment.n_student]
    if bad:
        raise LayerspliceError(
            f"--blocks names block {bad[0]}, but the student has blocks 0..{alignment.n_student - 1}"
        )
    return frozenset(blocks)


def keep_sequence(alignment: Alignment, order: Order) -> list[tuple[int, frozenset[int]]]:
    """(keep, patched) for every keep from the student down to the teacher (for a search: every size)."""
    if isinstance(order, SizeChoices):
        return [(alignment.n_student - len(s), s) for s in choice_sets(alignment, order)]
    return [(keep, by_keep(alignment, keep, order)) for keep in range(alignment.n_student, -1, -1)]

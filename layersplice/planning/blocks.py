"""Which student blocks to replace by their teacher blocks (METHOD.md §4).

Every function returns the set of patched block indices; block i is student
layer i. Patch order 'last' walks blocks from the end, 'first' from the start.
"""

from __future__ import annotations

from layersplice.errors import LayerspliceError
from layersplice.planning.alignment import Alignment

ORDERS = ("last", "first", "kl")
# "last", "first", or the blocks themselves in the order they are patched
# (what --order kl chooses and --order-file reads back).
Order = str | tuple[int, ...]


def patch_order(alignment: Alignment, order: Order) -> list[int]:
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
    return frozenset(patch_order(alignment, order)[: alignment.n_student - keep])


def multi_layer_blocks(alignment: Alignment) -> int:
    return sum(1 for b in range(alignment.n_student) if alignment.block_length(b) > 1)


def by_patch(alignment: Alignment, k: int, order: Order) -> frozenset[int]:
    """The reference's count: the longest run, in patch order, holding exactly k multi-layer blocks."""
    if k < 0:
        raise LayerspliceError(f"--patch {k} is out of range: use 0..{multi_layer_blocks(alignment)}")
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
    """(keep, patched) for every keep from the student down to the teacher."""
    return [(keep, by_keep(alignment, keep, order)) for keep in range(alignment.n_student, -1, -1)]

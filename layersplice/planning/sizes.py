"""Which sizes of a family to use: all, a list of --keep values, the one nearest a
parameter count, or the largest that fits a byte budget."""

from __future__ import annotations

from dataclasses import dataclass

from layersplice.errors import LayerspliceError
from layersplice.planning.alignment import parse_layer_list
from layersplice.planning.blocks import Order, by_keep, by_layers, keep_sequence, size_of
from layersplice.planning.job import Job
from layersplice.planning.plan import Plan, make_plan
from layersplice.units import format_bytes, format_params, parse_bytes, parse_params


def all_plans(job: Job, order: Order) -> list[tuple[int | None, Plan]]:
    """(keep, plan) for every distinct size along the order, each chosen as --layers chooses it."""
    alignment = job.pair.alignment
    keep_of = {patched: keep for keep, patched in keep_sequence(alignment, order)}
    sizes = sorted({size_of(alignment, patched) for patched in keep_of})
    plans = []
    for layers in sizes:
        patched = by_layers(alignment, layers, order)
        plans.append((keep_of.get(patched), make_plan(job.pair, patched, job.cast)))
    return plans


def family_sizes(job: Job, order: Order, sizes: str) -> list[tuple[int | None, Plan]]:
    """'all': every distinct size, as `build --all` writes them; else '--keep' values like 4,2,0."""
    if sizes.strip() == "all":
        return all_plans(job, order)
    try:
        keeps = parse_layer_list(sizes)
    except LayerspliceError:
        raise LayerspliceError(f"--sizes {sizes!r}: give 'all' or --keep values such as 4,2,0") from None
    if not keeps:
        raise LayerspliceError("--sizes is empty: give 'all' or --keep values such as 4,2,0")
    alignment = job.pair.alignment
    chosen = {by_keep(alignment, keep, order): keep for keep in sorted(set(keeps), reverse=True)}
    return [(keep, make_plan(job.pair, patched, job.cast)) for patched, keep in chosen.items()]


@dataclass(frozen=True)
class Target:
    """The size a --params or --max-bytes request picked, and why."""

    keep: int | None
    plan: Plan
    reason: str
    warning: str | None = None  # the request lies outside what the family holds


def pick_target(job: Job, order: Order, params: str | None, max_bytes: str | None) -> Target:
    """The size nearest --params (the smaller one on a tie) or the largest within --max-bytes."""
    if (params is None) == (max_bytes is None):
        raise LayerspliceError("give one of --params and --max-bytes")
    sizes = all_plans(job, order)
    if params is not None:
        wanted = parse_params(params)
        keep, plan = min(sizes, key=lambda size: (abs(size[1].params - wanted), size[1].params))
        return Target(keep, plan, f"nearest --params {params}", _outside(params, wanted, [p for _, p in sizes]))
    budget = parse_bytes(max_bytes)
    fitting = [size for size in sizes if size[1].nbytes <= budget]
    if not fitting:
        smallest = min(plan.nbytes for _, plan in sizes)
        raise LayerspliceError(
            f"--max-bytes {max_bytes}: no size fits; the smallest is {format_bytes(smallest)} "
            "(a --dtype bf16 cast halves fp32 weights)"
        )
    keep, plan = max(fitting, key=lambda size: size[1].nbytes)
    return Target(keep, plan, f"largest within --max-bytes {max_bytes}")


def _outside(params: str, wanted: int, plans: list[Plan]) -> str | None:
    """Why --params names no size of this family, or None when it lies within the family's range."""
    smallest, largest = min(p.params for p in plans), max(p.params for p in plans)
    if smallest <= wanted <= largest:
        return None
    return (
        f"--params {params} is outside this family, whose sizes hold {format_params(smallest)} to "
        f"{format_params(largest)} parameters; the nearest size is picked, far from what was asked"
    )


def describe_target(target: Target) -> str:
    plan = target.plan
    keep = "" if target.keep is None else f" (--keep {target.keep})"
    return (
        f"{target.reason}: {plan.n_layers} layers{keep}, {format_params(plan.params)} parameters, "
        f"{format_bytes(plan.nbytes)} of weights"
    )

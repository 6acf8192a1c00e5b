"""Reduction schedules of a Vision Mamba model: after which blocks, and how many tokens each step removes.

A schedule is ``{block index: tokens removed after that block}``. It is given explicitly, as ``r`` tokens after
each of a list of blocks, or solved for a fraction of the dense FLOPs to save
([`solve_schedule`][tokred.mamba.schedule.solve_schedule]), the form the MTR paper reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

from tokred.core.errors import BudgetError, InvalidInputError
from tokred.mamba.flops import Convention, count_flops, token_counts

__all__ = ["check_schedule", "default_reduce_after", "solve_schedule"]


def default_reduce_after(depth: int) -> list[int]:
    """Every second block from the second on, stopping two before the end: 1, 3, …, 21 for depth 24.

    The "merge before every even block" pattern of R-MeeTo, which gives the 20 / 30 / 40 % FLOPs cuts of the
    MTR paper at r ≈ 7 / 11 / 14 tokens per step on Vim.
    """
    return list(range(1, depth - 2, 2))


def check_schedule(model: nn.Module, schedule: Mapping[int, int]) -> dict[int, int]:
    """Validate a schedule ``{block index: tokens removed after it}`` for ``model``; returns it sorted.

    Raises:
        InvalidInputError: If a block index is out of range or a count is not a non-negative int.
        BudgetError: If the schedule would leave fewer than two tokens (the class token and one patch).
    """
    if not isinstance(schedule, Mapping):
        raise InvalidInputError(f"schedule must be a mapping {{block index: tokens removed}}; got {schedule!r}")
    depth = model.depth
    clean = {}
    for block, r in schedule.items():
        if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < depth - 1:
            raise InvalidInputError(
                f"schedule block index {block!r} is out of range: reductions happen after blocks 0..{depth - 2} "
                f"of this {depth}-block model (after the last block nothing is left to save)"
            )
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise InvalidInputError(f"schedule entry for block {block} must be a non-negative token count; got {r!r}")
        clean[block] = r
    counts = token_counts(model, schedule=clean)
    remaining = counts[-1] - clean.get(depth - 1, 0)
    if min(counts) < 2 or remaining < 2:
        raise BudgetError(
            f"the schedule removes {sum(clean.values())} of {counts[0]} tokens, leaving fewer than two (the class "
            "token and one patch); lower r or reduce after fewer blocks"
        )
    return dict(sorted(clean.items()))


def solve_schedule(
    model: nn.Module,
    flops_cut: float,
    *,
    after: Iterable[int] | None = None,
    convention: Convention = "one_direction",
    image_size: int | None = None,
) -> dict[int, int]:
    """The schedule that removes the same ``r`` after each of ``after`` and comes closest to a FLOPs cut.

    Args:
        model: A tokred-mamba model.
        flops_cut: Target fraction of the dense FLOPs to save, in ``(0, 1)`` (the MTR paper: 0.2, 0.3, 0.4).
        after: Block indices to reduce after; [`default_reduce_after`][tokred.mamba.schedule.default_reduce_after]
            by default.
        convention: FLOPs convention (see [`count_flops`][tokred.mamba.count_flops]).
        image_size: Input side; the model's own by default.

    Returns:
        ``{block index: r}``; the achieved cut is ``1 - count_flops(..., schedule=s) / count_flops(..., {})``.

    Raises:
        InvalidInputError: If the cut is not a number in ``(0, 1)`` or ``after`` names no valid block.
        BudgetError: If the cut cannot be met without running out of tokens.
    """
    if isinstance(flops_cut, bool) or not isinstance(flops_cut, (int, float)) or not 0.0 < flops_cut < 1.0:
        raise InvalidInputError(f"flops_cut must be a fraction in (0, 1), such as 0.3; got {flops_cut!r}")
    blocks = list(default_reduce_after(model.depth) if after is None else after)
    if not blocks:
        raise InvalidInputError("after must name at least one block")
    check_schedule(model, dict.fromkeys(blocks, 0))  # the blocks themselves must be valid
    dense = count_flops(model, image_size, convention, schedule={})
    best: tuple[float, dict[int, int]] | None = None
    reached = False
    r = 0
    while True:
        r += 1
        candidate = {block: r for block in blocks}
        try:
            schedule = check_schedule(model, candidate)
        except BudgetError:
            break
        cut = 1.0 - count_flops(model, image_size, convention, schedule=schedule) / dense
        if best is None or abs(cut - flops_cut) < abs(best[0] - flops_cut):
            best = (cut, schedule)
        if cut >= flops_cut:
            reached = True
            break
    # Closest wins; running out of tokens first is only acceptable within a point of the target.
    if best is None or (not reached and flops_cut - best[0] > 0.01):
        reachable = 0.0 if best is None else best[0]
        raise BudgetError(
            f"a FLOPs cut of {flops_cut:.0%} cannot be met by removing tokens after blocks {blocks}: at most "
            f"{reachable:.1%} before the tokens run out; reduce after more or earlier blocks"
        )
    return best[1]

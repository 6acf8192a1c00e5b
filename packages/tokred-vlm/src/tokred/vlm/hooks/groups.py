"""Running a reducer on every token group of a call at once, groups of equal size batched together.

Shapes: ``T`` tokens of all groups together, ``C`` channels, ``G`` groups of one size, ``n`` their size.
"""

from __future__ import annotations

import collections

import torch

from tokred.core.errors import ReducerContractError
from tokred.core.reducer import Reducer
from tokred.core.reduction import Reduction

__all__ = ["plan_row", "reduce_groups"]


def reduce_groups(
    reducer: Reducer, tokens: torch.Tensor, group: torch.Tensor, plans: dict[int, Reduction] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the reducer on every group of tokens, batching groups of equal size.

    Args:
        reducer: The reducer; its own budget applies to each group.
        tokens: ``(T, C)`` tokens of all groups.
        group: Long ``(T,)`` group id of each token; ``-1`` marks structural tokens (kept, unreduced).
        plans: If given, filled with the plan of each group (a batch of one, detached), by group id.

    Returns:
        ``(tokens, keep)``: ``(T, C)`` with each kept token replaced by what it carries after merging, and bool
        ``(T,)`` kept tokens.

    Raises:
        ReducerContractError: If the reducer returns a plan that disagrees with its budget or the group.
    """
    out = tokens.clone()
    keep = group < 0
    ids = group[group >= 0]
    if ids.numel() == 0:
        return out, keep
    positions = torch.nonzero(group >= 0).squeeze(1)
    order = torch.argsort(ids, stable=True)
    sorted_ids, sorted_positions = ids[order], positions[order]
    counts = torch.unique_consecutive(sorted_ids, return_counts=True)[1]
    members = torch.split(sorted_positions, counts.tolist())
    by_size: dict[int, list[torch.Tensor]] = collections.defaultdict(list)
    for member in members:
        by_size[member.numel()].append(member)
    assert reducer.budget is not None  # attach() refuses reducers without a budget
    for size, groups in by_size.items():
        index = torch.stack(groups)  # (G, n)
        reduction = reducer(tokens[index])
        expected = reducer.budget.resolve(size)
        kept = reduction.indices
        if (
            kept.dim() != 2
            or kept.shape[0] != index.shape[0]
            or kept.shape[1] != expected
            or reduction.tokens.shape[:2] != kept.shape
            or (kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= size))
            or (kept.shape[1] > 1 and not bool((kept[:, 1:] > kept[:, :-1]).all()))
        ):
            raise ReducerContractError(
                f"reducer {reducer!r} returned {tuple(kept.shape)} kept indices and tokens of shape "
                f"{tuple(reduction.tokens.shape)} for {index.shape[0]} groups of {size} visual tokens; expected "
                f"indices of shape ({index.shape[0]}, {expected}), "
                "ascending and within the group, one token per kept placeholder"
            )
        if plans is not None:
            for row, member in enumerate(groups):
                plans[int(group[member[0]])] = plan_row(reduction, row)
        chosen = index.gather(1, kept)
        out[chosen.reshape(-1)] = reduction.tokens.reshape(-1, tokens.shape[-1]).to(out.dtype)
        keep[chosen.reshape(-1)] = True
    return out, keep


def plan_row(reduction: Reduction, row: int) -> Reduction:
    """Row ``row`` of a batched plan as a detached plan of batch one."""
    part = slice(row, row + 1)
    return Reduction(
        reduction.tokens[part].detach(),
        reduction.indices[part].detach(),
        reduction.sizes[part].detach(),
        reduction.assignment[part].detach(),
        reduction.weights[part].detach(),
    )

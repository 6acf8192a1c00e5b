"""``uniform``: keep evenly spaced tokens, optionally pooling the rest into them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tokred.core.budget import BudgetKwargs
from tokred.core.ops.selection import mask_to_indices
from tokred.core.reducer import Reducer
from tokred.core.reduction import Reduction
from tokred.core.registry import register_reducer

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["UniformReducer"]


@register_reducer("uniform")
class UniformReducer(Reducer):
    """Keep evenly spaced tokens; with ``merge=True``, average every other token into the nearest kept one.

    Protected tokens are kept first; the rest of the budget is spread evenly over the unprotected tokens in
    sequence order (slot ``j`` of ``m`` takes the token at ``floor((j + 1/2) U / m)`` of the ``U`` unprotected
    ones). With ``merge=True`` each dropped token joins the kept unprotected token closest in sequence position
    (ties to the earlier one), which for a raster-ordered image is 1-D pooling.

    Args:
        **budget: At most one of ``num_keep``, ``keep_ratio``, ``num_remove`` (see [`Budget`][tokred.core.Budget]).
        merge: Pool dropped tokens into the nearest kept token instead of discarding them.
    """

    def __init__(self, *, merge: bool = False, **budget: Unpack[BudgetKwargs]) -> None:
        super().__init__(**budget)
        self.merge = merge

    def reduce(
        self,
        tokens: torch.Tensor,
        num_keep: int,
        *,
        scores: torch.Tensor | None,
        protected: torch.Tensor,
        sizes: torch.Tensor | None,
    ) -> Reduction:
        """Keep evenly spaced tokens; pool the rest into them when ``merge`` is set."""
        batch, num_tokens = tokens.shape[:2]
        device = tokens.device
        num_protected = protected.sum(dim=1, keepdim=True)  # (B, 1)
        num_free = num_tokens - num_protected  # U per row
        num_pick = num_keep - num_protected  # m per row, 0 <= m < U
        # Unprotected positions first, in order; a stable sort keeps that order.
        order = torch.sort(protected.to(torch.uint8), dim=1, stable=True).indices  # (B, N)
        slot = torch.arange(num_keep, device=device).unsqueeze(0)  # (1, K)
        rank = ((2 * slot + 1) * num_free) // (2 * num_pick.clamp_min(1))  # floor((j + 1/2) U / m)
        wanted = slot < num_pick  # (B, K)
        picked = order.gather(1, rank.clamp_max(num_tokens - 1))
        hits = torch.zeros((batch, num_tokens), dtype=torch.int32, device=device)
        hits.scatter_add_(1, picked, wanted.to(torch.int32))
        keep = protected | (hits > 0)
        kept = mask_to_indices(keep, num_keep)
        if not self.merge:
            return Reduction.from_selection(tokens, kept, sizes)
        # Nearest kept unprotected position by |i - j|; argmin takes the earlier one on ties.
        positions = torch.arange(num_tokens, device=device)
        distance = (positions.view(1, -1, 1) - kept.unsqueeze(1)).abs().float()  # (B, N, K)
        kept_protected = protected.gather(1, kept)
        distance = distance.masked_fill(kept_protected.unsqueeze(1), float("inf"))
        nearest = kept.gather(1, distance.argmin(dim=2))  # (B, N)
        # A row whose whole budget went to protected tokens has nowhere to pool into: drop instead.
        nearest = torch.where((num_pick > 0), nearest, -1)
        targets = torch.where(keep, positions.expand(batch, -1), nearest)
        return Reduction.from_targets(tokens, kept, targets, sizes)

"""``topk``: keep the tokens with the highest caller-supplied scores."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tokred.core.budget import BudgetKwargs
from tokred.core.reducer import CALLER_SCORES, Reducer, select_top
from tokred.core.reduction import Reduction
from tokred.core.registry import register_reducer

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["TopKReducer"]


@register_reducer("topk")
class TopKReducer(Reducer):
    """Keep the tokens with the highest external scores (attention, Δ, saliency) supplied by the caller.

    The generic score-based baseline: whatever importance a model exposes — a ViT's [CLS] attention, the
    attention of the last text token, Mamba's Δ — passed as ``scores``, with optional merging of the rest
    into their most similar kept token. Ties go to the lower position.

    Args:
        **budget: At most one of ``num_keep``, ``keep_ratio``, ``num_remove`` (see [`Budget`][tokred.core.Budget]).
        merge: Merge every dropped token into its most cosine-similar kept (unprotected) token instead of
            discarding it.
    """

    needs_scores = CALLER_SCORES

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
        """Select the best-scored tokens; merge or drop the rest."""
        assert scores is not None  # needs_scores: the base class has checked
        kept = select_top(scores, num_keep, protected)
        if not self.merge:
            return Reduction.from_selection(tokens, kept, sizes)
        return Reduction.merge_into_nearest(tokens, kept, allowed=~protected.gather(1, kept), sizes=sizes)

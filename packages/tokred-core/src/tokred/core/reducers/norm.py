"""``norm``: keep the tokens with the largest feature norm."""

from __future__ import annotations

import torch

from tokred.core.reducer import Reducer, select_top
from tokred.core.reduction import Reduction
from tokred.core.registry import register_reducer

__all__ = ["NormReducer"]


@register_reducer("norm")
class NormReducer(Reducer):
    """Keep the tokens with the largest L2 feature norm and drop the rest.

    A cheap saliency proxy: in ViT and CLIP features, high-norm tokens tend to carry global information (and
    include the "register"-like outlier tokens).

    Args:
        num_keep: Tokens kept per set.
        keep_ratio: Fraction of tokens kept.
        num_remove: Tokens removed per set.
    """

    def reduce(
        self,
        tokens: torch.Tensor,
        num_keep: int,
        *,
        scores: torch.Tensor | None,
        protected: torch.Tensor,
        sizes: torch.Tensor | None,
    ) -> Reduction:
        """Keep the largest-norm tokens."""
        norms = tokens.float().norm(dim=-1)  # (B, N)
        return Reduction.from_selection(tokens, select_top(norms, num_keep, protected), sizes)

"""``topvim``: ToP-ViM's importance score, pruning without its hidden-state alignment."""

from __future__ import annotations

import torch

from tokred.core import Reducer, Reduction, register_reducer, select_top

__all__ = ["ToPViMReducer"]


@register_reducer("topvim")
class ToPViMReducer(Reducer):
    """Prune the tokens with the smallest clipped output mass, as ToP-ViM scores them, without alignment.

    From Zhan et al., "Exploring Token Pruning in Vision State Space Models" (NeurIPS 2024, ToP-ViM). Its
    importance of token ``t`` is ``S_t = Σ_d max(0, y_{t,d})``, the clipped SSM output summed over channels;
    here ``y`` is the block output the reducer receives as ``tokens``. ToP-ViM fine-tunes with a
    "pruning-aware hidden state alignment"; that part needs training and is deliberately absent, so this is
    the training-free version of its criterion. Kept tokens keep their order.

    Args:
        num_keep: Tokens kept per set.
        keep_ratio: Fraction of tokens kept (ToP-ViM keeps 0.8 at each of blocks 5, 10, 15).
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
        """Keep the tokens with the largest clipped output sums."""
        importance = tokens.float().clamp_min(0).sum(dim=-1)  # (B, N)
        return Reduction.from_selection(tokens, select_top(importance, num_keep, protected), sizes)

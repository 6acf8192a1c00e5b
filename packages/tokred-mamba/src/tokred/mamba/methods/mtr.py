"""``mtr``: Mamba Token Reduction — Δ-ranked Keep / Target / Source groups, Sources merged into Targets.

From Ma et al., "Training-free Token Reduction for Vision Mamba" (arXiv:2507.14042). No official code has
been released; this follows the method as the paper describes it, and where the description is silent (which
scan directions, how Δ is reduced over channels, how many Targets) it makes the choice a parameter.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from tokred.core import Reducer, Reduction, register_reducer
from tokred.core.budget import BudgetKwargs
from tokred.core.errors import InvalidInputError
from tokred.core.ops import mask_to_indices, rank
from tokred.mamba.scores import DELTA, ChannelReduce, Directions

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["MTR"]


@register_reducer("mtr")
class MTR(Reducer):
    """Rank tokens by Mamba's Δ, merge the least important (Source) into similar mid-ranked ones (Target).

    For one reduction step removing ``r = N - K`` tokens: tokens are ranked by importance (``scores``,
    highest first; protected tokens such as the class token first of all); the top ``K - n_t`` form *Keep*
    and are left untouched, the next ``n_t = max(1, round(target_ratio · r))`` form *Target*, and the last
    ``r`` form *Source*. Every Source token is merged into its most cosine-similar Target token (a
    size-weighted mean, which is the paper's plain average when sizes are equal); survivors keep their
    original order, which Mamba's sequential scan depends on.

    MTR ranks by Δ (``needs_scores = "delta"``): attached to a tokred-mamba model
    ([`tokred.mamba.attach`][tokred.mamba.attach]), each scheduled block hands over the Δ it has just used and
    [`delta_importance`][tokred.mamba.scores.delta_importance] turns it into the scores, as ``directions`` and
    ``channel_reduce`` ask. Called directly, pass ``scores`` ``(B, N)``.

    Examples:
        >>> import torch
        >>> from tokred.mamba import MTR, attach, create_model
        >>> model = create_model("vim_test").eval()
        >>> with attach(model, MTR(target_ratio=0.5), flops_cut=0.3):  # no budget: the schedule sets it
        ...     logits = model(torch.randn(1, 3, 64, 64))
        >>> MTR(num_remove=2)(torch.randn(1, 6, 4), scores=torch.arange(6.0).unsqueeze(0)).indices
        tensor([[2, 3, 4, 5]])

    Args:
        target_ratio: Size of the Target group relative to ``r`` (1.0: as many Targets as Sources).
        merge: Merge Sources into Targets (default); False drops them (the paper's prune ablation).
        directions: Which scan directions' Δ make the importance (``"both"``, ``"forward"``,
            ``"backward"``).
        channel_reduce: How Δ is reduced over channels (``"mean"`` or ``"max"``).
        **budget: At most one of ``num_keep``, ``keep_ratio``, ``num_remove``, for direct calls; leave it out
            under a model's schedule, which sets the count of every step.
    """

    needs_scores = DELTA

    def __init__(
        self,
        *,
        target_ratio: float = 1.0,
        merge: bool = True,
        directions: Directions = "both",
        channel_reduce: ChannelReduce = "mean",
        **budget: Unpack[BudgetKwargs],
    ) -> None:
        super().__init__(**budget)
        if isinstance(target_ratio, bool) or not (
            isinstance(target_ratio, (int, float)) and target_ratio > 0 and math.isfinite(target_ratio)
        ):
            raise InvalidInputError(f"target_ratio must be a positive number; got {target_ratio!r}")
        if directions not in ("both", "forward", "backward"):
            raise InvalidInputError(f"directions must be 'both', 'forward' or 'backward'; got {directions!r}")
        if channel_reduce not in ("mean", "max"):
            raise InvalidInputError(f"channel_reduce must be 'mean' or 'max'; got {channel_reduce!r}")
        self.target_ratio = float(target_ratio)
        self.merge = merge
        self.directions = directions
        self.channel_reduce = channel_reduce

    def score_options(self) -> dict[str, Any]:
        """How the model turns Δ into scores: ``directions`` and ``channel_reduce``."""
        return {"directions": self.directions, "channel_reduce": self.channel_reduce}

    def reduce(
        self,
        tokens: torch.Tensor,
        num_keep: int,
        *,
        scores: torch.Tensor | None,
        protected: torch.Tensor,
        sizes: torch.Tensor | None,
    ) -> Reduction:
        """Split by importance into Keep / Target / Source and merge each Source into its nearest Target."""
        assert scores is not None  # needs_scores: checked by the base class
        num_remove = tokens.shape[1] - num_keep
        num_protected = protected.sum(dim=1, keepdim=True)  # (B, 1)
        # Targets come from the unprotected part of the kept ranking, so a row never merges into protected.
        num_targets = torch.clamp(num_keep - num_protected, max=max(1, round(self.target_ratio * num_remove)))
        ranks = rank(scores.float().masked_fill(protected, float("inf")))  # (B, N), 0 = most important
        kept_mask = ranks < num_keep
        target_mask = kept_mask & (ranks >= num_keep - num_targets)
        kept = mask_to_indices(kept_mask, num_keep)
        if not self.merge:
            return Reduction.from_selection(tokens, kept, sizes)
        return Reduction.merge_into_nearest(tokens, kept, allowed=target_mask.gather(1, kept), sizes=sizes)

"""``mtr``: Mamba Token Reduction — Δ-ranked Keep / Target / Source groups, Sources merged into Targets.

From Ma et al., "Training-free Token Reduction for Vision Mamba" (arXiv:2507.14042). No official code has
been released; this follows the method as described (``reference/mtr.md`` §1.3) with the defaults recommended
where the description is silent (§1.5), every one a parameter.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from tokred.core import Reducer, Reduction, register_reducer
from tokred.core.budget import BudgetKwargs

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["MTR", "delta_importance"]


def delta_importance(
    block: nn.Module,
    *,
    directions: Literal["both", "forward", "backward"] = "both",
    channel_reduce: Literal["mean", "max"] = "mean",
) -> torch.Tensor:
    """MTR's token importance from the Δ timescale a Vision Mamba block has just used.

    Δ (after the softplus, exactly what the scan consumed) acts as an input gate: a large Δ writes the token
    strongly into the state. The forward and the backward scan each give one ``(B, E, L)`` Δ; the backward
    one is already flipped back to token order by the mixer, so position ``t`` is token ``t`` in both.

    Args:
        block: A tokred-mamba block whose mixer ran with ``record_delta = True``.
        directions: Sum both scan directions (default), or use one.
        channel_reduce: Average over the ``E`` channels (default) or take their maximum.

    Returns:
        Importance of shape ``(B, L)`` in fp32.
    """
    mixer = getattr(block, "mixer", block)
    fwd, bwd = getattr(mixer, "last_delta_fwd", None), getattr(mixer, "last_delta_bwd", None)
    if fwd is None or bwd is None:
        raise RuntimeError(
            "this block recorded no Δ: set block.mixer.record_delta = True before the forward "
            "(tokred.mamba.attach does this for the blocks in its schedule)"
        )
    if directions == "both":
        delta = fwd.float() + bwd.float()
    elif directions == "forward":
        delta = fwd.float()
    elif directions == "backward":
        delta = bwd.float()
    else:
        raise ValueError(f"directions must be 'both', 'forward' or 'backward'; got {directions!r}")
    if channel_reduce == "mean":
        return delta.mean(dim=1)
    if channel_reduce == "max":
        return delta.amax(dim=1)
    raise ValueError(f"channel_reduce must be 'mean' or 'max'; got {channel_reduce!r}")


@register_reducer("mtr")
class MTR(Reducer):
    """Rank tokens by Mamba's Δ, merge the least important (Source) into similar mid-ranked ones (Target).

    For one reduction step removing ``r = N - K`` tokens: tokens are ranked by importance (``scores``,
    highest first; protected tokens such as the class token first of all); the top ``K - n_t`` form *Keep*
    and are left untouched, the next ``n_t = max(1, round(target_ratio · r))`` form *Target*, and the last
    ``r`` form *Source*. Every Source token is merged into its most cosine-similar Target token (a
    size-weighted mean, which is the paper's plain average when sizes are equal); survivors keep their
    original order, which Mamba's sequential scan depends on.

    In a tokred-mamba model the scores are Δ from the block just run (:func:`delta_importance`, which the
    model hook calls through :meth:`scores_from_block`); called directly, pass ``scores`` ``(B, N)``.

    Args:
        target_ratio: Size of the Target group relative to ``r`` (1.0: as many Targets as Sources).
        merge: Merge Sources into Targets (default); False drops them (the paper's prune ablation).
        directions: Which scan directions' Δ make the importance (``"both"``, ``"forward"``,
            ``"backward"``).
        channel_reduce: How Δ is reduced over channels (``"mean"`` or ``"max"``).
        **budget: Exactly one of ``num_keep``, ``keep_ratio``, ``num_remove``; in a model with a schedule
            the schedule sets the count of each step instead.
    """

    accepts_scores = True
    requires_scores = True

    def __init__(
        self,
        *,
        target_ratio: float = 1.0,
        merge: bool = True,
        directions: Literal["both", "forward", "backward"] = "both",
        channel_reduce: Literal["mean", "max"] = "mean",
        **budget: Unpack[BudgetKwargs],
    ) -> None:
        super().__init__(**budget)
        if not (isinstance(target_ratio, (int, float)) and target_ratio > 0 and math.isfinite(target_ratio)):
            raise ValueError(f"target_ratio must be a positive number; got {target_ratio!r}")
        if directions not in ("both", "forward", "backward"):
            raise ValueError(f"directions must be 'both', 'forward' or 'backward'; got {directions!r}")
        if channel_reduce not in ("mean", "max"):
            raise ValueError(f"channel_reduce must be 'mean' or 'max'; got {channel_reduce!r}")
        self.target_ratio = float(target_ratio)
        self.merge = merge
        self.directions = directions
        self.channel_reduce = channel_reduce

    def scores_from_block(self, block: nn.Module) -> torch.Tensor:
        """Importance ``(B, L)`` from the Δ the block's mixer recorded (see :func:`delta_importance`)."""
        return delta_importance(block, directions=self.directions, channel_reduce=self.channel_reduce)

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
        assert scores is not None  # requires_scores: checked by the base class
        batch, num_tokens = tokens.shape[:2]
        num_remove = num_tokens - num_keep
        num_protected = protected.sum(dim=1, keepdim=True)  # (B, 1)
        # Targets come from the unprotected part of the kept ranking, so a row never merges into protected.
        num_targets = torch.clamp(num_keep - num_protected, max=max(1, round(self.target_ratio * num_remove)))
        ranked = scores.float().masked_fill(protected, float("inf"))
        order = torch.sort(ranked, dim=1, descending=True, stable=True).indices  # (B, N) best first
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(num_tokens, device=tokens.device).expand_as(order)
        )
        kept_mask = rank < num_keep
        target_mask = kept_mask & (rank >= num_keep - num_targets)
        kept = torch.nonzero(kept_mask)[:, 1].reshape(batch, num_keep)  # row-major, so ascending per row
        if not self.merge:
            return Reduction.from_selection(tokens, kept, sizes)
        return Reduction.merge_into_nearest(tokens, kept, allowed=target_mask.gather(1, kept), sizes=sizes)

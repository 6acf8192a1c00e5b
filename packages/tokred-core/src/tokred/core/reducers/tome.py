"""``tome``: merge redundant tokens by bipartite soft matching (Token Merging)."""

from __future__ import annotations

import torch

from tokred.core.ops.matching import bipartite_soft_matching
from tokred.core.ops.merge import merge_weights, scatter_merge
from tokred.core.reducer import Reducer
from tokred.core.reduction import Reduction
from tokred.core.registry import register_reducer

__all__ = ["ToMeReducer"]


@register_reducer("tome")
class ToMeReducer(Reducer):
    """Merge the most similar token pairs by bipartite soft matching until the budget is met (ToMe).

    From Bolya et al., "Token Merging: Your ViT But Faster" (ICLR 2023). One round splits the unprotected
    tokens alternately into sets A and B, pairs every A token with its most cosine-similar B token, and merges
    the ``r`` best pairs into a size-weighted mean (ToMe's proportional averaging). A round removes at most
    half the tokens, so large reductions take several rounds; each row runs its own rounds, so a row's
    result never depends on the rest of the batch. A merged token stands at the position of its B token,
    which keeps sequence order. Protected tokens take no part in matching.

    Args:
        num_keep: Tokens kept per set.
        keep_ratio: Fraction of tokens kept.
    """

    def __init__(self, *, num_keep: int | None = None, keep_ratio: float | None = None):
        super().__init__(num_keep=num_keep, keep_ratio=keep_ratio)

    def reduce(self, tokens, num_keep, *, scores, protected, sizes) -> Reduction:  # noqa: D102
        batch, num_tokens = tokens.shape[:2]
        device = tokens.device
        positions = torch.arange(num_tokens, device=device).expand(batch, -1)
        # Rounds run on the full-length tensors with an "alive" mask, so rows may need different numbers of
        # rounds. owner[i] is the alive position that original token i has been merged into (-1: dropped).
        owner = positions.clone()
        alive = torch.ones((batch, num_tokens), dtype=torch.bool, device=device)
        current = tokens
        while True:
            excess = alive.sum(dim=1) - num_keep
            if int(excess.max()) == 0:
                break
            free = alive & ~protected
            r = torch.minimum(excess, (free.sum(dim=1) + 1) // 2)
            match = bipartite_soft_matching(current, r, protected=~free)
            paired = match.sources >= 0
            # Padding entries write into a spare column N, so they can never collide with a real source.
            src = torch.where(paired, match.sources, num_tokens)
            step = torch.cat([positions, positions.new_full((batch, 1), -1)], dim=1)  # (B, N + 1)
            step.scatter_(1, src, match.destinations)  # each source -> its destination (or -1: dropped)
            removed = torch.zeros((batch, num_tokens + 1), dtype=torch.bool, device=device).scatter_(1, src, True)
            alive &= ~removed[:, :num_tokens]
            owner = torch.where(owner >= 0, step[:, :num_tokens].gather(1, owner.clamp_min(0)), -1)
            # Size-weighted means of the original tokens, recomputed exactly at every alive position.
            weights, _ = merge_weights(owner, num_tokens, sizes)
            current = scatter_merge(tokens, owner, num_tokens, weights)
        kept = torch.nonzero(alive)[:, 1].reshape(batch, num_keep)  # row-major, so ascending per row
        return Reduction.from_targets(tokens, kept, owner, sizes)

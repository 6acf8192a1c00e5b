"""``tome``: merge redundant tokens by bipartite soft matching (Token Merging)."""

from __future__ import annotations

import torch

from tokred.core.ops.matching import bipartite_soft_matching
from tokred.core.ops.selection import topk_indices
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
        """Merge by bipartite soft matching, round after round, until ``num_keep`` remain."""
        batch, num_tokens = tokens.shape[:2]
        device = tokens.device
        positions = torch.arange(num_tokens, device=device).expand(batch, -1)
        # Rounds run on the full-length tensors with an "alive" mask, so rows may need different numbers of
        # rounds. owner[i] is the alive position that original token i has been merged into (-1: dropped).
        owner = positions.clone()
        alive = torch.ones((batch, num_tokens), dtype=torch.bool, device=device)
        # Each alive position holds the size-weighted *sum* of the tokens merged into it. Cosine similarity
        # ignores the scale, so matching runs on the sums directly and a merge is one row addition.
        weighted = tokens.float() if sizes is None else tokens.float() * sizes.float().unsqueeze(-1)
        weighted = weighted.reshape(batch * num_tokens, -1).clone()  # (B * N, C), owned
        row_offset = torch.arange(batch, device=device).unsqueeze(1) * num_tokens  # (B, 1)
        while True:
            excess = alive.sum(dim=1) - num_keep
            if int(excess.max()) == 0:
                break
            free = alive & ~protected
            r = torch.minimum(excess, (free.sum(dim=1) + 1) // 2)
            # Match on the alive tokens only (plus, in rows with fewer, some dead ones masked out), in order:
            # the result is the same as on the full masked sequence at a fraction of the N x N cost.
            window = topk_indices(alive, int(alive.sum(dim=1).max()))  # (B, M) ascending
            window_tokens = weighted.view(batch, num_tokens, -1).gather(
                1, window.unsqueeze(-1).expand(-1, -1, weighted.shape[1])
            )
            match = bipartite_soft_matching(window_tokens, r, protected=~free.gather(1, window))
            paired = match.sources >= 0
            sources = window.gather(1, match.sources.clamp_min(0))
            destinations = torch.where(match.destinations >= 0, window.gather(1, match.destinations.clamp_min(0)), -1)
            merging = paired & (destinations >= 0)
            weighted.index_add_(0, (destinations + row_offset)[merging], weighted[(sources + row_offset)[merging]])
            # Padding entries write into a spare column N, so they can never collide with a real source.
            src = torch.where(paired, sources, num_tokens)
            step = torch.cat([positions, positions.new_full((batch, 1), -1)], dim=1)  # (B, N + 1)
            step.scatter_(1, src, torch.where(paired, destinations, -1))  # source -> destination (-1: dropped)
            removed = torch.zeros((batch, num_tokens + 1), dtype=torch.bool, device=device).scatter_(1, src, True)
            alive &= ~removed[:, :num_tokens]
            owner = torch.where(owner >= 0, step[:, :num_tokens].gather(1, owner.clamp_min(0)), -1)
        kept = torch.nonzero(alive)[:, 1].reshape(batch, num_keep)  # row-major, so ascending per row
        return Reduction.from_targets(tokens, kept, owner, sizes)

"""``tome``: merge redundant tokens by bipartite soft matching (Token Merging)."""

from __future__ import annotations

import torch

from tokred.core.ops.matching import bipartite_soft_matching
from tokred.core.ops.selection import gather_tokens, topk_indices
from tokred.core.reducer import Reducer
from tokred.core.reduction import Reduction
from tokred.core.registry import register_reducer
from tokred.core.rounds import MergeRounds

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
        rounds = MergeRounds(tokens, sizes)
        while True:
            excess = rounds.excess(num_keep)
            if int(excess.max()) == 0:
                break
            free = rounds.alive & ~protected
            r = torch.minimum(excess, (free.sum(dim=1) + 1) // 2)
            # Match on the alive tokens only (plus, in rows with fewer, some dead ones masked out), in order:
            # the result is the same as on the full masked sequence at a fraction of the N x N cost. Matching
            # on the size-weighted sums is matching on the means: cosine similarity ignores the scale.
            window = topk_indices(rounds.alive, int(rounds.alive.sum(dim=1).max()))  # (B, M) ascending
            match = bipartite_soft_matching(
                gather_tokens(rounds.weighted, window), r, protected=~free.gather(1, window)
            )
            sources = torch.where(match.sources >= 0, window.gather(1, match.sources.clamp_min(0)), -1)
            destinations = torch.where(match.destinations >= 0, window.gather(1, match.destinations.clamp_min(0)), -1)
            rounds.remove(sources, destinations)
        return rounds.finish(num_keep)

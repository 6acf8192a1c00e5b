"""``utr``: the hybrid prune-and-merge of "Rethinking Token Reduction for State Space Models" (UTR)."""

from __future__ import annotations

import torch

from tokred.core import Reducer, Reduction, register_reducer
from tokred.core.ops import bipartite_soft_matching, rank
from tokred.core.rounds import MergeRounds

__all__ = ["UTRReducer"]


@register_reducer("utr")
class UTRReducer(Reducer):
    """Pair low-importance tokens with similar high-importance ones; merge half of the chosen, prune the rest.

    From Zhan et al., "Rethinking Token Reduction for State Space Models" (EMNLP 2024, "UTR"), written from
    the paper and the description of its released code: importance is the clipped output mass
    ``Σ_d max(0, y_{t,d})``; the unprotected tokens are split by importance into a low half (sources) and a
    high half (destinations); each source finds its most cosine-similar destination and the ``r`` most similar
    sources are removed (core's [`bipartite_soft_matching`][tokred.core.ops.bipartite_soft_matching] with the
    importance split) — the more important half of them merged into their match (size-weighted mean), the
    less important half pruned. A step removes at most half of the tokens, so larger reductions run several
    steps. Order is preserved.

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
        """Run hybrid prune/merge steps until ``num_keep`` tokens remain."""
        device = tokens.device
        rounds = MergeRounds(tokens, sizes)
        while True:
            excess = rounds.excess(num_keep)
            if int(excess.max()) == 0:
                break
            free = rounds.alive & ~protected
            num_free = free.sum(dim=1)
            # Sources: the less important half of the free tokens; a lone free token is a source with no
            # destination, which can only be pruned.
            num_low = torch.where(num_free == 1, 1, num_free // 2)
            r = torch.minimum(excess, num_low)  # (B,)
            means = rounds.means()
            importance = means.clamp_min(0).sum(dim=-1).masked_fill(~free, float("inf"))
            ranks = rank(importance, descending=False)  # (B, N), 0 = least important
            is_src = free & (ranks < num_low.unsqueeze(1))
            match = bipartite_soft_matching(means, r, protected=~free, sources=is_src)
            max_r = match.sources.shape[1]
            valid = match.sources >= 0  # (B, R)
            # Of each row's chosen sources, the more important half is merged and the rest pruned.
            chosen_rank = ranks.gather(1, match.sources.clamp_min(0)).masked_fill(~valid, -1)
            by_importance = torch.sort(chosen_rank, dim=1, descending=True, stable=True).indices
            merge_mask = torch.zeros_like(valid).scatter_(
                1, by_importance, torch.arange(max_r, device=device).unsqueeze(0) < ((r + 1) // 2).unsqueeze(1)
            )
            merge_mask &= valid & (match.destinations >= 0)
            rounds.remove(match.sources, torch.where(merge_mask, match.destinations, -1))
        return rounds.finish(num_keep)

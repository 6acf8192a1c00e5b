"""``divprune``: keep a maximally diverse subset of tokens (max–min diversity)."""

from __future__ import annotations

import torch

from tokred.core.ops.sampling import farthest_point_sampling
from tokred.core.ops.selection import mask_to_indices
from tokred.core.ops.similarity import cosine_similarity
from tokred.core.reducer import Reducer
from tokred.core.reduction import Reduction
from tokred.core.registry import register_reducer

__all__ = ["DivPruneReducer"]


@register_reducer("divprune")
class DivPruneReducer(Reducer):
    """Keep the subset whose closest pair is as far apart as possible (DivPrune's max–min diversity).

    Written from the paper (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large
    Multimodal Models", CVPR 2025, arXiv:2503.02175); the authors' code is under a non-commercial licence and
    was not used. Selecting ``K`` tokens that maximise the minimum pairwise cosine distance
    (``1 - cos``) is NP-hard; the paper solves it greedily: start from the token whose nearest neighbour is
    farthest away, then repeatedly add the token farthest (in min distance) from those already chosen —
    farthest-point sampling under the cosine distance. Dropped tokens are discarded.

    Protected tokens are kept and take no part in the diversity objective (they are usually special tokens
    whose features are unlike the patches).

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
        """Greedy max–min diversity over the unprotected tokens."""
        batch, num_tokens = tokens.shape[:2]
        free = ~protected
        num_pick = num_keep - protected.sum(dim=1)  # per row, < number of free tokens
        distance = 1.0 - cosine_similarity(tokens)  # (B, N, N)
        others = free.unsqueeze(1) & ~torch.eye(num_tokens, dtype=torch.bool, device=tokens.device)
        nearest = distance.masked_fill(~others, float("inf")).amin(dim=2)  # (B, N)
        start = nearest.masked_fill(~free, float("-inf")).argmax(dim=1)  # the most isolated free token
        max_pick = int(num_pick.max())
        if max_pick == 0:
            return Reduction.from_selection(tokens, mask_to_indices(protected, num_keep), sizes)
        picks = farthest_point_sampling(distance, max_pick, start=start, metric="precomputed", valid=free)  # (B, M)
        # Rows with more protected tokens need fewer picks: keep each row's first num_pick.
        wanted = torch.arange(max_pick, device=tokens.device).unsqueeze(0) < num_pick.unsqueeze(1)
        hits = torch.zeros((batch, num_tokens), dtype=torch.int32, device=tokens.device)
        hits.scatter_add_(1, picks.clamp_min(0), (wanted & (picks >= 0)).to(torch.int32))
        keep = protected | (hits > 0)
        kept = mask_to_indices(keep, num_keep)
        return Reduction.from_selection(tokens, kept, sizes)

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
    the ``r`` best pairs (a size-weighted mean, ToMe's proportional averaging); a round can remove at most half
    the tokens, so large reductions take several rounds, composed into one plan. The merged token stands at
    the position of its B token, so sequence order is preserved. Protected tokens take no part in matching.

    Args:
        num_keep: Tokens kept per set.
        keep_ratio: Fraction of tokens kept.
    """

    def __init__(self, *, num_keep: int | None = None, keep_ratio: float | None = None):
        super().__init__(num_keep=num_keep, keep_ratio=keep_ratio)

    def reduce(self, tokens, num_keep, *, scores, protected, sizes) -> Reduction:  # noqa: D102
        batch = tokens.shape[0]
        device = tokens.device
        plan: Reduction | None = None
        current, current_sizes, current_protected = tokens, sizes, protected
        while current.shape[1] > num_keep:
            num_current = current.shape[1]
            num_free = num_current - current_protected.sum(dim=1)
            r = min(num_current - num_keep, int(((num_free + 1) // 2).min()))
            match = bipartite_soft_matching(current, r, protected=current_protected)
            positions = torch.arange(num_current, device=device).expand(batch, -1)
            targets = positions.scatter(1, match.sources, match.destinations)  # sources -> dst (or -1)
            is_source = torch.zeros((batch, num_current), dtype=torch.bool, device=device)
            is_source.scatter_(1, match.sources, True)
            kept = topk_indices(~is_source, num_current - r)
            step = Reduction.from_targets(current, kept, targets, current_sizes)
            plan = step if plan is None else plan.compose(step)
            current, current_sizes = step.tokens, step.sizes
            current_protected = step.apply(current_protected, how="select")
        assert plan is not None
        return plan

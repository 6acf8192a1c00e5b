"""Bipartite soft matching (ToMe), generalised to protected tokens."""

from __future__ import annotations

from typing import NamedTuple

import torch

from tokred.core.ops._checks import check_float, check_rank
from tokred.core.ops.similarity import cosine_similarity

__all__ = ["BipartiteMatch", "bipartite_soft_matching"]

# Score given to a source with no destination: below any cosine similarity, above "not a source".
_NO_DESTINATION = -2.0


class BipartiteMatch(NamedTuple):
    """The pairs chosen by :func:`bipartite_soft_matching`, as original token positions.

    Attributes:
        sources: Long tensor ``(B, r)``: the tokens that disappear.
        destinations: Long tensor ``(B, r)``: the token each source merges into, or ``-1`` where the row had
            no destination left and the source is simply dropped.
        similarity: Tensor ``(B, r)``: the cosine similarity of each pair (``-2`` for a drop).
    """

    sources: torch.Tensor
    destinations: torch.Tensor
    similarity: torch.Tensor


def bipartite_soft_matching(
    tokens: torch.Tensor, r: int, *, protected: torch.Tensor | None = None
) -> BipartiteMatch:
    """ToMe's bipartite soft matching: pick the ``r`` most redundant tokens and the token each merges into.

    The unprotected tokens of each row are split alternately, by their order, into a source set A (1st, 3rd,
    …) and a destination set B (2nd, 4th, …). Every A token finds its most cosine-similar B token, and the ``r``
    A tokens with the highest such similarity are chosen. Protected tokens are neither sources nor
    destinations, so they come through untouched. A row whose unprotected tokens cannot fill both sets (a
    single unprotected token) drops that token with destination ``-1``.

    Args:
        tokens: Tokens of shape ``(B, N, C)`` (ToMe uses attention keys; any features work).
        r: Tokens to remove per row, ``0 <= r <= min_b ceil(U_b / 2)`` where ``U_b`` counts the unprotected
            tokens of row ``b``.
        protected: Optional bool mask of shape ``(B, N)``.

    Returns:
        A :class:`BipartiteMatch`; sources are sorted by descending similarity.
    """
    check_rank("tokens", tokens, 3, "(B, N, C)")
    check_float("tokens", tokens)
    batch, num_tokens, _ = tokens.shape
    device = tokens.device
    if protected is None:
        protected = torch.zeros((batch, num_tokens), dtype=torch.bool, device=device)
    elif protected.shape != (batch, num_tokens) or protected.dtype != torch.bool:
        raise ValueError(f"protected must be a bool tensor of shape {(batch, num_tokens)}")
    free = ~protected
    num_free = free.sum(dim=1)
    max_r = int(((num_free + 1) // 2).min()) if batch else 0
    if not 0 <= r <= max_r:
        raise ValueError(f"r must be between 0 and {max_r} (half the unprotected tokens of the fullest row); got {r}")

    rank = free.long().cumsum(dim=1) - 1  # order among the unprotected tokens of the row
    is_src = free & (rank % 2 == 0)
    is_dst = free & (rank % 2 == 1)
    sim = cosine_similarity(tokens)  # (B, N, N)
    sim = sim.masked_fill(~(is_src.unsqueeze(2) & is_dst.unsqueeze(1)), float("-inf"))
    best_sim, best_dst = sim.max(dim=2)  # (B, N)
    has_dst = is_dst.any(dim=1, keepdim=True)
    # Sources of a row without destinations are dropped; everything that is not a source ranks last.
    score = torch.where(is_src & has_dst, best_sim, torch.full_like(best_sim, _NO_DESTINATION))
    score = score.masked_fill(~is_src, float("-inf"))
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :r]  # (B, r)
    chosen_sim = score.gather(1, order)
    chosen_dst = torch.where(has_dst, best_dst.gather(1, order), torch.full_like(order, -1))
    return BipartiteMatch(order, chosen_dst, chosen_sim)

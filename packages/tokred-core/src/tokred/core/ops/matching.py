"""Bipartite soft matching (ToMe), generalised to protected tokens and to any split into sources and destinations."""

from __future__ import annotations

from typing import NamedTuple

import torch

from tokred.core.errors import InvalidInputError
from tokred.core.ops._checks import check_float, check_rank
from tokred.core.ops.similarity import cosine_similarity

__all__ = ["BipartiteMatch", "bipartite_soft_matching"]

# Score given to a source with no destination: below any cosine similarity, above "not a source".
_NO_DESTINATION = -2.0


class BipartiteMatch(NamedTuple):
    """The pairs chosen by [`bipartite_soft_matching`][tokred.core.ops.bipartite_soft_matching], as token positions.

    Attributes:
        sources: Long tensor ``(B, R)`` with ``R = max r``: the tokens that disappear, by descending
            similarity; ``-1`` pads rows that remove fewer than ``R``.
        destinations: Long tensor ``(B, R)``: the token each source merges into; ``-1`` where the source is
            simply dropped (its row had no destination left) and in padding.
        similarity: Tensor ``(B, R)``: the cosine similarity of each pair (``-2`` for a drop, ``-inf`` for
            padding).
    """

    sources: torch.Tensor
    destinations: torch.Tensor
    similarity: torch.Tensor


def bipartite_soft_matching(
    tokens: torch.Tensor,
    r: int | torch.Tensor,
    *,
    protected: torch.Tensor | None = None,
    sources: torch.Tensor | None = None,
) -> BipartiteMatch:
    """ToMe's bipartite soft matching: pick the ``r`` most redundant tokens and the token each merges into.

    The unprotected tokens of each row are split into a source set A and a destination set B: alternately by
    their order (1st, 3rd, … in A; 2nd, 4th, … in B) as ToMe does, or as ``sources`` says (UTR puts the less
    important half in A). Every A token finds its most cosine-similar B token, and the ``r`` A tokens with the
    highest such similarity are chosen. Protected tokens are neither sources nor destinations, so they come
    through untouched (pass already-removed tokens as protected too). A row without destinations (a single
    unprotected token, or every unprotected token a source) drops its chosen sources with destination ``-1``.

    Args:
        tokens: Tokens of shape ``(B, N, C)`` (ToMe uses attention keys; any features work).
        r: Tokens to remove: one int for every row or a long tensor ``(B,)``, with ``0 <= r_b <= |A_b|``, the
            size of row ``b``'s source set (``ceil(U_b / 2)`` for the alternate split of ``U_b`` unprotected
            tokens).
        protected: Optional bool mask of shape ``(B, N)``.
        sources: Optional bool mask of shape ``(B, N)``: the unprotected tokens that form A; every other
            unprotected token is in B. The alternate split when omitted.

    Returns:
        A [`BipartiteMatch`][tokred.core.ops.BipartiteMatch].

    Examples:
        >>> import torch
        >>> from tokred.core.ops import bipartite_soft_matching
        >>> x = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]]])
        >>> match = bipartite_soft_matching(x, 1)
        >>> match.sources, match.destinations
        (tensor([[0]]), tensor([[1]]))
    """
    check_rank("tokens", tokens, 3, "(B, N, C)")
    check_float("tokens", tokens)
    batch, num_tokens, _ = tokens.shape
    device = tokens.device
    if protected is None:
        protected = torch.zeros((batch, num_tokens), dtype=torch.bool, device=device)
    elif protected.shape != (batch, num_tokens) or protected.dtype != torch.bool:
        raise InvalidInputError(f"protected must be a bool tensor of shape {(batch, num_tokens)}")
    free = ~protected
    if sources is None:
        order_in_row = free.long().cumsum(dim=1) - 1  # order among the unprotected tokens of the row
        is_src = free & (order_in_row % 2 == 0)
    elif sources.shape != (batch, num_tokens) or sources.dtype != torch.bool:
        raise InvalidInputError(f"sources must be a bool tensor of shape {(batch, num_tokens)}")
    else:
        is_src = free & sources
    is_dst = free & ~is_src
    num_src = is_src.sum(dim=1)  # size of A per row
    per_row = torch.as_tensor(r, dtype=torch.long, device=device).expand(batch)
    if bool(((per_row < 0) | (per_row > num_src)).any()):
        raise InvalidInputError(
            f"r must lie between 0 and the number of sources of its row ({num_src.tolist()}); got {per_row.tolist()}"
        )
    max_r = int(per_row.max()) if batch else 0

    sim = cosine_similarity(tokens)  # (B, N, N)
    sim = sim.masked_fill(~(is_src.unsqueeze(2) & is_dst.unsqueeze(1)), float("-inf"))
    best_sim, best_dst = sim.max(dim=2)  # (B, N)
    has_dst = is_dst.any(dim=1, keepdim=True)
    # Sources of a row without destinations are dropped; everything that is not a source ranks last.
    score = torch.where(is_src & has_dst, best_sim, torch.full_like(best_sim, _NO_DESTINATION))
    score = score.masked_fill(~is_src, float("-inf"))
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :max_r]  # (B, R)
    chosen_sim = score.gather(1, order)
    chosen_dst = torch.where(has_dst, best_dst.gather(1, order), torch.full_like(order, -1))
    padding = torch.arange(max_r, device=device).unsqueeze(0) >= per_row.unsqueeze(1)
    return BipartiteMatch(
        order.masked_fill(padding, -1),
        chosen_dst.masked_fill(padding, -1),
        chosen_sim.masked_fill(padding, float("-inf")),
    )

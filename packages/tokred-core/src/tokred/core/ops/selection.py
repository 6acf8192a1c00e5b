"""Ranking, order-preserving top-k selection, masks to indices, and batched gathering."""

from __future__ import annotations

import torch

from tokred.core.errors import InvalidInputError
from tokred.core.ops._checks import check_rank

__all__ = ["gather_tokens", "mask_to_indices", "rank", "topk_indices"]


def rank(scores: torch.Tensor, *, descending: bool = True) -> torch.Tensor:
    """The rank of every token in its row: 0 for the best-scored one, ties to the lower position.

    Args:
        scores: Scores of shape ``(B, N)``; any real dtype or bool.
        descending: Rank the largest score first (default) or the smallest.

    Returns:
        Long tensor ``(B, N)``: each row a permutation of ``0 .. N - 1``.

    Examples:
        >>> import torch
        >>> from tokred.core.ops import rank
        >>> rank(torch.tensor([[0.1, 0.9, 0.5, 0.9]]))
        tensor([[3, 0, 2, 1]])
    """
    check_rank("scores", scores, 2, "(B, N)")
    if scores.dtype == torch.bool:
        scores = scores.to(torch.uint8)
    order = torch.sort(scores, dim=1, descending=descending, stable=True).indices
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def topk_indices(scores: torch.Tensor, k: int, *, largest: bool = True) -> torch.Tensor:
    """Indices of the ``k`` best-scored tokens of every row, returned in ascending position order.

    Ties are broken towards the lower position, so the result is deterministic on every device (a plain
    `torch.topk` leaves tie order unspecified).

    Args:
        scores: Scores of shape ``(B, N)``; any real dtype or bool.
        k: How many tokens to select, ``0 <= k <= N``.
        largest: Select the largest scores (default) or the smallest.

    Returns:
        Long tensor of shape ``(B, k)``, each row sorted ascending.

    Examples:
        >>> import torch
        >>> from tokred.core.ops import topk_indices
        >>> topk_indices(torch.tensor([[0.1, 0.9, 0.5, 0.9]]), 2)
        tensor([[1, 3]])
    """
    check_rank("scores", scores, 2, "(B, N)")
    num_tokens = scores.shape[1]
    if not 0 <= k <= num_tokens:
        raise InvalidInputError(f"k must be between 0 and N={num_tokens}; got {k}")
    if scores.dtype == torch.bool:
        scores = scores.to(torch.uint8)
    order = torch.sort(scores, dim=1, descending=largest, stable=True).indices
    return order[:, :k].sort(dim=1).values


def mask_to_indices(mask: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """The positions where a bool mask is True, row by row, in ascending order.

    Every row must hold the same number of True entries (the usual case after a selection that keeps
    exactly ``K`` tokens per row).

    Args:
        mask: Bool tensor of shape ``(B, N)``.
        count: ``K``, the True entries per row; counted from the first row when None.

    Returns:
        Long tensor ``(B, K)``.

    Raises:
        InvalidInputError: If the rows hold different numbers of True entries.

    Examples:
        >>> import torch
        >>> from tokred.core.ops import mask_to_indices
        >>> mask_to_indices(torch.tensor([[True, False, True], [False, True, True]]))
        tensor([[0, 2],
                [1, 2]])
    """
    check_rank("mask", mask, 2, "(B, N)")
    if mask.dtype != torch.bool:
        raise InvalidInputError(f"mask must be a bool tensor; got {mask.dtype}")
    batch = mask.shape[0]
    if count is None:
        count = int(mask[0].sum()) if batch else 0
    found = torch.nonzero(mask)  # row-major: ascending positions within each row
    if found.shape[0] != batch * count:
        raise InvalidInputError(f"every row of the mask must hold {count} True entries; got {mask.sum(dim=1).tolist()}")
    return found[:, 1].reshape(batch, count)


def gather_tokens(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Pick the tokens at ``indices`` from every row of ``x``.

    Args:
        x: Per-token tensor of shape ``(B, N, *)``: features ``(B, N, C)``, positions ``(B, N)`` or
            ``(B, N, 3)``, masks, anything with the token axis second.
        indices: Long tensor of shape ``(B, K)`` with values in ``[0, N)``.

    Returns:
        Tensor of shape ``(B, K, *)`` with the dtype and device of ``x``.
    """
    if x.dim() < 2:
        raise InvalidInputError(f"x must have shape (B, N, ...); got shape {tuple(x.shape)}")
    check_rank("indices", indices, 2, "(B, K)")
    if indices.shape[0] != x.shape[0]:
        raise InvalidInputError(f"indices has batch size {indices.shape[0]} but x has {x.shape[0]}")
    index = indices.reshape(*indices.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index)

"""Order-preserving top-k selection and batched gathering."""

from __future__ import annotations

import torch

from tokred.core.ops._checks import check_rank

__all__ = ["gather_tokens", "topk_indices"]


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

    Example:
        >>> import torch
        >>> from tokred.core.ops import topk_indices
        >>> topk_indices(torch.tensor([[0.1, 0.9, 0.5, 0.9]]), 2)
        tensor([[1, 3]])
    """
    check_rank("scores", scores, 2, "(B, N)")
    num_tokens = scores.shape[1]
    if not 0 <= k <= num_tokens:
        raise ValueError(f"k must be between 0 and N={num_tokens}; got {k}")
    if scores.dtype == torch.bool:
        scores = scores.to(torch.uint8)
    order = torch.sort(scores, dim=1, descending=largest, stable=True).indices
    return order[:, :k].sort(dim=1).values


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
        raise ValueError(f"x must have shape (B, N, ...); got shape {tuple(x.shape)}")
    check_rank("indices", indices, 2, "(B, K)")
    if indices.shape[0] != x.shape[0]:
        raise ValueError(f"indices has batch size {indices.shape[0]} but x has {x.shape[0]}")
    index = indices.reshape(*indices.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index)

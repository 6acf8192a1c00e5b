"""Cosine similarity between two batched token sets."""

from __future__ import annotations

import torch

from tokred.core.errors import InvalidInputError
from tokred.core.ops._checks import check_float, check_rank
from tokred.core.ops.precision import compute_dtype

__all__ = ["cosine_similarity"]


def cosine_similarity(a: torch.Tensor, b: torch.Tensor | None = None, *, eps: float = 1e-8) -> torch.Tensor:
    """Pairwise cosine similarity between the tokens of ``a`` and the tokens of ``b``, computed in fp32.

    A zero vector has similarity 0 with everything (instead of NaN), so degenerate tokens never poison an
    argmax.

    Args:
        a: Tokens of shape ``(B, N, C)``.
        b: Tokens of shape ``(B, M, C)``; ``a`` itself when omitted.
        eps: Lower bound on the norms used for normalisation.

    Returns:
        Similarities of shape ``(B, N, M)`` in fp32 (fp64 for fp64 inputs).

    Examples:
        >>> import torch
        >>> from tokred.core.ops import cosine_similarity
        >>> x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]])
        >>> cosine_similarity(x)[0]
        tensor([[ 1.,  0., -1.],
                [ 0.,  1.,  0.],
                [-1.,  0.,  1.]])
    """
    check_rank("a", a, 3, "(B, N, C)")
    check_float("a", a)
    b = a if b is None else b
    check_rank("b", b, 3, "(B, M, C)")
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise InvalidInputError(f"a and b must share B and C; got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    dtype = compute_dtype(a)
    a32 = a.to(dtype)
    a_unit = a32 / a32.norm(dim=-1, keepdim=True).clamp_min(eps)
    if b is a:
        b_unit = a_unit
    else:
        b32 = b.to(dtype)
        b_unit = b32 / b32.norm(dim=-1, keepdim=True).clamp_min(eps)
    return a_unit @ b_unit.transpose(1, 2)

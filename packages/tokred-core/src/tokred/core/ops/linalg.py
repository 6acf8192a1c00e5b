"""Batched ridge least squares and projection residuals, solved in fp32."""

from __future__ import annotations

import torch

from tokred.core.errors import InvalidInputError
from tokred.core.ops._checks import check_float, check_rank
from tokred.core.ops.precision import compute_dtype

__all__ = ["projection_residual", "ridge_least_squares"]


def ridge_least_squares(basis: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-5) -> torch.Tensor:
    r"""Coefficients that best reconstruct every target token from the basis tokens, with a ridge penalty.

    For each row solves :math:`W = X S^\top (S S^\top + \lambda I)^{-1}`, the minimiser of
    :math:`\lVert X - W S \rVert_F^2 + \lambda \lVert W \rVert_F^2`, where ``S`` is the basis and ``X`` the targets.
    The ``k x k`` Gram system is factorised by Cholesky in fp32 (fp64 stays fp64). Rows whose Gram matrix is
    singular (``ridge=0`` with repeated or too few distinct basis tokens) fall back to the pseudo-inverse, so
    rank-deficient inputs give the minimum-norm solution instead of an error.

    Args:
        basis: Basis tokens ``S`` of shape ``(B, k, C)``.
        targets: Tokens ``X`` to approximate, shape ``(B, N, C)``.
        ridge: :math:`\lambda \ge 0`, added to the Gram diagonal (ApET uses ``1e-5``).

    Returns:
        Coefficients ``W`` of shape ``(B, N, k)`` in fp32 (fp64 for fp64 inputs), so that
        ``W @ basis`` approximates ``targets``.

    Examples:
        >>> import torch
        >>> from tokred.core.ops import ridge_least_squares
        >>> S = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
        >>> X = torch.tensor([[[2.0, 3.0, 5.0]]])
        >>> ridge_least_squares(S, X, ridge=0.0)
        tensor([[[2., 3.]]])
    """
    check_rank("basis", basis, 3, "(B, k, C)")
    check_rank("targets", targets, 3, "(B, N, C)")
    check_float("basis", basis)
    check_float("targets", targets)
    if basis.shape[0] != targets.shape[0] or basis.shape[2] != targets.shape[2]:
        raise InvalidInputError(
            f"basis and targets must share B and C; got shapes {tuple(basis.shape)} and {tuple(targets.shape)}"
        )
    if not ridge >= 0.0:
        raise InvalidInputError(f"ridge must be >= 0; got {ridge}")
    dtype = compute_dtype(basis)
    s = basis.to(dtype)
    x = targets.to(dtype)
    k = s.shape[1]
    gram = s @ s.transpose(1, 2)  # (B, k, k)
    if ridge:
        gram = gram + ridge * torch.eye(k, dtype=dtype, device=s.device)
    rhs = s @ x.transpose(1, 2)  # (B, k, N)
    chol, info = torch.linalg.cholesky_ex(gram)
    solution = torch.cholesky_solve(rhs, chol)  # (B, k, N)
    singular = info != 0
    if bool(singular.any()):
        # Only the failed rows pay for the SVD; hermitian=True keeps it symmetric and real.
        fallback = torch.linalg.pinv(gram[singular], hermitian=True) @ rhs[singular]
        solution = solution.clone()
        solution[singular] = fallback
    return solution.transpose(1, 2)


def projection_residual(tokens: torch.Tensor, basis: torch.Tensor, ridge: float = 1e-5) -> torch.Tensor:
    """L2 norm of what the basis cannot explain of each token: ``|| x_i - W_i S ||``.

    This is ApET's importance score: tokens far from the span of the basis carry information the basis
    lacks. Computed in fp32 whatever the input dtype.

    Args:
        tokens: Tokens ``X`` of shape ``(B, N, C)``.
        basis: Basis tokens ``S`` of shape ``(B, k, C)``.
        ridge: Ridge penalty passed to [`ridge_least_squares`][tokred.core.ops.linalg.ridge_least_squares].

    Returns:
        Residual norms of shape ``(B, N)`` in fp32 (fp64 for fp64 inputs).

    Examples:
        >>> import torch
        >>> from tokred.core.ops import projection_residual
        >>> S = torch.tensor([[[1.0, 0.0]]])
        >>> X = torch.tensor([[[3.0, 4.0], [2.0, 0.0]]])
        >>> projection_residual(X, S, ridge=0.0)
        tensor([[4., 0.]])
    """
    coeffs = ridge_least_squares(basis, tokens, ridge)  # (B, N, k)
    approx = coeffs @ basis.to(coeffs.dtype)  # (B, N, C)
    return (tokens.to(coeffs.dtype) - approx).norm(dim=-1)

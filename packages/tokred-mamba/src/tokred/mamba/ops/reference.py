"""The selective scan of Mamba-1 (S6) as a plain loop over time: the specification and the test oracle.

Shapes: ``B`` batch, ``D`` channels (``d_inner``), ``L`` sequence length, ``N`` state size (``d_state``).

Every faster backend ([`selective_scan_chunked`][tokred.mamba.ops.selective_scan_chunked], mamba-ssm's CUDA
kernel) is tested against [`selective_scan_reference`][tokred.mamba.ops.selective_scan_reference]; it is
written for clarity, one sequential step per token, and is slow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokred.core.ops import compute_dtype
from tokred.mamba.ops.delta import prepare_delta

__all__ = ["selective_scan_reference"]


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """The selective scan as a sequential loop over ``L``: the specification and the test oracle.

    Same semantics as mamba-ssm's ``selective_scan_ref``: with ``Δ = softplus(delta + delta_bias)`` (or the
    raw sum when ``delta_softplus`` is False; see [`prepare_delta`][tokred.mamba.ops.prepare_delta]),

    ``h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t``,  ``y_t = C_t · h_t + D ⊙ u_t``,  and ``y_t *= silu(z_t)``.

    Computes in fp32 (fp64 for fp64 ``u``) and returns the dtype of ``u``. The inputs are not validated;
    [`selective_scan`][tokred.mamba.ops.selective_scan] does that before calling it.

    Args:
        u: Input ``(B, D, L)``.
        delta: Timescale before the bias and softplus, ``(B, D, L)``.
        A: State matrix (diagonal per channel) ``(D, N)``, usually ``-exp(A_log)``.
        B: Input projection per step ``(B, N, L)``.
        C: Output projection per step ``(B, N, L)``.
        D: Optional skip ``(D,)``.
        z: Optional gate ``(B, D, L)``.
        delta_bias: Optional ``(D,)`` added to ``delta``.
        delta_softplus: Apply softplus to ``delta + delta_bias``.

    Returns:
        ``y`` of shape ``(B, D, L)`` in the dtype of ``u``.
    """
    out_dtype = u.dtype
    dtype = compute_dtype(u)
    delta = prepare_delta(delta, delta_bias, delta_softplus, dtype=dtype)
    u, A, B, C = (t.to(dtype) for t in (u, A, B, C))
    batch, channels, length = u.shape
    state = u.new_zeros(batch, channels, A.shape[1])  # (B, D, N)
    ys = []
    for t in range(length):
        decay = torch.exp(delta[:, :, t, None] * A)  # (B, D, N)
        state = decay * state + (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]
        ys.append((state * C[:, None, :, t]).sum(dim=-1))  # (B, D)
    y = torch.stack(ys, dim=-1)  # (B, D, L)
    if D is not None:
        y = y + u * D.to(dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(out_dtype)

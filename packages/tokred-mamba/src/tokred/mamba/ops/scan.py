"""The selective scan of Mamba-1 (S6), with interchangeable backends.

Shapes: ``B`` batch, ``D`` channels (``d_inner``), ``L`` sequence length, ``N`` state size (``d_state``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["selective_scan", "selective_scan_reference"]

Backend = Literal["reference"]


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
    raw sum when ``delta_softplus`` is False),

    ``h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t``,  ``y_t = C_t · h_t + D ⊙ u_t``,  and ``y_t *= silu(z_t)``.

    Computes in fp32 and returns the dtype of ``u``.

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
    dtype = u.dtype
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, channels, length = u.shape
    state = u.new_zeros(batch, channels, A.shape[1])  # (B, D, N)
    ys = []
    for t in range(length):
        decay = torch.exp(delta[:, :, t, None] * A)  # (B, D, N)
        state = decay * state + (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]
        ys.append((state * C[:, None, :, t]).sum(dim=-1))  # (B, D)
    y = torch.stack(ys, dim=-1)  # (B, D, L)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Run the selective scan with the chosen backend; arguments as :func:`selective_scan_reference`."""
    if backend in ("reference", "auto"):  # "auto" picks the fastest available backend once they exist
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    raise ValueError(f"unknown scan backend {backend!r}; available: 'reference'")

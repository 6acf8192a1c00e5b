"""The discretised timescale Δ of the selective scan, computed in one place.

Shapes: ``B`` batch, ``D`` channels (``d_inner``), ``L`` sequence length.

Every pure-PyTorch scan, and the Mamba mixer when it hands Δ out, goes through
[`prepare_delta`][tokred.mamba.ops.prepare_delta], so that the Δ a caller sees is bit for bit the Δ a scan
consumed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokred.core.ops import compute_dtype

__all__ = ["prepare_delta"]


def prepare_delta(
    delta: torch.Tensor,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The timescale ``Δ = softplus(delta + delta_bias)`` that the selective scan discretises with.

    Without ``delta_softplus`` the plain sum ``delta + delta_bias`` is returned, and without ``delta_bias``
    ``delta`` itself (cast to ``dtype``). Differentiable; the inputs are not modified.

    Args:
        delta: Timescale before the bias and softplus, ``(B, D, L)``.
        delta_bias: Optional per-channel bias ``(D,)``, added along ``L``.
        delta_softplus: Apply softplus to ``delta + delta_bias``.
        dtype: The dtype to compute and return in; default fp32, or fp64 when ``delta`` or ``delta_bias``
            is fp64 ([`compute_dtype`][tokred.core.ops.compute_dtype]).

    Returns:
        ``Δ`` of shape ``(B, D, L)`` in ``dtype``.

    Examples:
        >>> import torch
        >>> from tokred.mamba.ops import prepare_delta
        >>> delta = torch.zeros(1, 2, 3, dtype=torch.float16)
        >>> dt = prepare_delta(delta, torch.tensor([0.0, 1.0]), delta_softplus=True)
        >>> dt.shape, dt.dtype
        (torch.Size([1, 2, 3]), torch.float32)
        >>> torch.allclose(dt[0, :, 0], torch.log1p(torch.exp(torch.tensor([0.0, 1.0]))))
        True
    """
    if dtype is None:
        dtype = compute_dtype(delta, delta_bias)
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta

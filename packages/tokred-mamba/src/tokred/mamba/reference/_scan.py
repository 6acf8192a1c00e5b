"""A selective scan with a hand-written backward, for training the reference model on the CPU.

Shapes: ``B`` batch, ``E`` channels (``d_inner``), ``L`` sequence length, ``N`` state size.

The chunked backend of :mod:`tokred.mamba.ops.scan` is fast without autograd, but under autograd it runs a
functional variant whose backward is far slower than its forward: each time step indexes the whole
``(T, nc, B, N, E)`` intermediates, and autograd gives every such slice a full-size, zero-filled gradient.
:func:`trainable_selective_scan` has a hand-written backward instead: the recurrence runs once forwards and
keeps its states, the adjoint recurrence runs once backwards, each one in-place multiply-add per time step,
and everything else is whole-tensor products. :func:`training_scan` swaps it into the Mamba mixers while
gradients are on.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from tokred.mamba.layers import mixer as _mixer

__all__ = ["trainable_selective_scan", "training_scan"]

_LOG2E = math.log2(math.e)


_FLOOR = math.log2(torch.finfo(torch.float32).tiny)


class _ScanFunction(torch.autograd.Function):
    """``y_t = Σ_n C_t h_t`` with ``h_t = exp(Δ_t A) ⊙ h_{t-1} + x_t B_t``; inputs and output in ``(B, ·, L)``.

    Everything but the recurrence itself is done on whole ``(B, L, N, E)`` tensors (channels last, so every
    product is contiguous along ``E``); the recurrence is one in-place multiply-add per time step, forwards for
    the states and backwards for their adjoints. The forward keeps the states and the decays for the backward.
    Decay exponents are floored at the smallest normal float: the CPU's denormal path is many times slower,
    and a decay of ``2^-126`` instead of less changes nothing at fp32 resolution.
    """

    @staticmethod
    def forward(ctx, delta, x, a, b, c):
        length = delta.shape[2]
        dl = delta.transpose(1, 2).contiguous()  # (B, L, E)
        xl = x.transpose(1, 2).contiguous()  # (B, L, E)
        bl = b.transpose(1, 2).contiguous()  # (B, L, N)
        cl = c.transpose(1, 2).contiguous()  # (B, L, N)
        a2 = (a * _LOG2E).t().contiguous()  # (N, E): exp(ΔA) = 2^(Δ·A·log2 e), and exp2 is the cheaper one
        dec = torch.mul(dl[:, :, None, :], a2).clamp_(min=_FLOOR).exp2_()  # (B, L, N, E)
        h = torch.mul(xl[:, :, None, :], bl[..., None])  # (B, L, N, E): x_t B_t, then the states
        for t in range(1, length):
            h[:, t].addcmul_(dec[:, t], h[:, t - 1])
        y = torch.matmul(cl[:, :, None, :], h).squeeze(2)  # (B, L, E)
        ctx.save_for_backward(dl, xl, bl, cl, a2, h, dec)
        # Contiguous in the caller's layout: the gate and skip that follow are elementwise, and mixed strides
        # would slow them (and their backward) several times.
        return y.transpose(1, 2).contiguous()  # (B, E, L)

    @staticmethod
    def backward(ctx, dy):
        dl, xl, bl, cl, a2, h, dec = ctx.saved_tensors
        length = h.shape[1]
        dyl = dy.transpose(1, 2).contiguous()  # (B, L, E)
        dc = torch.mul(h, dyl[:, :, None, :]).sum(-1)  # (B, L, N)
        # The adjoint states g_t = dL/dh_t = C_t dy_t + exp(Δ_{t+1} A) g_{t+1}, from the last step back.
        g = torch.mul(cl[..., None], dyl[:, :, None, :])  # (B, L, N, E)
        for t in range(length - 2, -1, -1):
            g[:, t].addcmul_(dec[:, t + 1], g[:, t + 1])
        dx = torch.matmul(bl[:, :, None, :], g).squeeze(2)  # (B, L, E)
        db = torch.mul(g, xl[:, :, None, :]).sum(-1)  # (B, L, N)
        # d(Δ_t A) = g_t ⊙ h_{t-1} ⊙ exp(Δ_t A) for t >= 1 (h_{-1} = 0).
        p = torch.mul(dec[:, 1:], g[:, 1:]).mul_(h[:, :-1])  # (B, L-1, N, E)
        ddelta = torch.zeros_like(dl)
        ddelta[:, 1:] = torch.mul(p, a2).sum(2).mul_(1.0 / _LOG2E)
        da = torch.mul(p, dl[:, 1:, None, :]).sum((0, 1))  # (N, E)

        def caller_layout(t: torch.Tensor) -> torch.Tensor:
            return t.transpose(1, 2).contiguous()

        return caller_layout(ddelta), caller_layout(dx), da.t(), caller_layout(db), caller_layout(dc)


def trainable_selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    **unused: object,
) -> torch.Tensor:
    """The selective scan with the semantics of :func:`tokred.mamba.ops.selective_scan`, fast to differentiate.

    Computes in fp32. Memory: the states ``(L, B, N, E)`` are kept for the backward pass.

    Args:
        u: Input ``(B, E, L)``.
        delta: Timescale before the bias and softplus, ``(B, E, L)``.
        A: State matrix (diagonal per channel) ``(E, N)``, usually ``-exp(A_log)``.
        B: Input projection per step ``(B, N, L)``.
        C: Output projection per step ``(B, N, L)``.
        D: Optional skip ``(E,)``.
        z: Optional gate ``(B, E, L)``.
        delta_bias: Optional ``(E,)`` added to ``delta``.
        delta_softplus: Apply softplus to ``delta + delta_bias``.
        **unused: Ignored (``backend``), so that it can stand in for ``selective_scan``.

    Returns:
        ``y`` ``(B, E, L)`` in the dtype of ``u``.
    """
    dtype = u.dtype
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    y = _ScanFunction.apply(delta, delta * u, A, B, C)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


@contextlib.contextmanager
def training_scan() -> Iterator[None]:
    """Within the block, Mamba mixers use :func:`trainable_selective_scan` for CPU tensors under autograd.

    Without gradients (evaluation inside a training run), and on GPUs (where the library's vectorised scan is
    the faster one to differentiate), they keep the library's own scan. The previous scan is restored on exit.
    """
    original = _mixer.selective_scan

    def dispatch(*args: object, **kwargs: object) -> torch.Tensor:
        u = args[0] if args else kwargs["u"]
        if torch.is_grad_enabled() and u.device.type == "cpu":
            return trainable_selective_scan(*args, **kwargs)
        return original(*args, **kwargs)

    _mixer.selective_scan = dispatch
    try:
        yield
    finally:
        _mixer.selective_scan = original

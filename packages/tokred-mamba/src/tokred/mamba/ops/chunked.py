"""The ``"chunked"`` backend: the selective scan in pure PyTorch, fast on CPU and usable on GPU.

Shapes: ``B`` batch, ``D`` channels (``d_inner``), ``L`` sequence length, ``N`` state size (``d_state``).
Inside the kernels the channels go last, so that every elementwise product is contiguous along ``D``; ``T``
is the chunk length and ``nc`` the number of chunks.

[`selective_scan_chunked`][tokred.mamba.ops.selective_scan_chunked] computes what
[`selective_scan_reference`][tokred.mamba.ops.selective_scan_reference] computes, along one of three paths:

* buffered: no gradient is needed; the chunked three-pass scan in reused cache-sized buffers, the fast path.
* hand-written backward: gradients are needed on CPU; a `torch.autograd.Function` that runs the recurrence
  forwards once keeping its states, and the adjoint recurrence backwards once.
* functional: gradients are needed on another device, or `torch.compile` is tracing; the three passes of the
  buffered path written without ``out=`` or in-place ops, which autograd and the compiler can follow.
"""

from __future__ import annotations

import math
import threading
from typing import Literal

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from tokred.core.errors import InvalidInputError
from tokred.core.ops import compute_dtype
from tokred.mamba.ops._checks import check_scan_inputs
from tokred.mamba.ops.delta import prepare_delta

__all__ = ["DEFAULT_BLOCK_ELEMENTS_CPU", "DEFAULT_BLOCK_ELEMENTS_CUDA", "DEFAULT_CHUNK_SIZE", "selective_scan_chunked"]

DEFAULT_CHUNK_SIZE = 20
"""Shortest default chunk (fastest at Vim's ``L = 197``); ``√L`` for longer sequences."""
DEFAULT_BLOCK_ELEMENTS_CPU = 1 << 21
"""Elements per work buffer of the buffered path on CPU: two 8 MiB fp32 buffers stay in a typical L3 cache."""
DEFAULT_BLOCK_ELEMENTS_CUDA = 1 << 26
"""Elements per work buffer on GPU, where kernel launches, not caches, set the cost."""

_LOG2E = math.log2(math.e)
_workspaces = threading.local()
# Elements kept per slot: two default CPU blocks with their per-chunk state; Vim-S inputs at batch 8.
_WORKSPACE_MAX = {"block": 9 << 20, "stage": 4 << 20}

_Path = Literal["buffered", "autograd", "functional"]


def _chunk_layout(length: int, chunk_size: int) -> tuple[int, int]:
    """``(T, nc)``: chunk length and chunk count with ``T * nc >= L`` and less than ``nc`` padded steps."""
    chunks = -(-length // min(chunk_size, length))
    return -(-length // chunks), chunks


def _time_major(t: torch.Tensor, chunk: int, chunks: int) -> torch.Tensor:
    """``(B, K, L)`` → ``(T, nc, B, K)`` contiguous, zero-padded to ``T·nc`` steps."""
    pad = chunk * chunks - t.shape[-1]
    if pad:
        t = F.pad(t, (0, pad))
    return t.reshape(t.shape[0], t.shape[1], chunks, chunk).permute(3, 2, 0, 1).contiguous()


def _steps_last(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write ``(B, K, L)`` into ``out`` ``(B, steps, K)`` transposed, zero after ``L``; returns ``out``.

    A plain 2-D transpose per batch, several times cheaper than permuting straight into ``(T, nc, B, K)``.
    """
    length = t.shape[-1]
    out[:, length:].zero_()
    out[:, :length].copy_(t.transpose(1, 2))
    return out


def _workspace(like: torch.Tensor, numel: int, slot: str) -> torch.Tensor:
    """A flat scratch tensor of ``numel`` elements; on CPU reused across calls, per thread, dtype and slot.

    Paging in fresh memory costs up to a third of the scan's arithmetic on CPU (glibc hands large freed blocks
    back to the OS), so the CPU keeps its scratch: slot ``"block"`` (the two work buffers, about 18 MiB in fp32
    at the default block size) and slot ``"stage"`` (the time-major inputs, ``B·L·D`` sized). A request above
    the slot's cap in ``_WORKSPACE_MAX`` is allocated afresh and not kept. GPU memory goes through PyTorch's
    caching allocator instead.
    """
    if like.device.type != "cpu" or numel > _WORKSPACE_MAX[slot]:
        return like.new_empty(numel)
    cache = getattr(_workspaces, "buffers", None)
    if cache is None:
        cache = _workspaces.buffers = {}
    buffer = cache.get((like.dtype, slot))
    if buffer is None or buffer.numel() < numel:
        # Made outside inference mode: an inference tensor could not be updated in place outside it.
        with torch.inference_mode(False):
            buffer = cache[like.dtype, slot] = torch.empty(numel, dtype=like.dtype)
    return buffer[:numel]


def _scan_buffered(
    delta: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    block_elements: int,
) -> torch.Tensor:
    """``Σ_n C·h`` for ``h_t = exp(Δ_t A) h_{t-1} + x_t B_t``, without autograd. Returns ``(B, D, L)``, strided.

    Works block by block, a block being some batch rows times a run of consecutive chunks, with two reused
    ``(T, chunks, rows, N, D)`` buffers: the working set stays in cache and no large allocation is paged in per
    call. Blocks of the same rows go in time order, each handing its final state to the next.
    """
    batch, channels, length = delta.shape
    state = A.shape[1]
    chunk, chunks = _chunk_layout(length, chunk_size)
    steps = chunk * chunks

    span = batch * steps * channels
    stage = _workspace(delta, 2 * span + chunks * batch * state * channels, "stage")

    def time_major(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:  # (B, K, L) -> (T, nc, B, K), K contiguous
        out = _steps_last(t, out.view(batch, steps, t.shape[1]))
        return out.view(batch, chunks, chunk, t.shape[1]).permute(2, 1, 0, 3)

    dl = time_major(delta, stage[:span])  # (T, nc, B, D)
    xl = time_major(x, stage[span : 2 * span])  # (T, nc, B, D)
    bl = time_major(B, B.new_empty(batch * steps * state))  # (T, nc, B, N)
    cl = time_major(C, C.new_empty(batch * steps * state)).contiguous()  # (T, nc, B, N)
    # exp(Δ A) = 2^(Δ · A log2 e): exp2 is about twice as fast as exp on CPU.
    a2 = (A * _LOG2E).t().contiguous()  # (N, D), channels last so that every product is contiguous along D
    # Decays below the smallest normal number are raised to it: the CPU's denormal path is 10-50x slower, and
    # a decay of 2^-126 instead of less changes nothing at fp32 resolution. The per-step clamp costs a pass,
    # so it runs only when the ranges of Δ and A say that such decays can occur; GPUs take denormals at full
    # speed. Chunk totals are 1/T of the size and always clamped.
    floor = math.log2(torch.finfo(delta.dtype).tiny)
    clamp = False
    if delta.device.type == "cpu":
        dmin, dmax = delta.amin(dim=(0, 2)), delta.amax(dim=(0, 2))  # (D,)
        amin, amax = a2.amin(dim=0), a2.amax(dim=0)  # (D,)
        lowest = torch.minimum(torch.minimum(dmin * amin, dmin * amax), torch.minimum(dmax * amin, dmax * amax))
        clamp = bool(lowest.min() < floor)
    # Each chunk's total decay exp(A Σ_chunk Δ), for carrying states across chunk boundaries.
    tot = stage[2 * span :].view(chunks, batch, state, channels)  # (nc, B, N, D)
    torch.mul(dl.sum(0)[:, :, None, :], a2, out=tot).clamp_(min=floor).exp2_()

    # A block takes batch rows first, then chunks: with every row in a block, one-chunk blocks need neither
    # pass 1 nor pass 2 and each sequential op covers the whole batch (fewer, larger ops); with few rows, many
    # chunks per block keep the sequential op count near 2T + nc.
    per_chunk = chunk * state * channels  # buffer elements per (batch row, chunk)
    fit = max(1, block_elements // per_chunk)
    bw = min(batch, fit)
    bw = -(-batch // -(-batch // bw))  # even split of the batch into the fewest blocks
    group = min(chunks, max(1, fit // bw))
    group = -(-chunks // -(-chunks // group))  # even split of the chunks into the fewest blocks
    size = chunk * group * bw * state * channels
    small = group * bw * state * channels
    work = _workspace(delta, 2 * size + 2 * small + bw * state * channels + chunk * group * bw * channels, "block")
    dec_buf, bu_buf, hend_buf, hin_buf, carry_buf, y_buf = work.split(
        [size, size, small, small, bw * state * channels, chunk * group * bw * channels]
    )
    y = delta.new_empty(batch, chunks, chunk, channels)

    for b0 in range(0, batch, bw):
        b1 = min(batch, b0 + bw)
        w = b1 - b0
        started = False  # whether carry_buf holds the state entering this block (the previous one's last)
        for c0 in range(0, chunks, group):
            c1 = min(chunks, c0 + group)
            g = c1 - c0
            full = (chunk, g, w, state, channels)
            part = (g, w, state, channels)
            dec = dec_buf[: math.prod(full)].view(full)
            bu = bu_buf[: math.prod(full)].view(full)
            torch.mul(dl[:, c0:c1, b0:b1, None, :], a2, out=dec)
            if clamp:
                dec.clamp_(min=floor)
            dec.exp2_()
            torch.mul(xl[:, c0:c1, b0:b1, None, :], bl[:, c0:c1, b0:b1, :, None], out=bu)

            # Pass 1: every chunk but the last from a zero state, all at once; keeps only the chunk-end states
            # (the last chunk's is never needed: the next block starts from the pass-3 state).
            hend = hend_buf[: math.prod(part)].view(part)[: g - 1]
            if g > 1:
                if chunk == 1:
                    hend.copy_(bu[0, : g - 1])
                else:
                    torch.addcmul(bu[1, : g - 1], dec[1, : g - 1], bu[0, : g - 1], out=hend)
                    for t in range(2, chunk):
                        torch.addcmul(bu[t, : g - 1], dec[t, : g - 1], hend, out=hend)

            # Pass 2: carry the true state across chunk boundaries, a chunk's total decay at a time.
            hin = hin_buf[: math.prod(part)].view(part)
            if started:
                hin[0].copy_(carry_buf[: w * state * channels].view(w, state, channels))
            else:
                hin[0].zero_()
            for c in range(1, g):
                torch.addcmul(hend[c - 1], tot[c0 + c - 1, b0:b1], hin[c - 1], out=hin[c])

            # Pass 3: rescan every chunk from its true start state, writing the states over bu.
            prev = hin
            for t in range(chunk):
                torch.addcmul(bu[t], dec[t], prev, out=bu[t])
                prev = bu[t]
            if c1 < chunks:
                carry_buf[: w * state * channels].view(w, state, channels).copy_(bu[chunk - 1, g - 1])
                started = True
            yb = y_buf[: chunk * g * w * channels].view(chunk * g * w, 1, channels)
            torch.bmm(cl[:, c0:c1, b0:b1].reshape(-1, 1, state), bu.view(-1, state, channels), out=yb)
            y[b0:b1, c0:c1] = yb.view(chunk, g, w, channels).permute(2, 1, 0, 3)
    return y.view(batch, steps, channels)[:, :length].transpose(1, 2)


def _scan_functional(
    delta: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """The three passes of ``_scan_buffered`` without ``out=`` or in-place ops; returns ``(B, D, L)``.

    Autograd and ``torch.compile`` can follow it. Whole-size intermediates, no blocking.
    """
    batch, channels, length = delta.shape
    chunk, chunks = _chunk_layout(length, chunk_size)
    floor = math.log2(torch.finfo(delta.dtype).tiny)
    dl = _time_major(delta, chunk, chunks)  # (T, nc, B, D)
    xl = _time_major(x, chunk, chunks)
    bl = _time_major(B, chunk, chunks)  # (T, nc, B, N)
    cl = _time_major(C, chunk, chunks)
    a2 = (A * _LOG2E).t()  # (N, D)
    dec = torch.exp2(torch.clamp(dl[:, :, :, None, :] * a2, min=floor))  # (T, nc, B, N, D)
    bu = xl[:, :, :, None, :] * bl[..., None]  # (T, nc, B, N, D)
    hend = bu[0]
    for t in range(1, chunk):
        hend = torch.addcmul(bu[t], dec[t], hend)
    tot = torch.exp2(torch.clamp(dl.sum(0)[:, :, None, :] * a2, min=floor))  # (nc, B, N, D)
    carried = [torch.zeros_like(hend[0])]
    for c in range(1, chunks):
        carried.append(torch.addcmul(hend[c - 1], tot[c - 1], carried[-1]))
    prev = torch.stack(carried)  # (nc, B, N, D)
    states = []
    for t in range(chunk):
        prev = torch.addcmul(bu[t], dec[t], prev)
        states.append(prev)
    y = torch.matmul(cl[:, :, :, None, :], torch.stack(states)).squeeze(-2)  # (T, nc, B, D)
    return y.permute(2, 3, 1, 0).reshape(batch, channels, chunk * chunks)[..., :length]


def _log2_decay_rate(a: torch.Tensor) -> torch.Tensor:
    """``A log2 e`` as ``(N, D)``: ``exp(ΔA) = 2^(Δ · A log2 e)``, and exp2 is the cheaper one on CPU."""
    return (a * _LOG2E).t().contiguous()


class _StatefulScan(torch.autograd.Function):
    """``y_t = Σ_n C_t h_t`` with ``h_t = exp(Δ_t A) ⊙ h_{t-1} + x_t B_t``, with a hand-written backward.

    Inputs ``delta``, ``x`` ``(B, D, L)``, ``a`` ``(D, N)``, ``b``, ``c`` ``(B, N, L)``; output ``(B, D, L)``.
    Autograd through ``_scan_functional`` is several times slower than its forward on CPU: each time step
    indexes whole ``(T, nc, B, N, D)`` intermediates, and autograd gives every such slice a full-size,
    zero-filled gradient. Here the recurrence runs once forwards over ``(B, L, N, D)`` tensors and keeps its
    states, the adjoint recurrence once backwards, each one in-place multiply-add per step; everything else is
    whole-tensor products. Memory: two ``(B, L, N, D)`` tensors (states and decays) are kept for the backward.

    Decay exponents are floored at the smallest normal float, as in the buffered path. The backward treats
    the floor as absent: where it bites, the decay and its derivative are below the dtype's resolution anyway.
    """

    @staticmethod
    def forward(delta, x, a, b, c):
        length = delta.shape[2]
        floor = math.log2(torch.finfo(delta.dtype).tiny)
        dl = delta.transpose(1, 2).contiguous()  # (B, L, D)
        xl = x.transpose(1, 2).contiguous()  # (B, L, D)
        bl = b.transpose(1, 2).contiguous()  # (B, L, N)
        cl = c.transpose(1, 2).contiguous()  # (B, L, N)
        dec = torch.mul(dl[:, :, None, :], _log2_decay_rate(a)).clamp_(min=floor).exp2_()  # (B, L, N, D)
        h = torch.mul(xl[:, :, None, :], bl[..., None])  # (B, L, N, D): x_t B_t, overwritten by the states
        for t in range(1, length):
            h[:, t].addcmul_(dec[:, t], h[:, t - 1])
        y = torch.matmul(cl[:, :, None, :], h).squeeze(2)  # (B, L, D)
        # Contiguous in the caller's layout: the gate and skip that follow are elementwise, and mixed strides
        # would slow them (and their backward) several times.
        return y.transpose(1, 2).contiguous(), h, dec  # (B, D, L), (B, L, N, D), (B, L, N, D)

    @staticmethod
    def setup_context(ctx, inputs, output):
        # States and decays come out of forward, not through ctx, so that torch.func's transforms accept the
        # Function; they are outputs nobody differentiates.
        _, h, dec = output
        ctx.mark_non_differentiable(h, dec)
        ctx.save_for_backward(*inputs, h, dec)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dh, _ddec):
        delta, x, a, b, c, h, dec = ctx.saved_tensors
        dl = delta.transpose(1, 2).contiguous()  # (B, L, D)
        xl = x.transpose(1, 2).contiguous()  # (B, L, D)
        bl = b.transpose(1, 2).contiguous()  # (B, L, N)
        cl = c.transpose(1, 2).contiguous()  # (B, L, N)
        a2 = _log2_decay_rate(a)  # (N, D)
        need_delta, need_x, need_a, need_b, need_c = ctx.needs_input_grad
        length = h.shape[1]
        ddelta = dx = da = db = dc = None
        dyl = dy.transpose(1, 2).contiguous()  # (B, L, D)
        if need_c:
            dc = torch.mul(h, dyl[:, :, None, :]).sum(-1)  # (B, L, N)
        if need_delta or need_x or need_a or need_b:
            # The adjoint states g_t = dL/dh_t = C_t dy_t + exp(Δ_{t+1} A) g_{t+1}, from the last step back.
            g = torch.mul(cl[..., None], dyl[:, :, None, :])  # (B, L, N, D)
            for t in range(length - 2, -1, -1):
                g[:, t].addcmul_(dec[:, t + 1], g[:, t + 1])
            if need_x:
                dx = torch.matmul(bl[:, :, None, :], g).squeeze(2)  # (B, L, D)
            if need_b:
                db = torch.mul(g, xl[:, :, None, :]).sum(-1)  # (B, L, N)
            if need_delta or need_a:
                # d(Δ_t A) = g_t ⊙ h_{t-1} ⊙ exp(Δ_t A) for t >= 1 (h_{-1} = 0), written over g, which is spent.
                p = g[:, 1:].mul_(dec[:, 1:]).mul_(h[:, :-1])  # (B, L-1, N, D)
                if need_delta:
                    ddelta = torch.zeros_like(dl)
                    ddelta[:, 1:] = torch.mul(p, a2).sum(2).mul_(1.0 / _LOG2E)
                if need_a:
                    da = torch.mul(p, dl[:, 1:, None, :]).sum((0, 1)).t()  # (D, N)

        def caller_layout(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.transpose(1, 2).contiguous()

        return caller_layout(ddelta), caller_layout(dx), da, caller_layout(db), caller_layout(dc)


def _pick_path(device: torch.device, *tensors: torch.Tensor | None) -> _Path:
    """Which implementation runs for inputs on ``device``; see the docstring of ``selective_scan_chunked``."""
    if torch.compiler.is_compiling():
        return "functional"
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        return "buffered"
    return "autograd" if device.type == "cpu" else "functional"


def selective_scan_chunked(
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
    chunk_size: int | None = None,
    block_elements: int | None = None,
) -> torch.Tensor:
    """The selective scan in pure PyTorch, fast on CPU and usable on GPU; the ``"chunked"`` backend.

    ``L`` is cut into ``nc`` chunks of ``T`` steps (``T ≈ chunk_size``, balanced so that less than ``nc`` steps
    are padding). Three passes replace the ``L`` sequential steps of
    [`selective_scan_reference`][tokred.mamba.ops.selective_scan_reference]: every chunk is scanned from a zero
    state, all chunks side by side (``T`` steps); the true state entering each chunk is carried across the
    boundaries with the chunk's total decay ``exp(A Σ Δ)`` (``nc`` steps); every chunk is rescanned from that
    state (``T`` steps). Each step multiplies by decays ``exp(Δ_t A) ≤ 1`` (for ``A ≤ 0``), so nothing is ever
    divided by a small decay or exponentiated upward: it is exactly the reference recurrence, reordered, and
    agrees with it to rounding.

    The work goes in blocks of batch rows × consecutive chunks, rows first: with the whole batch in a block,
    one-chunk blocks run the scan straight through in time (``L`` sequential ops over the whole batch); with
    few rows, the chunks of a block are scanned side by side (about ``2T + L/T`` sequential ops).

    Which implementation runs:

    * No gradient needed (grad mode off, or no input requires grad): the buffered scan above.
    * Gradients needed, tensors on CPU, ``torch.compile`` not tracing: a `torch.autograd.Function` with a
      hand-written backward. Its forward runs the recurrence straight through in time and keeps the states
      ``(B, L, N, D)``; its backward runs the adjoint recurrence. On CPU this differentiates several times
      faster than autograd through the functional variant. ``chunk_size`` and ``block_elements`` do not
      apply to it.
    * Gradients needed on another device (CUDA), or ``torch.compile`` tracing (with or without gradients):
      a functional variant of the three passes, without ``out=`` or in-place ops, with whole
      ``(B, D, L, N)`` intermediates, which autograd and the compiler can follow.

    Math in fp32 (fp64 for fp64 ``u``). exp is evaluated as exp2 (half the cost on CPU), and decays below
    the smallest normal float are raised to it (the CPU's denormal path is 10-50x slower); both change results
    only at rounding level. Memory of the buffered path: two work buffers of about ``block_elements`` elements
    and a few ``(B, D, L)`` tensors; on CPU the scratch memory (about 18 MiB fp32 at the defaults, 52 MiB at
    most) is kept per thread and reused, because paging in fresh memory costs as much as a third of the
    arithmetic.

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
        chunk_size: Target chunk length ``T``; default ``max(20, √L)`` (20 is the fastest on CPU at Vim's
            ``L = 197``).
        block_elements: Target elements per work buffer, ``T·N·D`` per (batch row, chunk); a block holds at
            least one. Default 2^21 on CPU (two buffers fit a typical L3 cache) and 2^26 on GPU.

    Returns:
        ``y`` of shape ``(B, D, L)`` in the dtype of ``u``, contiguous.

    Raises:
        InvalidTypeError: An argument is not a tensor.
        InvalidInputError: Inconsistent shapes, devices or dtypes, or a non-positive
            ``chunk_size``/``block_elements``.
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    return _chunked(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size=chunk_size, block_elements=block_elements
    )


def _chunked(
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
    chunk_size: int | None = None,
    block_elements: int | None = None,
) -> torch.Tensor:
    """[`selective_scan_chunked`][tokred.mamba.ops.selective_scan_chunked] on inputs already checked."""
    if chunk_size is None:
        chunk_size = max(DEFAULT_CHUNK_SIZE, math.isqrt(u.shape[-1]))
    if block_elements is None:
        block_elements = DEFAULT_BLOCK_ELEMENTS_CUDA if u.is_cuda else DEFAULT_BLOCK_ELEMENTS_CPU
    if chunk_size < 1 or block_elements < 1:
        raise InvalidInputError(
            f"chunk_size and block_elements must be positive, got {chunk_size} and {block_elements}"
        )
    path = _pick_path(u.device, u, delta, A, B, C, D, z, delta_bias)
    dtype = compute_dtype(u)
    out_dtype = u.dtype
    u, A, B, C = (t.to(dtype) for t in (u, A, B, C))
    delta = prepare_delta(delta, delta_bias, delta_softplus, dtype=dtype)
    x = delta * u
    if x.numel() == 0:
        return torch.zeros_like(u, dtype=out_dtype)
    if path == "buffered":
        # The buffered scan returns a transposed view of a fresh tensor: one copy makes it the contiguous
        # output, which the skip and the gate then update in place.
        y = _scan_buffered(delta, x, A, B, C, chunk_size, block_elements).contiguous()
        if D is not None:
            y.addcmul_(u, D.to(dtype)[:, None])
        if z is not None:
            y.mul_(F.silu(z.to(dtype)))
        return y.to(out_dtype)
    if path == "autograd":
        y = _StatefulScan.apply(delta, x, A, B, C)[0]
    else:
        y = _scan_functional(delta, x, A, B, C, chunk_size)
    if D is not None:
        y = torch.addcmul(y, u, D.to(dtype)[:, None])
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(out_dtype).contiguous()

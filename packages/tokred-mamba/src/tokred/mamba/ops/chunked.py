"""The ``"chunked"`` backend: the selective scan in pure PyTorch, fast on CPU and usable on GPU.

Shapes: ``B`` batch, ``D`` channels (``d_inner``), ``L`` sequence length, ``N`` state size (``d_state``).
Inside the kernels the channels go last, so that every elementwise product is contiguous along ``D``; ``T``
is the chunk length and ``nc`` the number of chunks.

[`selective_scan_chunked`][tokred.mamba.ops.selective_scan_chunked] computes what
[`selective_scan_reference`][tokred.mamba.ops.selective_scan_reference] computes, along one of three paths:

* buffered: no gradient is needed; the chunked three-pass scan in reused cache-sized buffers, the fast path.
* hand-written backward: gradients are needed on CPU; a `torch.autograd.Function` whose forward is the
  buffered scan keeping only the state entering each chunk, and whose backward recomputes each chunk's states
  from it and runs the adjoint recurrence chunk by chunk, last to first, in cache-sized buffers.
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
_BACKWARD_BLOCK_ELEMENTS = 1 << 19
"""Elements per work buffer of the hand-written backward, per thread: its four buffers stay in L2 and L3."""
_workspaces = threading.local()
# Elements kept per slot: two default CPU blocks with their per-chunk state; Vim-S inputs at batch 8; the
# backward of a Vim training step (d_inner 192, batch 32, L = 197).
_WORKSPACE_MAX = {"block": 9 << 20, "stage": 4 << 20, "y": 4 << 20, "backward": 12 << 20, "gate": 6 << 20}

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
    back to the OS), so the CPU keeps its scratch. The buffered scan's slots: ``"block"`` (the two work
    buffers, about 18 MiB in fp32 at the default block size), ``"stage"`` (the time-major inputs) and ``"y"``
    (its output before the copy into the caller's layout), each ``B·L·D`` sized or less. The hand-written
    backward's: ``"backward"`` (four cache-sized buffers and ten ``B·L·D``-sized or smaller steps-last copies)
    and ``"gate"`` (``Δ u``, ``silu(z)`` and the like, ``B·D·L`` each). A request above the slot's cap in
    ``_WORKSPACE_MAX`` is allocated afresh and not kept. GPU memory goes through PyTorch's caching allocator
    instead.
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


def _scratch(like: torch.Tensor, numel: int, slot: str) -> torch.Tensor:
    """``_workspace``, except under torch.func's transforms, which refuse writes into tensors made outside."""
    if torch._C._are_functorch_transforms_active():
        return like.new_empty(numel)
    return _workspace(like, numel, slot)


def _needs_floor(delta: torch.Tensor, a2: torch.Tensor, floor: float) -> bool:
    """Whether some ``Δ · A log2 e`` (``delta`` ``(B, D, L)``, ``a2`` ``(N, D)``) can fall below ``floor``.

    Only the CPU needs to know: the floor avoids its slow denormal path, and the per-step clamp costs a pass
    over ``(B, L, N, D)`` data, so it runs only where the ranges of Δ and A say that such decays can occur.
    """
    if delta.device.type != "cpu":
        return False
    dmin, dmax = delta.amin(dim=(0, 2)), delta.amax(dim=(0, 2))  # (D,)
    amin, amax = a2.amin(dim=0), a2.amax(dim=0)  # (D,)
    lowest = torch.minimum(torch.minimum(dmin * amin, dmin * amax), torch.minimum(dmax * amin, dmax * amax))
    return bool(lowest.min() < floor)


def _scan_buffered(
    delta: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    block_elements: int,
    starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Σ_n C·h`` for ``h_t = exp(Δ_t A) h_{t-1} + x_t B_t``, without autograd.

    Returns ``(B, D, L)``, a strided view of scratch memory (on CPU, reused by the next call): copy it out.

    Works block by block, a block being some batch rows times a run of consecutive chunks, with two reused
    ``(T, chunks, rows, N, D)`` buffers: the working set stays in cache and no large allocation is paged in per
    call. Blocks of the same rows go in time order, each handing its final state to the next.

    ``starts``, if given, is an ``(nc, B, N, D)`` tensor that receives the state entering each chunk (zero for
    the first): all that the hand-written backward keeps of the forward's ``(B, L, N, D)`` states.
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
    clamp = _needs_floor(delta, a2, floor)
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
    y = _scratch(delta, batch * steps * channels, "y").view(batch, chunks, chunk, channels)

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
            if starts is not None:
                starts[c0:c1, b0:b1] = hin

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


def _scan_backward(
    delta: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    starts: torch.Tensor,
    dy: torch.Tensor,
    chunk_size: int,
    block_elements: int,
    needs: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``Σ_n C·h`` for ``delta``, ``x``, ``a``, ``b``, ``c``, and ``Σ_n C·h`` recomputed.

    ``needs`` says which of the five gradients and whether the output (for the gate's gradient) are wanted;
    the others come back ``None``. The gradient of ``a`` is ``(D, N)``; the rest are ``(L, B, K)`` views of
    scratch memory, to be copied out before the next call.

    Walks the chunks of the forward (``starts`` ``(nc, B, N, D)`` holds the state entering each) from last to
    first, a block of batch rows at a time. Per chunk and block, in ``(T, rows, N, D)`` buffers that stay in
    cache: the decays and the states are recomputed from the chunk's start state, the adjoint states
    ``g_t = C_t dy_t + exp(Δ_{t+1} A) g_{t+1}`` run backwards from the carry ``exp(Δ A) g`` of the first step
    of the chunk after it, and every gradient term of the chunk is taken at once. Contractions over ``N`` or
    ``D`` are batched matrix products; only the ``Δ`` and ``A`` terms, whose factors vary along both, are
    products and sums.
    """
    need_delta, need_x, need_a, need_b, need_c, need_y = needs
    need_g = need_delta or need_x or need_a or need_b
    need_p = need_delta or need_a  # the gradient of the decay exponents, g_t ⊙ exp(Δ_t A) ⊙ h_{t-1}
    need_h = need_c or need_p or need_y
    batch, channels, length = delta.shape
    state = a.shape[1]
    chunk, chunks = _chunk_layout(length, chunk_size)
    a2 = _log2_decay_rate(a)  # (N, D)
    at = a.t().contiguous()  # (N, D)
    floor = math.log2(torch.finfo(delta.dtype).tiny)
    clamp = _needs_floor(delta, a2, floor)

    fit = max(1, block_elements // (chunk * state * channels))
    bw = min(batch, fit)
    bw = -(-batch // -(-batch // bw))  # even split of the batch into the fewest blocks
    size = chunk * bw * state * channels
    wide, narrow = length * batch * channels, length * batch * state
    numel = 4 * size + bw * state * channels + 6 * wide + 4 * narrow
    work = _scratch(delta, numel, "backward")
    dec_buf, h_buf, g_buf, tmp_buf, carry_buf, *staged = work.split(
        [size] * 4 + [bw * state * channels] + [wide] * 6 + [narrow] * 4
    )
    # Inputs and gradients in steps-last copies (B, L, K), made and undone by plain 2-D transposes (several
    # times cheaper than any other permutation); a chunk's rows are then (T, rows, K) views.
    dl_all, xl_all, dy_all, bl_all, cl_all = (
        _steps_last(t, buf.view(batch, length, -1)).transpose(0, 1)
        for buf, t in zip(staged[:3] + staged[6:8], (delta, x, dy, b, c), strict=True)
    )
    ddelta, dx, y, db, dc = (
        buf.view(batch, length, -1).transpose(0, 1) if need else None
        for buf, need in zip(staged[3:6] + staged[8:], (need_delta, need_x, need_y, need_b, need_c), strict=True)
    )
    da = torch.zeros_like(at) if need_a else None  # (N, D)

    for b0 in range(0, batch, bw):
        rows = slice(b0, min(batch, b0 + bw))
        w = rows.stop - b0
        carry = carry_buf[: w * state * channels].view(w, state, channels)
        for k in range(chunks - 1, -1, -1):
            steps = slice(k * chunk, min(length, (k + 1) * chunk))
            tc = steps.stop - steps.start
            n = tc * w
            full = (tc, w, state, channels)
            dl, xl, dyl = dl_all[steps, rows], xl_all[steps, rows], dy_all[steps, rows]  # (T, rows, D)
            bl, cl = bl_all[steps, rows], cl_all[steps, rows]  # (T, rows, N)
            dec = torch.mul(dl[:, :, None, :], a2, out=dec_buf[: n * state * channels].view(full))
            if clamp:
                dec.clamp_(min=floor)
            dec.exp2_()
            decs = dec.unbind(0)
            if need_h:
                h = torch.mul(xl[:, :, None, :], bl[:, :, :, None], out=h_buf[: n * state * channels].view(full))
                hs = h.unbind(0)
                if k:  # the first chunk starts from zero
                    hs[0].addcmul_(decs[0], starts[k, rows])
                for t in range(1, tc):
                    hs[t].addcmul_(decs[t], hs[t - 1])
                if need_c:
                    prod = torch.bmm(dyl.reshape(n, 1, channels), h.view(n, state, channels).transpose(1, 2))
                    dc[steps, rows] = prod.view(tc, w, state)
                if need_y:
                    prod = torch.bmm(cl.reshape(n, 1, state), h.view(n, state, channels))
                    y[steps, rows] = prod.view(tc, w, channels)
            if not need_g:
                continue
            g = torch.mul(cl[:, :, :, None], dyl[:, :, None, :], out=g_buf[: n * state * channels].view(full))
            gs = g.unbind(0)
            if k < chunks - 1:
                gs[tc - 1].add_(carry)
            for t in range(tc - 2, -1, -1):
                gs[t].addcmul_(decs[t + 1], gs[t + 1])
            if k:
                torch.mul(decs[0], gs[0], out=carry)  # what the chunk before sees of this one
            flat = g.view(n, state, channels)
            if need_x:
                prod = torch.bmm(bl.reshape(n, 1, state), flat)
                dx[steps, rows] = prod.view(tc, w, channels)
            if need_b:
                prod = torch.bmm(xl.reshape(n, 1, channels), flat.transpose(1, 2))
                db[steps, rows] = prod.view(tc, w, state)
            if not need_p:
                continue
            p = g.mul_(dec)  # g is spent: the decay-exponent gradient is written over it
            if tc > 1:
                p[1:].mul_(h[:-1])
            if k:
                p[0].mul_(starts[k, rows])
            else:
                p[0].zero_()
            tmp = tmp_buf[: n * state * channels].view(full)
            if need_delta:
                torch.sum(torch.mul(p, at, out=tmp), dim=2, out=ddelta[steps, rows])
            if need_a:
                da.add_(torch.mul(p, dl[:, :, None, :], out=tmp).view(n, state, channels).sum(0))
    return ddelta, dx, None if da is None else da.t(), db, dc, y


def _skip_and_gate(
    ys: torch.Tensor,
    u: torch.Tensor,
    skip: torch.Tensor | None,
    z: torch.Tensor | None,
    work: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(ys + skip·u) ⊙ silu(z)`` into a fresh contiguous ``(B, D, L)`` tensor; ``work`` may take ``silu(z)``."""
    y = u.new_empty(u.shape)
    if skip is None:
        y.copy_(ys)
    else:
        torch.addcmul(ys, u, skip[:, None], out=y)
    if z is not None:
        y.mul_(F.silu(z) if work is None else torch.ops.aten.silu.out(z, out=work))
    return y


class _StatefulScan(torch.autograd.Function):
    """The whole scan with a hand-written backward: ``y = (Σ_n C_t h_t + D u) ⊙ silu(z)``.

    ``h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t u_t B_t``. Inputs ``u``, ``delta`` (Δ, already biased and softplused)
    ``(B, D, L)``, ``a`` ``(D, N)``, ``b``, ``c`` ``(B, N, L)``, the optional skip ``(D,)`` and gate ``z``
    ``(B, D, L)``, then the chunk size and the forward's block size; outputs ``y`` ``(B, D, L)`` and the chunk
    start states ``(nc, B, N, D)``.

    Autograd through ``_scan_functional`` is several times slower than its forward on CPU: each time step
    indexes whole ``(T, nc, B, N, D)`` intermediates, and autograd gives every such slice a full-size,
    zero-filled gradient. Here the forward is the buffered scan, which also writes out the state entering each
    chunk; the backward (``_scan_backward``) recomputes each chunk's decays and states from it and runs the
    adjoint recurrence chunk by chunk, in cache. The product ``Δ u``, the skip and the gate are inside the
    Function because on CPU every fresh ``(B, D, L)`` tensor costs about as much in page faults as a pass over
    it: autograd around them allocated some fifteen such tensors per call, this allocates four (``y`` and
    the gradients of ``u``, ``Δ``, ``z``) and does the rest in reused scratch.

    Memory kept for the backward: the inputs and the ``(nc, B, N, D)`` start states, about ``1/T`` of one
    ``(B, L, N, D)`` tensor. Scratch on CPU, kept per thread up to the caps in ``_WORKSPACE_MAX``: four
    cache-sized ``(T, rows, N, D)`` buffers and about a dozen ``(B, L, D)``-sized ones.

    Decay exponents are floored at the smallest normal float, as in the buffered path. The backward treats
    the floor as absent: where it bites, the decay and its derivative are below the dtype's resolution anyway.
    """

    @staticmethod
    def forward(u, delta, a, b, c, skip, z, chunk_size, block_elements):
        batch, channels, length = u.shape
        work = _scratch(u, u.numel(), "gate").view(u.shape)
        x = torch.mul(delta, u, out=work)
        starts = u.new_empty(_chunk_layout(length, chunk_size)[1], batch, a.shape[1], channels)
        ys = _scan_buffered(delta, x, a, b, c, chunk_size, block_elements, starts)
        # Contiguous in the caller's layout: whatever follows is elementwise, and mixed strides would slow it
        # (and its backward) several times.
        return _skip_and_gate(ys, u, skip, z, work), starts  # x is spent: its scratch takes silu(z)

    @staticmethod
    def setup_context(ctx, inputs, output):
        # The start states come out of forward, not through ctx, so that torch.func's transforms accept the
        # Function; they are an output nobody differentiates.
        u, delta, a, b, c, skip, z, chunk_size, _ = inputs
        starts = output[1]
        ctx.mark_non_differentiable(starts)
        ctx.save_for_backward(u, delta, a, b, c, skip, z, starts)
        ctx.chunk_size = chunk_size

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dstarts):
        u, delta, a, b, c, skip, z, starts = ctx.saved_tensors
        need_u, need_delta, need_a, need_b, need_c, need_skip, need_z = ctx.needs_input_grad[:7]
        shape = u.shape
        x, gate, dyp, dx = (t.view(shape) for t in _scratch(u, 4 * u.numel(), "gate").chunk(4))
        torch.mul(delta, u, out=x)
        # dL/d(scan + D u): the gate's silu(z) times dy
        dyp = dy if z is None else torch.mul(dy, torch.ops.aten.silu.out(z, out=gate), out=dyp)
        need_x = need_u or need_delta
        block = _BACKWARD_BLOCK_ELEMENTS * torch.get_num_threads()
        needs = (need_delta, need_x, need_a, need_b, need_c, need_z)
        ddelta, dx_steps, da, db, dc, ys = _scan_backward(delta, x, a, b, c, starts, dyp, ctx.chunk_size, block, needs)

        def caller_layout(t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
            # (L, B, K) steps-last scratch -> (B, K, L), fresh unless ``out`` is given
            if out is None:
                out = t.new_empty(t.shape[1], t.shape[2], t.shape[0])
            return out.copy_(t.permute(1, 2, 0))

        du = dskip = dz = None
        if need_x:
            dx = caller_layout(dx_steps, dx)
        if need_u:
            du = torch.mul(dx, delta, out=u.new_empty(shape))
            if skip is not None:
                du.addcmul_(dyp, skip[:, None])
        if need_delta:
            ddelta = caller_layout(ddelta).addcmul_(dx, u)
        if need_skip:
            dskip = torch.mul(dyp, u, out=gate).sum((0, 2))
        if need_z:
            pre = caller_layout(ys, x)  # the gate's input, scan + D u
            if skip is not None:
                pre.addcmul_(u, skip[:, None])
            dz = torch.ops.aten.silu_backward.grad_input(pre.mul_(dy), z, grad_input=z.new_empty(shape))
        db = None if db is None else caller_layout(db)
        dc = None if dc is None else caller_layout(dc)
        return du, ddelta, da, db, dc, dskip, dz, None, None


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
      hand-written backward, which also takes in ``Δ u``, the skip and the gate. Its forward is the buffered
      scan, keeping only the state entering each chunk, ``(nc, B, N, D)``; its backward walks the chunks
      from last to first, recomputes each chunk's decays and states from its start state and runs the
      adjoint recurrence through it, in cache-sized ``(T, rows, N, D)`` buffers, never a whole
      ``(B, L, N, D)`` tensor. ``chunk_size`` sets the chunks of both; ``block_elements`` the forward's
      blocks.
    * Gradients needed on another device (CUDA), or ``torch.compile`` tracing (with or without gradients):
      a functional variant of the three passes, without ``out=`` or in-place ops, with whole
      ``(B, D, L, N)`` intermediates, which autograd and the compiler can follow.

    Math in fp32 (fp64 for fp64 ``u``). exp is evaluated as exp2 (half the cost on CPU), and decays below
    the smallest normal float are raised to it (the CPU's denormal path is 10-50x slower); both change results
    only at rounding level. Memory of the buffered path: two work buffers of about ``block_elements`` elements
    and a few ``(B, D, L)`` tensors. Under autograd on CPU, about ``1/T`` of one ``(B, L, N, D)`` tensor is
    kept for the backward, whose scratch is four cache-sized buffers and about ten ``(B, D, L)``-sized ones.
    On CPU the scratch memory is kept per thread and reused, because paging in fresh memory costs as much as
    a third of the arithmetic: about 18 MiB fp32 at the defaults without gradients, 62 / 90 MiB after a
    backward at ``B = 32``, ``L = 197``, ``D = 128`` / ``192``, and at most 140 MiB per thread and dtype;
    larger requests are allocated afresh.

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
    if u.numel() == 0:
        return torch.zeros_like(u, dtype=out_dtype)
    skip = None if D is None else D.to(dtype)
    gate = None if z is None else z.to(dtype)
    if path == "autograd":
        return _StatefulScan.apply(u, delta, A, B, C, skip, gate, chunk_size, block_elements)[0].to(out_dtype)
    if path == "buffered":
        x = torch.mul(delta, u, out=_scratch(u, u.numel(), "gate").view(u.shape))
        # The buffered scan returns a transposed view of scratch memory: the skip (or a copy) writes it into
        # the contiguous output, which the gate then updates in place.
        ys = _scan_buffered(delta, x, A, B, C, chunk_size, block_elements)
        return _skip_and_gate(ys, u, skip, gate).to(out_dtype)
    y = _scan_functional(delta, delta * u, A, B, C, chunk_size)
    if skip is not None:
        y = torch.addcmul(y, u, skip[:, None])
    if gate is not None:
        y = y * F.silu(gate)
    return y.to(out_dtype).contiguous()

"""The selective scan of Mamba-1 (S6), with interchangeable backends.

Shapes: ``B`` batch, ``D`` channels (``d_inner``), ``L`` sequence length, ``N`` state size (``d_state``).

Backends, all with the semantics of :func:`selective_scan_reference`:

* ``"reference"`` — the sequential loop over ``L``: the specification and the test oracle, slow.
* ``"chunked"`` — pure PyTorch for CPU and GPU: ``L`` is cut into chunks that are scanned side by side, and only
  the chunk boundaries are carried sequentially (:func:`selective_scan_chunked`).
* ``"mamba_ssm"`` — mamba-ssm's fused CUDA kernel (optional extra ``tokred-mamba[kernels]``), CUDA tensors only.
* ``"auto"`` — ``$TOKRED_SCAN_BACKEND`` when set; else ``"mamba_ssm"`` for CUDA tensors when it imports and
  ``torch.compile`` is not tracing; else ``"chunked"``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from typing import Literal

import torch
import torch.nn.functional as F

from tokred.mamba.ops import _mamba_ssm

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "Backend",
    "available_backends",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_reference",
]

Backend = Literal["auto", "reference", "chunked", "mamba_ssm"]
BACKENDS: tuple[str, ...] = ("auto", "reference", "chunked", "mamba_ssm")
"""Every name ``selective_scan(backend=...)`` accepts."""
ENV_VAR = "TOKRED_SCAN_BACKEND"
"""Environment variable that, when set, replaces the choice of ``backend="auto"``."""

DEFAULT_CHUNK_SIZE = 20
"""Shortest default chunk of the chunked backend (fastest at Vim's ``L = 197``); ``√L`` for longer sequences."""
DEFAULT_BLOCK_ELEMENTS_CPU = 1 << 21
"""Elements per work buffer of the chunked backend on CPU: two 8 MiB fp32 buffers stay in a typical L3 cache."""
DEFAULT_BLOCK_ELEMENTS_CUDA = 1 << 26
"""Elements per work buffer on GPU, where kernel launches, not caches, set the cost."""

_CONCRETE = ("reference", "chunked", "mamba_ssm")
_LOG2E = math.log2(math.e)
_logger = logging.getLogger(__name__)
_logged_fallbacks: set[str] = set()
_workspaces = threading.local()
# Elements kept per slot: two default CPU blocks with their per-chunk state; Vim-S inputs at batch 8.
_WORKSPACE_MAX = {"block": 9 << 20, "stage": 4 << 20}


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


def _check_inputs(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
) -> None:
    """Raise ValueError unless the arguments have the shapes, dtypes and device of one selective scan."""
    tensors = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a real floating-point tensor, got {t.dtype}")
        if t.device != u.device:
            raise ValueError(f"all inputs must be on one device: u is on {u.device}, {name} on {t.device}")
    if u.dim() != 3:
        raise ValueError(f"u must have shape (B, D, L), got {tuple(u.shape)}")
    batch, channels, length = u.shape
    if length < 1:
        raise ValueError(f"u must have at least one step (L >= 1), got shape {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"A must have shape (D, N) with D = {channels} from u {tuple(u.shape)}, got {tuple(A.shape)}")
    state = A.shape[1]
    if state < 1:
        raise ValueError(f"A must have at least one state (N >= 1), got shape {tuple(A.shape)}")
    expected = {
        "delta": ("(B, D, L)", (batch, channels, length)),
        "z": ("(B, D, L)", (batch, channels, length)),
        "B": ("(B, N, L)", (batch, state, length)),
        "C": ("(B, N, L)", (batch, state, length)),
        "D": ("(D,)", (channels,)),
        "delta_bias": ("(D,)", (channels,)),
    }
    for name, (layout, shape) in expected.items():
        t = tensors[name]
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(
                f"{name} must have shape {layout} = {shape} to match u {tuple(u.shape)} and A {tuple(A.shape)}, "
                f"got {tuple(t.shape)}"
            )


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    # fp32 at least, as the reference; fp64 inputs keep fp64 so that tests can check the algebra tightly.
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _prepare_delta(
    delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool, dtype: torch.dtype
) -> torch.Tensor:
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


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
    """The three passes of :func:`_scan_buffered` without ``out=`` or in-place ops; returns ``(B, D, L)``.

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
    are padding). Three passes replace the ``L`` sequential steps of :func:`selective_scan_reference`: every
    chunk is scanned from a zero state, all chunks side by side (``T`` steps); the true state entering each
    chunk is carried across the boundaries with the chunk's total decay ``exp(A Σ Δ)`` (``nc`` steps); every
    chunk is rescanned from that state (``T`` steps). Each step multiplies by decays ``exp(Δ_t A) ≤ 1``
    (for ``A ≤ 0``), so nothing is ever divided by a small decay or exponentiated upward: it is exactly the
    reference recurrence, reordered, and agrees with it to rounding.

    The work goes in blocks of batch rows × consecutive chunks, rows first: with the whole batch in a block,
    one-chunk blocks run the scan straight through in time (``L`` sequential ops over the whole batch); with
    few rows, the chunks of a block are scanned side by side (about ``2T + L/T`` sequential ops).

    Math in fp32 (fp64 for fp64 ``u``). exp is evaluated as exp2 (half the cost on CPU), and decays below
    the smallest normal float are raised to it (the CPU's denormal path is 10-50x slower); both change results
    only at rounding level. Memory: two work buffers of about ``block_elements`` elements and a few ``(B, D, L)``
    tensors; on CPU the scratch memory (about 18 MiB fp32 at the defaults, 52 MiB at most) is kept per thread
    and reused, because paging in fresh memory costs as much as a third of the arithmetic. Under autograd or
    ``torch.compile`` a functional variant of the same three passes runs instead, with whole ``(B, D, L, N)``
    intermediates.

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
        ``y`` of shape ``(B, D, L)`` in the dtype of ``u``.

    Raises:
        ValueError: Inconsistent shapes, devices or dtypes, or a non-positive ``chunk_size``/``block_elements``.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    return _chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size, block_elements)


def _chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    chunk_size: int | None = None,
    block_elements: int | None = None,
) -> torch.Tensor:
    if chunk_size is None:
        chunk_size = max(DEFAULT_CHUNK_SIZE, math.isqrt(u.shape[-1]))
    if block_elements is None:
        block_elements = DEFAULT_BLOCK_ELEMENTS_CUDA if u.is_cuda else DEFAULT_BLOCK_ELEMENTS_CPU
    if chunk_size < 1 or block_elements < 1:
        raise ValueError(f"chunk_size and block_elements must be positive, got {chunk_size} and {block_elements}")
    dtype = _compute_dtype(u)
    out_dtype = u.dtype
    u, A, B, C = (t.to(dtype) for t in (u, A, B, C))
    delta = _prepare_delta(delta, delta_bias, delta_softplus, dtype)
    x = delta * u
    if x.numel() == 0:
        return torch.zeros_like(u, dtype=out_dtype)
    functional = torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(t.requires_grad for t in (x, A, B, C, D, z) if t is not None)
    )
    if functional:
        y = _scan_functional(delta, x, A, B, C, chunk_size)
        if D is not None:
            y = torch.addcmul(y, u, D.to(dtype)[:, None])
        if z is not None:
            y = y * F.silu(z.to(dtype))
        return y.to(out_dtype).contiguous()
    # The buffered scan returns a transposed view of a fresh tensor: one copy makes it the contiguous output,
    # which the skip and the gate then update in place.
    y = _scan_buffered(delta, x, A, B, C, chunk_size, block_elements).contiguous()
    if D is not None:
        y.addcmul_(u, D.to(dtype)[:, None])
    if z is not None:
        y.mul_(F.silu(z.to(dtype)))
    return y.to(out_dtype)


def available_backends() -> list[str]:
    """The concrete backends usable in this environment, slowest first.

    ``"reference"`` and ``"chunked"`` always; ``"mamba_ssm"`` when mamba-ssm imports and a CUDA device is
    present. ``"auto"`` is always accepted as well and picks among these.

    Returns:
        Backend names for :func:`selective_scan`.
    """
    names = ["reference", "chunked"]
    if torch.cuda.is_available() and _mamba_ssm.is_available():
        names.append("mamba_ssm")
    return names


def _mamba_ssm_unusable(device: torch.device, dtype: torch.dtype, state: int) -> str | None:
    """Why ``"auto"`` must not pick the CUDA kernel for these inputs, or None when it may."""
    if device.type != "cuda":
        return "the inputs are not on a CUDA device"
    if torch.compiler.is_compiling():
        return "torch.compile is tracing, and the kernel is opaque to it"
    if not _mamba_ssm.is_available():
        return f"mamba-ssm does not import ({_mamba_ssm.import_error()}); {_mamba_ssm.INSTALL_HINT}"
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the kernel has no {dtype} version"
    if state > 256:
        return f"the kernel supports N <= 256, got N = {state}"
    return None


def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, state: int) -> str:
    """The concrete backend that ``backend`` means for inputs on ``device`` of ``dtype`` with ``N = state``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}; valid: {', '.join(map(repr, BACKENDS))}")
    if backend != "auto":
        return backend
    override = os.environ.get(ENV_VAR, "").strip()
    if override and override != "auto":
        if override not in _CONCRETE:
            raise ValueError(
                f"environment variable {ENV_VAR}={override!r} is not a scan backend; "
                f"valid: {', '.join(map(repr, BACKENDS))}"
            )
        return override
    reason = _mamba_ssm_unusable(device, dtype, state)
    if reason is None:
        return "mamba_ssm"
    if device.type == "cuda" and reason not in _logged_fallbacks:
        _logged_fallbacks.add(reason)
        # A missing install is worth a warning; compile tracing, float64 or N > 256 are expected fallbacks.
        level = logging.WARNING if reason.startswith("mamba-ssm") else logging.INFO
        _logger.log(level, "selective_scan(backend='auto'): the chunked PyTorch scan runs on CUDA because %s", reason)
    return "chunked"


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
    """Run the selective scan with the chosen backend; semantics of :func:`selective_scan_reference`.

    ``h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t``,  ``y_t = C_t · h_t + D ⊙ u_t``,  ``y_t *= silu(z_t)``, with
    ``Δ = softplus(delta + delta_bias)`` (or the raw sum when ``delta_softplus`` is False).

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
        backend: ``"auto"`` (default), ``"reference"``, ``"chunked"`` or ``"mamba_ssm"`` (see the module
            docstring). ``"auto"`` follows ``$TOKRED_SCAN_BACKEND`` when it is set, else picks
            ``"mamba_ssm"`` for CUDA tensors when mamba-ssm imports and ``torch.compile`` is not tracing,
            else ``"chunked"``; falling back on CUDA is logged once per reason.

    Returns:
        ``y`` of shape ``(B, D, L)`` in the dtype of ``u``.

    Raises:
        ValueError: Unknown backend, inconsistent shapes/devices/dtypes, or ``"mamba_ssm"`` asked for inputs
            it cannot take (not on CUDA, float64, ``N > 256``).
        ImportError: ``"mamba_ssm"`` asked for and mamba-ssm does not import; the message says how to install.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    name = _resolve_backend(backend, u.device, u.dtype, A.shape[1])
    if name == "reference":
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if name == "chunked":
        return _chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if not _mamba_ssm.is_available():
        hint = "" if u.is_cuda else " It also needs CUDA tensors; on CPU use backend='chunked'."
        raise ImportError(
            f"the 'mamba_ssm' scan backend needs mamba-ssm, which does not import here "
            f"({_mamba_ssm.import_error()}); {_mamba_ssm.INSTALL_HINT}.{hint}"
        )
    if not u.is_cuda:
        raise ValueError(
            f"the 'mamba_ssm' scan backend runs on CUDA tensors only, got {u.device}; use backend='chunked' "
            "(or 'auto') on CPU"
        )
    reason = _mamba_ssm_unusable(u.device, u.dtype, A.shape[1])
    if reason is not None and not reason.startswith("torch.compile"):
        raise ValueError(f"the 'mamba_ssm' scan backend cannot take these inputs: {reason}")
    return _mamba_ssm.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

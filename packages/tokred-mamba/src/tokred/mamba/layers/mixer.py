"""The bidirectional Mamba mixer of Vim and VideoMamba ("bimamba v2"), in pure PyTorch.

Shapes: ``B`` batch, ``L`` tokens, ``D`` model width (``d_model``), ``E`` inner width (``d_inner = expand·D``),
``N`` state size (``d_state``), ``R`` rank of the Δ projection (``dt_rank``), ``K`` conv width (``d_conv``).
"""

from __future__ import annotations

import math
from typing import NamedTuple, overload

import torch
import torch.nn.functional as F
from torch import nn

from tokred.mamba.ops import prepare_delta, selective_scan

__all__ = ["BidirectionalMamba", "ScanDelta", "default_dt_rank"]


class ScanDelta(NamedTuple):
    """The Δ timescale both scans of a bidirectional mixer used, in token order.

    Δ (after the bias and the softplus, exactly what each scan consumed) acts as an input gate: a large Δ
    writes the token strongly into the state. The backward scan runs on the reversed sequence; its Δ is
    flipped back here, so position ``t`` is token ``t`` in both. Detached from the graph: it is a ranking
    signal, and keeping the graph alive would hold every block's activations.

    Attributes:
        forward: ``(B, E, L)`` Δ of the forward scan, fp32.
        backward: ``(B, E, L)`` Δ of the backward scan, fp32, flipped back to token order.
    """

    forward: torch.Tensor
    backward: torch.Tensor


def default_dt_rank(d_model: int) -> int:
    """Mamba's default rank of the Δ projection: ``ceil(d_model / 16)``."""
    return math.ceil(d_model / 16)


def _init_dt_proj(
    dt_proj: nn.Linear, dt_rank: int, dt_min: float, dt_max: float, dt_init_floor: float, dt_scale: float
) -> None:
    """Initialise Δ's projection so that ``softplus(bias)`` starts log-uniform in ``[dt_min, dt_max]``.

    A random Δ bias in that range gives every channel a different, moderate timescale at initialisation;
    this is what keeps a random-weight model's scan neither frozen (Δ → 0) nor memoryless (Δ → ∞).
    """
    std = dt_rank**-0.5 * dt_scale
    nn.init.uniform_(dt_proj.weight, -std, std)
    # Computed on the CPU and copied: elementwise math on the meta device imports torch._dynamo (seconds),
    # and building on meta is how the big models are inspected without allocating them.
    channels = dt_proj.bias.shape[0]
    log_dt = torch.rand(channels, device="cpu") * (math.log(dt_max) - math.log(dt_min))
    dt = torch.exp(log_dt + math.log(dt_min)).clamp(min=dt_init_floor)
    inverse_softplus = dt + torch.log(-torch.expm1(-dt))
    with torch.no_grad():
        dt_proj.bias.copy_(inverse_softplus)


class BidirectionalMamba(nn.Module):
    """Mamba-1 mixer that scans the sequence forwards and backwards and averages (or sums) the two.

    The input projection and the output projection are shared; each direction has its own causal depthwise
    conv, ``x_proj``, ``dt_proj``, ``A`` and ``D``. The backward direction runs the same computation on the
    sequence reversed along ``L`` (parameters ``conv1d_b``, ``x_proj_b``, ``dt_proj_b``, ``A_b_log``, ``D_b``)
    and its output is reversed back before the two are combined:
    ``out_proj((y_fwd + flip(y_bwd)) / 2)`` for Vim (``divide_out=True``), without the ``/ 2`` for VideoMamba.

    Parameter names and shapes are those of the official Vim and VideoMamba checkpoints.

    Args:
        d_model: ``D``.
        d_state: ``N``.
        d_conv: ``K``, width of the causal depthwise convolution.
        expand: ``E = expand · D``.
        dt_rank: ``R``; ``ceil(D / 16)`` when None.
        divide_out: Halve the sum of the two directions (Vim) or not (VideoMamba).
        scan_backend: Backend name passed to
            [`tokred.mamba.ops.selective_scan`][tokred.mamba.ops.dispatch.selective_scan]; change it later through the
            attribute of the same name.
        dt_min: Lower end of the initial Δ range.
        dt_max: Upper end of the initial Δ range.
        dt_init_floor: Smallest initial Δ.
        dt_scale: Scale of the initial Δ-projection weights.
        conv_bias: Whether the convolutions have a bias (True in Vim and VideoMamba).
        bias: Whether ``in_proj`` and ``out_proj`` have a bias (False in Vim and VideoMamba).

    Shapes:
        Input ``(B, L, D)``, output ``(B, L, D)``; with ``return_delta=True`` also a
        [`ScanDelta`][tokred.mamba.layers.ScanDelta] of two ``(B, E, L)`` tensors.
    """

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        divide_out: bool = True,
        scan_backend: str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
        conv_bias: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = expand * d_model
        self.dt_rank = default_dt_rank(d_model) if dt_rank is None else dt_rank
        self.divide_out = divide_out
        self.scan_backend = scan_backend

        inner, rank = self.d_inner, self.dt_rank
        self.in_proj = nn.Linear(d_model, 2 * inner, bias=bias)
        # S4D-real initialisation: A = -(1, 2, …, N) for every channel, stored as its log.
        a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32, device="cpu")).expand(inner, d_state)
        for suffix in ("", "_b"):
            conv = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1, bias=conv_bias)
            x_proj = nn.Linear(inner, rank + 2 * d_state, bias=False)
            dt_proj = nn.Linear(rank, inner, bias=True)
            _init_dt_proj(dt_proj, rank, dt_min, dt_max, dt_init_floor, dt_scale)
            setattr(self, f"conv1d{suffix}", conv)
            setattr(self, f"x_proj{suffix}", x_proj)
            setattr(self, f"dt_proj{suffix}", dt_proj)
            # The official names are A_log / A_b_log and D / D_b.
            # torch.empty follows the default device (meta, cuda, …); the values come from the CPU.
            setattr(self, f"A{suffix}_log", nn.Parameter(torch.empty(inner, d_state).copy_(a_log)))
            setattr(self, f"D{suffix}", nn.Parameter(torch.ones(inner)))
        self.out_proj = nn.Linear(inner, d_model, bias=bias)

    def _scan(
        self,
        x: torch.Tensor,
        z: torch.Tensor,
        conv: nn.Conv1d,
        x_proj: nn.Linear,
        dt_proj: nn.Linear,
        a_log: torch.Tensor,
        skip: torch.Tensor,
        return_delta: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One scan direction on ``x``, ``z`` ``(B, E, L)``; returns ``y`` ``(B, E, L)`` and Δ or None."""
        length = x.shape[-1]
        # Padding K-1 on both sides and keeping the first L outputs makes the convolution causal.
        u = F.silu(conv(x)[..., :length])  # (B, E, L)
        x_dbl = x_proj(u.transpose(1, 2))  # (B, L, R + 2N)
        dt, b, c = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # The matmul order yields (B, E, L) contiguous along L, the layout the CUDA scan needs.
        delta = torch.matmul(dt_proj.weight, dt.transpose(1, 2))  # (B, E, L), before bias and softplus
        b = b.transpose(1, 2).contiguous()  # (B, N, L)
        c = c.transpose(1, 2).contiguous()  # (B, N, L)
        a = -torch.exp(a_log.float())  # (E, N)
        delta_bias = dt_proj.bias.float()
        if not return_delta:
            # The bias and softplus go to the scan, which the fused kernels apply in place.
            y = selective_scan(
                u, delta, a, b, c, skip.float(), z, delta_bias, delta_softplus=True, backend=self.scan_backend
            )
            return y, None
        # Discretised once, and that very Δ is both scanned and handed out: what the reducer ranks by is
        # exactly what the scan consumed.
        timescale = prepare_delta(delta, delta_bias, delta_softplus=True)  # (B, E, L) fp32
        y = selective_scan(u, timescale, a, b, c, skip.float(), z, backend=self.scan_backend)
        return y, timescale.detach()

    @overload
    def forward(self, hidden: torch.Tensor) -> torch.Tensor: ...

    @overload
    def forward(self, hidden: torch.Tensor, *, return_delta: bool) -> torch.Tensor | tuple[torch.Tensor, ScanDelta]: ...

    def forward(
        self, hidden: torch.Tensor, *, return_delta: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, ScanDelta]:
        """Mix ``hidden`` ``(B, L, D)`` along the sequence in both directions.

        Args:
            hidden: ``(B, L, D)``.
            return_delta: Also return the Δ both scans used (for token reduction by Δ).

        Returns:
            ``(B, L, D)``, and with ``return_delta`` the [`ScanDelta`][tokred.mamba.layers.ScanDelta] too.
        """
        # (E·2, D) @ (B, D, L) gives x and z already laid out (B, E, L), contiguous along L.
        xz = torch.matmul(self.in_proj.weight, hidden.transpose(1, 2))  # (B, 2E, L)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None].to(xz.dtype)
        x, z = xz.chunk(2, dim=1)
        y_fwd, delta_fwd = self._scan(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, return_delta)
        y_bwd, delta_bwd = self._scan(
            x.flip(-1), z.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b, return_delta
        )
        y = y_fwd + y_bwd.flip(-1)
        if self.divide_out:
            y = y / 2
        out = self.out_proj(y.transpose(1, 2))
        if not return_delta:
            return out
        assert delta_fwd is not None and delta_bwd is not None
        return out, ScanDelta(delta_fwd, delta_bwd.flip(-1))

    def extra_repr(self) -> str:
        """Sizes, the combination rule and the scan backend, for ``print(model)``."""
        return (
            f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, "
            f"dt_rank={self.dt_rank}, divide_out={self.divide_out}, scan_backend={self.scan_backend!r}"
        )

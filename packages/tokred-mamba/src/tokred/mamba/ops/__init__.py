"""Selective-scan kernels for Mamba: a sequential reference, a fast pure-PyTorch backend and a dispatcher.

Shapes: ``B`` batch, ``D`` channels (``d_inner``), ``L`` sequence length, ``N`` state size (``d_state``).

* [`selective_scan`][tokred.mamba.ops.selective_scan] — the entry point; picks a backend (``"auto"``,
  ``"reference"``, ``"chunked"``, ``"mamba_ssm"``; see [`available_backends`][tokred.mamba.ops.available_backends]).
* [`selective_scan_reference`][tokred.mamba.ops.selective_scan_reference] — the specification and test oracle.
* [`selective_scan_chunked`][tokred.mamba.ops.selective_scan_chunked] — pure PyTorch, CPU and GPU, with its own
  fast backward on CPU.
* [`prepare_delta`][tokred.mamba.ops.prepare_delta] — the discretised timescale ``Δ`` every scan consumes.

All scans share the arguments ``(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False)``;
backend-specific options are keyword-only.
"""

from tokred.mamba.ops.chunked import selective_scan_chunked
from tokred.mamba.ops.delta import prepare_delta
from tokred.mamba.ops.dispatch import BACKENDS, ENV_VAR, available_backends, selective_scan
from tokred.mamba.ops.reference import selective_scan_reference

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "available_backends",
    "prepare_delta",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_reference",
]

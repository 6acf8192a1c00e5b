"""The selective scan of Mamba-1 (S6) behind one entry point that picks among interchangeable backends.

[`selective_scan`][tokred.mamba.ops.selective_scan] checks the inputs once, resolves the backend and runs it.

Shapes: ``B`` batch, ``D`` channels (``d_inner``), ``L`` sequence length, ``N`` state size (``d_state``).

Backends, all with the semantics of [`selective_scan_reference`][tokred.mamba.ops.selective_scan_reference]:

* ``"reference"`` — the sequential loop over ``L``: the specification and the test oracle, slow.
* ``"chunked"`` — pure PyTorch for CPU and GPU: ``L`` is cut into chunks that are scanned side by side, and
  only the chunk boundaries are carried sequentially
  ([`selective_scan_chunked`][tokred.mamba.ops.selective_scan_chunked]).
* ``"mamba_ssm"`` — mamba-ssm's fused CUDA kernel (optional extra ``tokred-mamba[kernels]``), CUDA tensors only.
* ``"auto"`` — ``$TOKRED_SCAN_BACKEND`` when set; else ``"mamba_ssm"`` for CUDA tensors when it imports and
  ``torch.compile`` is not tracing; else ``"chunked"``.
"""

from __future__ import annotations

import logging
import os
from typing import Literal

import torch

from tokred.core.errors import InvalidInputError, MissingDependencyError
from tokred.mamba.ops import _mamba_ssm, chunked
from tokred.mamba.ops._checks import check_scan_inputs
from tokred.mamba.ops.reference import selective_scan_reference

__all__ = ["BACKENDS", "ENV_VAR", "Backend", "available_backends", "selective_scan"]

Backend = Literal["auto", "reference", "chunked", "mamba_ssm"]
BACKENDS: tuple[str, ...] = ("auto", "reference", "chunked", "mamba_ssm")
"""Every name ``selective_scan(backend=...)`` accepts."""
ENV_VAR = "TOKRED_SCAN_BACKEND"
"""Environment variable that, when set, replaces the choice of ``backend="auto"``."""

_CONCRETE = ("reference", "chunked", "mamba_ssm")
_logger = logging.getLogger(__name__)
_logged_fallbacks: set[str] = set()


def available_backends() -> list[str]:
    """The concrete backends usable in this environment, slowest first.

    ``"reference"`` and ``"chunked"`` always; ``"mamba_ssm"`` when mamba-ssm imports and a CUDA device is
    present. ``"auto"`` is always accepted as well and picks among these.

    Returns:
        Backend names for [`selective_scan`][tokred.mamba.ops.selective_scan].
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
        raise InvalidInputError(f"unknown scan backend {backend!r}; valid: {', '.join(map(repr, BACKENDS))}")
    if backend != "auto":
        return backend
    override = os.environ.get(ENV_VAR, "").strip()
    if override and override != "auto":
        if override not in _CONCRETE:
            raise InvalidInputError(
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
    """Run the selective scan with the chosen backend.

    Semantics of [`selective_scan_reference`][tokred.mamba.ops.selective_scan_reference]:
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
        InvalidTypeError: An argument is not a tensor.
        InvalidInputError: Unknown backend (the message lists the valid ones), inconsistent
            shapes/devices/dtypes, or ``"mamba_ssm"`` asked for inputs it cannot take (not on CUDA, float64,
            ``N > 256``).
        MissingDependencyError: ``"mamba_ssm"`` asked for and mamba-ssm does not import; the message says how
            to install it.
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    name = _resolve_backend(backend, u.device, u.dtype, A.shape[1])
    if name == "reference":
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if name == "chunked":
        return chunked._chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if not _mamba_ssm.is_available():
        hint = "" if u.is_cuda else " It also needs CUDA tensors; on CPU use backend='chunked'."
        raise MissingDependencyError(
            f"the 'mamba_ssm' scan backend needs mamba-ssm, which does not import here "
            f"({_mamba_ssm.import_error()}); {_mamba_ssm.INSTALL_HINT}.{hint}"
        )
    if not u.is_cuda:
        raise InvalidInputError(
            f"the 'mamba_ssm' scan backend runs on CUDA tensors only, got {u.device}; use backend='chunked' "
            "(or 'auto') on CPU"
        )
    reason = _mamba_ssm_unusable(u.device, u.dtype, A.shape[1])
    if reason is not None and not reason.startswith("torch.compile"):
        raise InvalidInputError(f"the 'mamba_ssm' scan backend cannot take these inputs: {reason}")
    return _mamba_ssm.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

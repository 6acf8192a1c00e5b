"""The one door to mamba-ssm's CUDA selective scan; mamba-ssm is imported lazily, on first use only.

Nothing here imports mamba-ssm (or triton, which it pulls in) at module import: on a CPU-only machine
``import mamba_ssm`` fails (its extension needs CUDA), and ``import tokred.mamba`` must not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tokred.core.errors import MissingDependencyError

__all__ = ["INSTALL_HINT", "import_error", "is_available", "selective_scan"]

INSTALL_HINT = (
    'install it on a CUDA machine after torch with `pip install --no-build-isolation "tokred-mamba[kernels]"` '
    "(mamba-ssm ships only as a CUDA source distribution)"
)

# The probe result, filled on the first call: the kernel entry point, or the reason it is unusable.
_probe: tuple[Callable[..., Any] | None, str | None] | None = None


def _load() -> tuple[Callable[..., Any] | None, str | None]:
    global _probe
    if _probe is None:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        except Exception as error:  # broken installs raise more than ImportError (missing .so, triton, CUDA)
            _probe = (None, f"{type(error).__name__}: {error}")
        else:
            _probe = (selective_scan_fn, None)
    return _probe


def is_available() -> bool:
    """Whether mamba-ssm's selective-scan kernel imports here; probed once, then cached.

    Returns:
        True when ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` imports.
    """
    return _load()[0] is not None


def import_error() -> str | None:
    """Why mamba-ssm did not import (``"ModuleNotFoundError: ..."``), or None when it did."""
    return _load()[1]


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
) -> torch.Tensor:
    """Run mamba-ssm's fused CUDA selective scan; arguments as [`selective_scan`][tokred.mamba.ops.selective_scan].

    Args:
        u: Input ``(B, D, L)`` on a CUDA device.
        delta: Timescale before the bias and softplus, ``(B, D, L)``.
        A: State matrix ``(D, N)``.
        B: Input projection per step ``(B, N, L)``.
        C: Output projection per step ``(B, N, L)``.
        D: Optional skip ``(D,)``.
        z: Optional gate ``(B, D, L)``.
        delta_bias: Optional ``(D,)`` added to ``delta``.
        delta_softplus: Apply softplus to ``delta + delta_bias``.

    Returns:
        ``y`` ``(B, D, L)`` in the dtype of ``u`` (float32, float16 or bfloat16; the kernel has no float64).

    Raises:
        MissingDependencyError: mamba-ssm does not import here (an ImportError); the message says how to install
            it.
    """
    kernel, reason = _load()
    if kernel is None:
        raise MissingDependencyError(
            f"the 'mamba_ssm' scan backend needs mamba-ssm, which does not import ({reason}); {INSTALL_HINT}"
        )
    # The kernel checks dtypes instead of converting: delta, B, C and z in the dtype of u, A, D and delta_bias
    # in fp32. It keeps its state in fp32 whatever the input dtype.
    dtype = u.dtype
    return kernel(
        u,
        delta.to(dtype),
        A.float(),
        B.to(dtype),
        C.to(dtype),
        D=None if D is None else D.float(),
        z=None if z is None else z.to(dtype),
        delta_bias=None if delta_bias is None else delta_bias.float(),
        delta_softplus=delta_softplus,
        return_last_state=False,
    )

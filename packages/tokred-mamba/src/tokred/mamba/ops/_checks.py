"""Validation of the arguments of one selective scan, shared by every backend.

Shapes: ``B`` batch, ``D`` channels (``d_inner``), ``L`` sequence length, ``N`` state size (``d_state``).
"""

from __future__ import annotations

import torch

from tokred.core.errors import InvalidInputError, InvalidTypeError

__all__ = ["check_scan_inputs"]


def check_scan_inputs(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
) -> None:
    """Raise unless the arguments have the shapes, dtypes and device of one selective scan.

    Args:
        u: Input ``(B, D, L)``, ``L >= 1``.
        delta: ``(B, D, L)``.
        A: ``(D, N)``, ``N >= 1``.
        B: ``(B, N, L)``.
        C: ``(B, N, L)``.
        D: None or ``(D,)``.
        z: None or ``(B, D, L)``.
        delta_bias: None or ``(D,)``.

    Raises:
        InvalidTypeError: An argument is not a tensor.
        InvalidInputError: A tensor that is not real floating point, on another device than ``u``, or of a
            shape inconsistent with ``u`` and ``A``; the message names it and the expected layout.
    """
    tensors = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise InvalidTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise InvalidInputError(f"{name} must be a real floating-point tensor, got {t.dtype}")
        if t.device != u.device:
            raise InvalidInputError(f"all inputs must be on one device: u is on {u.device}, {name} on {t.device}")
    if u.dim() != 3:
        raise InvalidInputError(f"u must have shape (B, D, L), got {tuple(u.shape)}")
    batch, channels, length = u.shape
    if length < 1:
        raise InvalidInputError(f"u must have at least one step (L >= 1), got shape {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != channels:
        raise InvalidInputError(
            f"A must have shape (D, N) with D = {channels} from u {tuple(u.shape)}, got {tuple(A.shape)}"
        )
    state = A.shape[1]
    if state < 1:
        raise InvalidInputError(f"A must have at least one state (N >= 1), got shape {tuple(A.shape)}")
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
            raise InvalidInputError(
                f"{name} must have shape {layout} = {shape} to match u {tuple(u.shape)} and A {tuple(A.shape)}, "
                f"got {tuple(t.shape)}"
            )

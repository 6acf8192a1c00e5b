"""Argument checks shared by the ops; private."""

from __future__ import annotations

import torch

from tokred.core.errors import InvalidInputError, InvalidTypeError

__all__: list[str] = []


def check_rank(name: str, tensor: torch.Tensor, rank: int, shape: str) -> None:
    """Raise unless ``tensor`` is a tensor with ``rank`` dimensions (``shape`` names them for the message)."""
    if not isinstance(tensor, torch.Tensor):
        raise InvalidTypeError(f"{name} must be a torch.Tensor of shape {shape}; got {type(tensor).__name__}")
    if tensor.dim() != rank:
        raise InvalidInputError(f"{name} must have shape {shape}; got shape {tuple(tensor.shape)}")


def check_float(name: str, tensor: torch.Tensor) -> None:
    """Raise unless ``tensor`` has a floating-point dtype."""
    if not tensor.is_floating_point():
        raise InvalidTypeError(
            f"{name} must be a floating-point tensor; got dtype {tensor.dtype}. Convert it with .float()"
        )

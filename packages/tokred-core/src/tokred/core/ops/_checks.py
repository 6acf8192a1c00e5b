"""Argument checks shared by the ops; private."""

from __future__ import annotations

import torch

__all__: list[str] = []


def check_rank(name: str, tensor: torch.Tensor, rank: int, shape: str) -> None:
    """Raise `ValueError` unless ``tensor`` has ``rank`` dimensions (``shape`` names them for the message)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}; got {type(tensor).__name__}")
    if tensor.dim() != rank:
        raise ValueError(f"{name} must have shape {shape}; got shape {tuple(tensor.shape)}")


def check_float(name: str, tensor: torch.Tensor) -> None:
    """Raise `TypeError` unless ``tensor`` has a floating-point dtype."""
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {tensor.dtype}. Convert it with .float()")


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype to compute in: fp32 for half precision and fp32 inputs, fp64 stays fp64."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32

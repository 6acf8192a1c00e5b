"""The precision tokred computes in."""

from __future__ import annotations

import torch

__all__ = ["compute_dtype"]


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype to compute in: fp32 for half precision and fp32 inputs, fp64 when any input is fp64.

    Half-precision inputs are widened because sums, Gram matrices, solves and scans lose too much in fp16 or
    bf16; fp64 stays fp64 so that tests can check the algebra tightly. Results that are features are cast back
    to the input dtype by the functions that return them.

    Args:
        *tensors: The inputs; None entries are ignored.

    Returns:
        ``torch.float64`` if any input is fp64, else ``torch.float32``.

    Examples:
        >>> import torch
        >>> from tokred.core.ops import compute_dtype
        >>> compute_dtype(torch.ones(2, dtype=torch.float16)), compute_dtype(torch.ones(2, dtype=torch.float64))
        (torch.float32, torch.float64)
    """
    wide = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if wide else torch.float32

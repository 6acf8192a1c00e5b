"""RMSNorm as Vim and VideoMamba use it: no bias, eps ``1e-5``, computed in fp32."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last dimension, with a learned scale and no bias.

    ``y = x · rsqrt(mean(x²) + eps) · weight``. The statistics and the product are computed in fp32 whatever the
    input dtype, as the fused Triton kernel of mamba-ssm does, and the result is returned in the input dtype.

    Args:
        dim: ``D``, the size of the normalised (last) dimension.
        eps: Added to the mean square before the reciprocal square root.

    Shapes:
        Input ``(..., D)``, output ``(..., D)``.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        # The official module registers bias as None; keeping the attribute lets code that reads
        # `norm.bias` (fused-norm call sites, FLOPs counters) work unchanged.
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` ``(..., D)``; returns ``(..., D)`` in the dtype of ``x``."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.square().mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        """Size and eps, for ``print(model)``."""
        return f"{self.weight.shape[0]}, eps={self.eps}"

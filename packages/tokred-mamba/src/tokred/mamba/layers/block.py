"""The residual block of Vim and VideoMamba: add the residual, RMSNorm, mix."""

from __future__ import annotations

import torch
from torch import nn

from tokred.mamba.layers.mixer import ScanDelta
from tokred.mamba.layers.norm import RMSNorm

__all__ = ["Block", "DropPath"]


class DropPath(nn.Module):
    """Stochastic depth: drop the whole branch for a random subset of samples while training.

    Identity at evaluation, and always when ``drop_prob`` is 0.

    Args:
        drop_prob: Probability that a sample's branch is dropped.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Drop or rescale ``x`` ``(B, ...)`` per sample while training; identity otherwise."""
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        """The drop probability, for ``print(model)``."""
        return f"drop_prob={self.drop_prob}"


class Block(nn.Module):
    """``(hidden, residual) → (mixer(norm(residual + hidden)), residual + hidden)``.

    The evaluation-time equivalent of Vim's fused add + RMSNorm with ``residual_in_fp32=True``: the residual
    stream is kept in fp32 (or wider), the norm reads it in fp32 and the mixer gets the result in the norm
    weight's dtype. The first block gets ``residual=None`` and starts the residual stream from ``hidden``.

    Args:
        dim: ``D``.
        mixer: The sequence mixer, usually a [`BidirectionalMamba`][tokred.mamba.layers.mixer.BidirectionalMamba].
        norm_eps: RMSNorm epsilon.
        drop_path: Stochastic-depth probability on the mixer branch (training only).

    Shapes:
        ``hidden`` ``(B, L, D)``, ``residual`` ``(B, L, D)`` or None; returns two ``(B, L, D)`` tensors,
        the residual in fp32.
    """

    def __init__(self, dim: int, mixer: nn.Module, *, norm_eps: float = 1e-5, drop_path: float = 0.0) -> None:
        super().__init__()
        self.mixer = mixer
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None = None, *, return_delta: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, ScanDelta]:
        """Run the block on ``hidden`` ``(B, L, D)``.

        Args:
            hidden: ``(B, L, D)``, the previous block's mixer output (the embedding for the first block).
            residual: ``(B, L, D)`` residual stream, or None for the first block.
            return_delta: Also return the mixer's [`ScanDelta`][tokred.mamba.layers.ScanDelta] (MTR ranks
                tokens by it).

        Returns:
            ``(hidden, residual)``, both ``(B, L, D)``, then the Δ when ``return_delta`` is set.
        """
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        # Half-precision residuals would accumulate rounding over 24+ blocks; the official models keep fp32.
        residual = residual.to(torch.promote_types(residual.dtype, torch.float32))
        normed = self.norm(residual).to(self.norm.weight.dtype)
        if not return_delta:
            return self.mixer(normed), residual
        hidden, delta = self.mixer(normed, return_delta=True)
        return hidden, residual, delta

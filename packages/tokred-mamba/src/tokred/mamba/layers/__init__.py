"""Building blocks of Vim and VideoMamba: RMSNorm, the bidirectional Mamba mixer and the residual block."""

from tokred.mamba.layers.block import Block, DropPath
from tokred.mamba.layers.mixer import BidirectionalMamba, ScanDelta
from tokred.mamba.layers.norm import RMSNorm

__all__ = ["BidirectionalMamba", "Block", "DropPath", "RMSNorm", "ScanDelta"]

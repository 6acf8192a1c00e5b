"""Selective-scan kernels for Mamba: a sequential reference and faster backends."""

from tokred.mamba.ops.scan import selective_scan, selective_scan_reference

__all__ = ["selective_scan", "selective_scan_reference"]

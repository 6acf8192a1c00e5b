"""Selective-scan kernels for Mamba: a sequential reference and faster backends."""

from tokred.mamba.ops.scan import (
    BACKENDS,
    available_backends,
    selective_scan,
    selective_scan_chunked,
    selective_scan_reference,
)

__all__ = ["BACKENDS", "available_backends", "selective_scan", "selective_scan_chunked", "selective_scan_reference"]

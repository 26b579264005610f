"""Mamba-1 selective scan: ``selective_scan(..., impl=...)`` over a reference, an associative XLA scan and
Pallas kernels, and ``selective_scan_bidirectional`` for Vim's two directions."""

from cab_jax.kernels.selective_scan.api import (
    SCAN_IMPLS,
    lowering_for,
    resolve_impl,
    selective_scan,
    selective_scan_bidirectional,
)
from cab_jax.kernels.selective_scan.pallas_common import SCAN_RESIDUALS, BlockSizes, ScanDirection

__all__ = [
    "SCAN_IMPLS", "SCAN_RESIDUALS", "BlockSizes", "ScanDirection", "lowering_for", "resolve_impl", "selective_scan",
    "selective_scan_bidirectional",
]

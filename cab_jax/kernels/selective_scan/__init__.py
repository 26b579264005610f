"""Mamba-1 selective scan: ``selective_scan(..., impl=...)`` over a reference and parallel implementations."""

from cab_jax.kernels.selective_scan.api import SCAN_IMPLS, selective_scan

__all__ = ["SCAN_IMPLS", "selective_scan"]

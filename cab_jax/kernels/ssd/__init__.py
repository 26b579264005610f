"""Mamba-2 (SSD) scan: ``ssd(..., impl=...)`` over a sequential reference and the chunked SSD algorithm, and
``ssd_step`` for token-by-token generation."""

from cab_jax.kernels.ssd.api import SSD_IMPLS, ssd, ssd_step

__all__ = ["SSD_IMPLS", "ssd", "ssd_step"]

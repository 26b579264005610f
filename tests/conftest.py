"""Shared test settings."""

import jax
import pytest


@pytest.fixture(autouse=True)
def float32_matmuls():
    """Tests compare against float32/float64 references, so float32 matmuls must be float32: GPUs default to TF32
    (10-bit mantissa) for them. On CPU this changes nothing."""
    with jax.default_matmul_precision("highest"):
        yield

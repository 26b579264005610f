"""The Mosaic GPU selective-scan forward against the sequential reference: interpreted on CPU (Mosaic GPU's
interpret mode), compiled on a GPU; and its lowering for CUDA, checked on CPU (interpret mode does not check
Mosaic GPU's layout rules, the lowering does)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cab_jax.kernels.selective_scan import pallas_gpu_mosaic, reference
from cab_jax.kernels.selective_scan.pallas_common import ScanDirection

ON_CPU = jax.default_backend() == "cpu"


def direction(seed, batch, length, d_inner, d_state, dtype, with_extras=True):
    r = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(r.normal(size=shape), jnp.float32)
    return ScanDirection(u=normal(batch, length, d_inner).astype(dtype),
                         delta=(0.5 * normal(batch, length, d_inner)).astype(dtype),
                         A=-jnp.exp(normal(d_inner, d_state)), B=normal(batch, length, d_state).astype(dtype),
                         C=normal(batch, length, d_state).astype(dtype),
                         D=normal(d_inner) if with_extras else None,
                         delta_bias=0.1 * normal(d_inner) if with_extras else None)


def expected(dirs, z, reverses, softplus):
    """Float32 (ungated sum, gated output) from the reference scan, inputs rounded to their dtype first."""
    ypre = sum(reference.selective_scan_reference(
        *(x.astype(jnp.float32) for x in (d.u, d.delta, d.A, d.B, d.C)), d.D, None, d.delta_bias, softplus, rev)
        for d, rev in zip(dirs, reverses, strict=True))
    return ypre, ypre if z is None else ypre * jax.nn.silu(z.astype(jnp.float32))


CASES = [  # batch, length, d_inner, d_state, dtype, reverses, with z, softplus, D and delta_bias given
    (2, 7, 160, 4, "float32", (False, True), True, True, True),  # Vim's pair; d_inner not a multiple of 128
    (1, 1, 128, 16, "float32", (False,), False, False, False),  # one position
    (1, 9, 128, 16, "float32", (True,), True, True, True),
    (2, 5, 256, 16, "bfloat16", (False, True), True, True, True),
]


@pytest.mark.parametrize("batch,length,d_inner,d_state,dtype,reverses,with_z,softplus,extras", CASES)
def test_forward_matches_the_reference(batch, length, d_inner, d_state, dtype, reverses, with_z, softplus, extras):
    dirs = tuple(direction(i, batch, length, d_inner, d_state, dtype, extras) for i in range(len(reverses)))
    z = jnp.asarray(np.random.default_rng(9).normal(size=(batch, length, d_inner)), dtype) if with_z else None
    out, ypre = pallas_gpu_mosaic.forward(dirs, z, reverses, softplus, interpret=ON_CPU)
    want_pre, want = expected(dirs, z, reverses, softplus)
    assert out.dtype == jnp.dtype(dtype) and ypre.dtype == jnp.float32 and out.shape == (batch, length, d_inner)
    np.testing.assert_allclose(ypre, want_pre, rtol=1e-5, atol=1e-5)
    tolerance = 1e-5 if dtype == "float32" else 1e-2  # bfloat16 output: its rounding
    np.testing.assert_allclose(out.astype(jnp.float32), want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_lowers_for_cuda_as_one_mosaic_gpu_kernel(dtype):
    dirs = tuple(direction(i, 2, 197, 192, 16, dtype) for i in range(2))
    z = jnp.zeros((2, 197, 192), dtype)
    lowered = jax.jit(lambda d, z: pallas_gpu_mosaic.forward(d, z, (False, True), True)).trace(dirs, z).lower(
        lowering_platforms=("cuda",))
    assert re.findall(r"custom_call @(\w+)", lowered.as_text()) == ["mosaic_gpu_v2"]

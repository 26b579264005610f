"""The Mosaic GPU selective scan (forward and backward) against the sequential reference run in float64: values and
every gradient, interpreted on CPU (Mosaic GPU's interpret mode, small shapes: it is slow) and compiled on a GPU
(also at Vim's shapes); and its lowering for CUDA, checked on CPU (interpret mode does not check Mosaic GPU's
layout rules, the lowering does)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from test_bridge import all_eqns
from test_selective_scan_pallas import (
    MATH_POINTS,
    assert_bfloat16_gradients_rounded_once,
    assert_kernel_math_matches_float64,
)

from cab_jax.kernels.selective_scan import pallas_gpu_mosaic, reference
from cab_jax.kernels.selective_scan.pallas_common import (
    BlockSizes,
    KernelConfig,
    ScanDirection,
    softplus_from_exp_and_log,
)

ON_CPU = jax.default_backend() == "cpu"
VALUE_TOL = {"float32": 2e-5, "bfloat16": 1e-2}  # relative to max(1, max |expected|); bfloat16: its rounding
GRAD_TOL = {"float32": 1e-4, "bfloat16": 2e-2}


def direction(seed, batch, length, d_inner, d_state, dtype, with_extras=True):
    r = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(r.normal(size=shape), jnp.float32)
    return ScanDirection(u=normal(batch, length, d_inner).astype(dtype),
                         delta=(0.5 * normal(batch, length, d_inner)).astype(dtype),
                         A=-jnp.exp(normal(d_inner, d_state)), B=normal(batch, length, d_state).astype(dtype),
                         C=normal(batch, length, d_state).astype(dtype),
                         D=normal(d_inner) if with_extras else jnp.zeros((d_inner,)),
                         delta_bias=0.1 * normal(d_inner) if with_extras else jnp.zeros((d_inner,)))


def reference_scan(dirs, z, reverses, softplus):
    """The gated sum of the directions by the sequential reference, in the inputs' float type."""
    pre = sum(reference.selective_scan_reference(d.u, d.delta, d.A, d.B, d.C, d.D, None, d.delta_bias, softplus,
                                                 rev) for d, rev in zip(dirs, reverses, strict=True))
    return pre if z is None else pre * jax.nn.silu(z)


def values_and_grads(fn, dirs, z, weights):
    loss = lambda dirs, z: jnp.sum(fn(dirs, z).astype(weights.dtype) * weights)
    return fn(dirs, z), jax.grad(loss, argnums=(0, 1))(dirs, z)


def assert_close(actual, expected, tolerance, name):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance * scale, err_msg=name)


# batch, length, d_inner, d_state, dtype, reverses, with z, softplus, D and delta_bias given, chunk, chunks per
# staged tile: lengths with and without a short last tile (shorter than a chunk, and longer), d_inner not a multiple
# of 128, one position, each direction alone and Vim's pair.
CASES = [
    (2, 7, 160, 4, "float32", (False, True), True, True, True, 3, 1),
    (1, 1, 128, 4, "float32", (False,), False, False, False, 4, 1),
    (1, 6, 128, 4, "float32", (True,), True, True, True, 3, 1),
    (2, 5, 128, 4, "bfloat16", (False, True), True, True, True, 2, 1),
    (1, 13, 128, 8, "float32", (False, True), True, True, True, 2, 3),
    (2, 11, 128, 4, "bfloat16", (True, False), True, True, True, 2, 3),
    # dB and dC take 96 entries per position (d_state 40): a chunk is not a whole number of 64-entry sums
    (1, 4, 128, 40, "float32", (False, True), True, True, True, 1, 4),
]
# Compiled on a GPU, each case takes one to two minutes; a chunk is unrolled, so chunks above 2 take far longer
# (chunk 4 at Vim-S's shape, chunk 3 at d_state 40 had not compiled after 470 s on the H200).
if not ON_CPU:  # Vim-S's shape; d_state 64 over a long sequence
    CASES += [(2, 197, 768, 16, "bfloat16", (False, True), True, True, True, 2, 4),
              (1, 1000, 200, 64, "float32", (True,), True, True, True, 2, 4)]


@pytest.mark.parametrize("batch,length,d_inner,d_state,dtype,reverses,with_z,softplus,extras,chunk,stages", CASES)
def test_values_and_gradients_match_the_float64_reference(batch, length, d_inner, d_state, dtype, reverses, with_z,
                                                          softplus, extras, chunk, stages):
    dirs = tuple(direction(i, batch, length, d_inner, d_state, dtype, extras) for i in range(len(reverses)))
    r = np.random.default_rng(9)
    z = jnp.asarray(r.normal(size=(batch, length, d_inner)), dtype) if with_z else None
    weights = r.normal(size=(batch, length, d_inner))
    cfg = KernelConfig(reverses, softplus, BlockSizes(chunk=chunk, block_d=128, num_stages=stages, save_every=1),
                       ON_CPU)
    kernel = lambda dirs, z: pallas_gpu_mosaic.scan(dirs, z, cfg)
    y, (g_dirs, g_z) = jax.jit(values_and_grads, static_argnums=0)(kernel, dirs, z,
                                                                     jnp.asarray(weights, jnp.float32))
    with jax.enable_x64(True):
        to64 = lambda tree: jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float64)), tree)
        y_ref, (g_ref, gz_ref) = values_and_grads(lambda d, z: reference_scan(d, z, reverses, softplus), to64(dirs),
                                                  to64(z), jnp.asarray(weights))
        y_ref, g_ref, gz_ref = jax.tree.map(np.asarray, (y_ref, g_ref, gz_ref))
    assert y.shape == (batch, length, d_inner) and y.dtype == jnp.dtype(dtype)
    assert_close(y.astype(jnp.float32), y_ref, VALUE_TOL[dtype], "y")
    if with_z:
        assert g_z.dtype == z.dtype
        assert_close(g_z.astype(jnp.float32), gz_ref, GRAD_TOL[dtype], "dz")
    for k, (g, want) in enumerate(zip(g_dirs, g_ref, strict=True)):
        for name, got, expected, x in zip(ScanDirection._fields, g, want, dirs[k], strict=True):
            assert got.dtype == x.dtype and got.shape == x.shape, name
            assert_close(got.astype(jnp.float32), expected, GRAD_TOL[dtype], f"direction {k}: d{name}")


def test_the_kernels_softplus_keeps_its_relative_error_where_exp_is_tiny():
    """softplus as the kernels run it (compiled on a GPU: with approximate ex2/lg2) against float64 log1p(exp(x)),
    down to x = -100 where log(1 + exp(x)) would round to 0."""
    x = MATH_POINTS.reshape(32, 128)

    def body(x_ref, o_ref):
        for i in range(x.shape[0]):
            o_ref[i] = softplus_from_exp_and_log(x_ref[i])

    got = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(x.shape, jnp.float32),
                       compiler_params=None if ON_CPU else pallas_gpu_mosaic.FORWARD_PARAMS,
                       interpret=pallas_gpu_mosaic.interpret_params() if ON_CPU else None)(x)
    assert_kernel_math_matches_float64(got, x, "softplus")


def test_load_ref_passes_an_index_only_to_a_load_that_requires_one(monkeypatch):
    calls = []

    def load_requiring_index(src, idx, *, layout=None, optimized=True):  # jax 0.10
        calls.append(("required", idx))

    def load_deprecating_index(src, idx=None, *, layout=None, optimized=True):  # jax 0.11
        calls.append(("deprecated", idx))

    def load_without_index(src, *, layout=None, optimized=True):  # later
        calls.append(("none", None))

    for load in (load_requiring_index, load_deprecating_index, load_without_index):
        monkeypatch.setattr(plgpu, "load", load)
        pallas_gpu_mosaic.load_ref("ref", layout="layout", optimized=False)
    assert calls == [("required", ()), ("deprecated", None), ("none", None)]


def test_the_forward_without_saved_states_gives_the_same_output():
    dirs = tuple(direction(i, 2, 7, 160, 4, "float32") for i in range(2))
    z = jnp.asarray(np.random.default_rng(3).normal(size=(2, 7, 160)), jnp.float32)
    cfg = KernelConfig((False, True), True, BlockSizes(chunk=3, block_d=128, save_every=1), ON_CPU)
    out, ypre, states = jax.jit(pallas_gpu_mosaic._forward, static_argnums=(2, 3))(dirs, z, cfg, False)
    assert ypre is None and states is None
    np.testing.assert_allclose(out, reference_scan(dirs, z, (False, True), True), rtol=1e-5, atol=1e-5)


def test_block_sizes_it_cannot_run_are_refused():
    dirs = (direction(0, 1, 4, 128, 4, "float32"),)
    cfg = KernelConfig((False,), True, BlockSizes(chunk=2, block_d=32, save_every=1), ON_CPU)
    with pytest.raises(ValueError, match="block_d must be 128"):
        pallas_gpu_mosaic.scan(dirs, None, cfg)
    # d_state 64 in tiles of 16 positions: the backward's tiles and dB/dC terms need 295 KiB of shared memory
    dirs = (direction(0, 1, 16, 128, 64, "float32"),)
    cfg = KernelConfig((False,), True, BlockSizes(chunk=2, block_d=128, num_stages=8, save_every=1), ON_CPU)
    with pytest.raises(ValueError, match=r"needs 295 KiB of shared memory .* lower num_stages or chunk"):
        pallas_gpu_mosaic.scan(dirs, jnp.zeros((1, 16, 128)), cfg)
    cfg = KernelConfig((False,), True, BlockSizes(chunk=2, block_d=128, num_stages=4, save_every=1), ON_CPU)
    pallas_gpu_mosaic._launch(dirs, jnp.zeros((1, 16, 128)), cfg)  # 215 KiB: fits


def test_the_backward_writes_bfloat16_gradients_rounded_once_from_float32():
    """For bfloat16 inputs the backward kernel stores du, d delta and dz as bfloat16 itself."""
    dirs = tuple(direction(i, 1, 5, 128, 4, "bfloat16") for i in range(2))
    z = jnp.asarray(np.random.default_rng(5).normal(size=(1, 5, 128)), jnp.bfloat16)
    weights = jnp.asarray(np.random.default_rng(6).normal(size=z.shape), jnp.bfloat16)
    cfg = KernelConfig((False, True), True, BlockSizes(chunk=2, block_d=128, save_every=1), ON_CPU)
    loss = lambda dirs, z: jnp.sum(pallas_gpu_mosaic.scan(dirs, z, cfg).astype(jnp.float32) * weights)
    # The Pallas kernels (forward, backward) are the equations with compiler parameters; the backward has more outputs.
    backward_launch = lambda jaxpr: max((e for e in all_eqns(jaxpr) if "compiler_params" in e.params),
                                        key=lambda e: len(e.outvars))
    assert_bfloat16_gradients_rounded_once(jax.grad(loss, argnums=(0, 1)), (dirs, z), z.shape, backward_launch)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_and_backward_lower_for_cuda_as_mosaic_gpu_kernels(dtype):
    dirs = tuple(direction(i, 2, 197, 192, 16, dtype) for i in range(2))
    z = jnp.zeros((2, 197, 192), dtype)
    cfg = KernelConfig((False, True), True, pallas_gpu_mosaic.DEFAULT_BLOCKS, False)
    grads = jax.grad(lambda d, z: jnp.sum(pallas_gpu_mosaic.scan(d, z, cfg).astype(jnp.float32)), (0, 1))
    lowered = jax.jit(grads).trace(dirs, z).lower(lowering_platforms=("cuda",))
    assert re.findall(r"custom_call @(\w+)", lowered.as_text()) == ["mosaic_gpu_v2"] * 2

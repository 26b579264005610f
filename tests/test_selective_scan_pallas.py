"""Pallas selective-scan kernels against the sequential reference: values and every gradient, one and two
directions, float32 and bfloat16, awkward lengths and widths; backend dispatch; TPU and GPU lowering.

On CPU the kernels run in Pallas interpret mode. On a GPU the Triton kernel runs compiled (same tests,
nothing skipped); the TPU kernel always runs interpreted here (no TPU), and its Mosaic lowering is checked
by ``jax.export`` for the TPU platform.
"""

from __future__ import annotations

import functools
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from test_bridge import all_eqns
from test_selective_scan import OPTIONS, _assert_close, _make_inputs

from cab_jax import lower
from cab_jax.kernels.selective_scan import (
    BlockSizes,
    ScanDirection,
    autotune,
    lowering_for,
    pallas_gpu_mosaic,
    pallas_gpu_triton,
    pallas_tpu,
    selective_scan,
    selective_scan_bidirectional,
)
from cab_jax.kernels.selective_scan import api as scan_api
from cab_jax.kernels.selective_scan.pallas_common import KernelConfig

ON_CPU = jax.default_backend() == "cpu"


def _pallas_fns(kernel: str, interpret: bool | None = None):
    """(selective_scan, selective_scan_bidirectional) with impl="pallas" running ``kernel`` ("pallas_triton",
    "pallas_tpu"), interpreted or not as ``interpret`` says (None: compiled where the backend compiles it): the
    public path, api -> the kernel module's ``scan`` -> the launchers."""

    def on_kernel(fn):
        def run(*args, **kwargs):
            interpreted = scan_api._interpreted if interpret is None else lambda kernel: interpret
            with (mock.patch.object(scan_api, "resolve_impl", lambda impl: kernel),
                  mock.patch.object(scan_api, "_interpreted", interpreted)):
                return fn(*args, impl="pallas", **kwargs)

        return run

    return on_kernel(selective_scan), on_kernel(selective_scan_bidirectional)


# Per kernel: (unidirectional fn, bidirectional fn, block sizes, d_inner). Small blocks so that d_inner spans
# several channel blocks with a partial last one, and lengths span several chunks with a partial last one
# (on GPU, several segments of 3 chunks with a partial last one; "gpu_every_chunk" saves every chunk start,
# like the default).
_GPU_FNS = _pallas_fns("pallas_triton")
KERNELS = {
    "gpu": (*_GPU_FNS, BlockSizes(chunk=4, block_d=16, save_every=3), 40),
    "gpu_every_chunk": (*_GPU_FNS, BlockSizes(chunk=4, block_d=16, save_every=1), 40),
    "tpu": (*_pallas_fns("pallas_tpu"), BlockSizes(chunk=8, block_d=128), 200),
}

# The kernels and the reference both accumulate in float32 but in different orders; gradients that sum
# over batch and length (dA, dD, d delta_bias) differ most. Tolerances are relative to max(1, max |expected|)
# (see _assert_close); bfloat16 results are rounded to bfloat16 (2**-8 relative spacing) at the end.
VALUE_TOL = {"float32": {"rtol": 2e-5, "atol": 2e-5}, "bfloat16": {"rtol": 1e-2, "atol": 1e-2}}
GRAD_TOL = {"float32": {"rtol": 1e-4, "atol": 1e-4}, "bfloat16": {"rtol": 2e-2, "atol": 2e-2}}

# (length, d_state, dtype, direction, option): direction is "fwd", "rev" or "bi". Lengths 1, 7, 197, 256, 1000;
# d_state 16 and 64 (and 5, not a power of two); every direction in both dtypes. Interpret mode on CPU is
# compile-bound, hence a sparse grid.
CASES = [
    (1, 16, "float32", "fwd", "full"),
    (7, 5, "bfloat16", "rev", "full"),
    (7, 16, "float32", "bi", "bare"),
    (197, 16, "float32", "bi", "full"),
    (197, 16, "bfloat16", "bi", "full_cab"),
    (197, 64, "float32", "rev", "full"),
    (256, 16, "bfloat16", "fwd", "full"),
    (256, 64, "float32", "bi", "full"),
    (1000, 16, "float32", "rev", "full"),
]


def _directions(length, d_state, dtype, option, d_inner, n_dirs):
    out = []
    for k in range(n_dirs):
        kw, static = _make_inputs(length * 7 + d_state + k, length, dtype, OPTIONS[option], batch=2,
                                  d_inner=d_inner, d_state=d_state)
        out.append((kw, static))
    return out


def _run_pair(kernel, blocks, direction, static):
    """(kernel fn, reference fn), both taking (list of direction kwargs, z)."""
    uni, bi = kernel
    if direction == "bi":
        def run(fn, impl_kw):
            return lambda dirs, z: fn(*[ScanDirection(**d) for d in dirs], z, static["delta_softplus"], **impl_kw)

        return (run(bi, {"blocks": blocks}),
                run(functools.partial(selective_scan_bidirectional, impl="reference"), {}))
    reverse = direction == "rev"

    def run_uni(fn, impl_kw):
        return lambda dirs, z: fn(**dirs[0], z=z, **static, reverse=reverse, **impl_kw)

    return run_uni(uni, {"blocks": blocks}), run_uni(functools.partial(selective_scan, impl="reference"), {})


# Every case for the GPU (two-level checkpoints) and TPU kernels; a subset for the GPU's one-level path.
KERNEL_CASES = ([(backend, *case) for backend in ("gpu", "tpu") for case in CASES]
                + [("gpu_every_chunk", *case) for case in CASES
                   if case[:2] in ((7, 5), (197, 16), (197, 64), (256, 16))])


@pytest.mark.parametrize("backend,length,d_state,dtype,direction,option", KERNEL_CASES)
def test_kernel_values_and_gradients_match_reference(backend, length, d_state, dtype, direction, option):
    uni, bi, blocks, d_inner = KERNELS[backend]
    made = _directions(length, d_state, dtype, option, d_inner, 2 if direction == "bi" else 1)
    static = made[0][1]
    z = made[0][0].pop("z")
    dirs = []
    for kw, _ in made:
        kw.pop("z", None)
        dirs.append({k: v for k, v in kw.items() if v is not None})
    kernel_fn, reference_fn = _run_pair((uni, bi), blocks, direction, static)
    weights = jnp.asarray(np.random.default_rng(length).normal(size=(2, length, d_inner)), jnp.float32)

    @functools.partial(jax.jit, static_argnums=0)  # one compilation for values and gradients
    def value_and_grads(fn, dirs, z):
        loss = lambda dirs, z: jnp.sum(fn(dirs, z).astype(jnp.float32) * weights)
        return fn(dirs, z), jax.grad(loss, argnums=(0, 1))(dirs, z)

    y, (g_dirs, g_z) = value_and_grads(kernel_fn, dirs, z)
    y_ref, (g_dirs_ref, g_z_ref) = value_and_grads(reference_fn, dirs, z)
    assert y.shape == (2, length, d_inner) and y.dtype == jnp.dtype(dtype)
    _assert_close(y, y_ref, VALUE_TOL[dtype], "y")
    if z is not None:
        assert g_z.dtype == z.dtype
        _assert_close(g_z, g_z_ref, GRAD_TOL[dtype], "dz")
    for k, (g, g_ref) in enumerate(zip(g_dirs, g_dirs_ref, strict=True)):
        assert set(g) == set(dirs[k])
        for name in g:
            assert g[name].dtype == dirs[k][name].dtype, name
            if length > 1 or name not in ("A",):  # with one token, dA can be exactly 0 in both
                assert float(jnp.max(jnp.abs(g_ref[name].astype(jnp.float32)))) > 0.0, f"zero reference d{name}"
            _assert_close(g[name], g_ref[name], GRAD_TOL[dtype], f"direction {k}: d{name}")


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_bidirectional_kernel_equals_two_unidirectional_runs(backend):
    """The fused launch computes exactly (scan(fwd) + scan(bwd, reverse)) * silu(z), not something close."""
    uni, bi, blocks, d_inner = KERNELS[backend]
    (kf, static), (kb, _) = _directions(23, 16, "float32", "full", d_inner, 2)
    z = kf.pop("z")
    kb.pop("z")
    fused = bi(ScanDirection(**kf), ScanDirection(**kb), z, static["delta_softplus"], blocks=blocks)
    pre = (uni(**kf, **static, blocks=blocks) + uni(**kb, **static, reverse=True, blocks=blocks))
    np.testing.assert_allclose(fused, pre * jax.nn.silu(z), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["pallas_triton", "pallas_mosaic", "pallas_tpu"])
def test_bfloat16_inputs_accumulate_in_a_float32_state_in_the_kernels(kernel):
    """README: the kernels keep the state in float32 for bfloat16 inputs. With A ~ 0 the state is a running sum of
    600 equal increments: a bfloat16 state (8 significant bits) would stop growing a few hundred increments in."""
    length, dt = 600, 0.01
    ones = jnp.ones((1, length, 2), jnp.bfloat16)
    scan = _pallas_fns(kernel, interpret=True)[0]
    y = scan(u=ones, delta=jnp.full((1, length, 2), dt, jnp.bfloat16), A=-jnp.exp(jnp.full((2, 1), -20.0)),
             B=ones[..., :1], C=ones[..., :1])
    steps = np.asarray(jnp.asarray(dt, jnp.bfloat16), np.float64) * np.arange(1, length + 1)
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32))[0, :, 0], steps, rtol=2**-8 + 1e-4)


def kernel_launches(jaxpr, name: str) -> list:
    """The Pallas launches named ``name`` in ``jaxpr`` and the jaxprs nested in it, in order."""
    return [e for e in all_eqns(jaxpr) if e.primitive.name == "pallas_call" and e.params["name"] == name]


def assert_bfloat16_gradients_rounded_once(grad, args, shape, backward_launch) -> None:
    """``grad(*args)`` of a bidirectional gated scan, ``args`` bfloat16: its gradients of ``shape`` (du and d delta
    per direction, dz) are bfloat16, each the gradient at the same values in float32 rounded to nearest, and so are
    those outputs of the backward kernel's launch (``backward_launch(jaxpr)``: no float32 copies for XLA to cast)."""
    wanted = lambda grads: [a for a in jax.tree.leaves(grads) if a.shape == shape]
    got = wanted(grad(*args))
    expected = wanted(grad(*jax.tree.map(lambda a: a.astype(jnp.float32), args)))
    assert len(got) == 5 and all(g.dtype == jnp.bfloat16 for g in got), [g.dtype for g in got]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(e.astype(jnp.bfloat16), np.float32))
    launch = backward_launch(jax.make_jaxpr(grad)(*args).jaxpr)
    assert [v.aval.dtype for v in launch.outvars if v.aval.shape == shape] == [jnp.bfloat16] * 5


def test_triton_backward_writes_bfloat16_gradients_rounded_once_from_float32():
    """For bfloat16 inputs the Triton backward kernel stores du, d delta and dz as bfloat16 itself."""
    (kf, static), (kb, _) = _directions(45, 16, "bfloat16", "full", 40, 2)
    z = kf.pop("z")
    kb.pop("z")
    weights = jax.random.normal(jax.random.key(0), z.shape, jnp.bfloat16)
    bidirectional = _pallas_fns("pallas_triton", interpret=True)[1]
    blocks = BlockSizes(chunk=4, block_d=16, save_every=1)
    loss = lambda f, b, z: jnp.sum(bidirectional(f, b, z, static["delta_softplus"], blocks=blocks) * weights)

    def backward_launch(jaxpr):
        [launch] = kernel_launches(jaxpr, "selective_scan_bwd")
        return launch

    assert_bfloat16_gradients_rounded_once(jax.grad(loss, argnums=(0, 1, 2)),
                                           (ScanDirection(**kf), ScanDirection(**kb), z), z.shape, backward_launch)


@pytest.mark.parametrize("platform,impl", [("cuda", "pallas_triton"), ("cuda", "pallas_mosaic"), ("tpu", "pallas")])
def test_the_backward_direction_is_read_in_place_without_flipped_copies(platform, impl):
    """README: Vim's two directions run in one launch, the backward one read in place: the program the accelerator
    would run (forward and backward passes) reverses no array, and launches one kernel per pass."""
    (kf, static), (kb, _) = _directions(197, 16, "float32", "full", 128, 2)
    z = kf.pop("z")
    kb.pop("z")
    fn = lambda f, b, z: jnp.sum(selective_scan_bidirectional(f, b, z, static["delta_softplus"], impl=impl))
    with lowering_for(platform):
        text = jax.jit(jax.grad(fn, argnums=(0, 1, 2))).trace(ScanDirection(**kf), ScanDirection(**kb), z).lower(
            lowering_platforms=(platform,)).as_text()
        target = lower.KERNEL_TARGETS[scan_api.resolve_impl(impl)]
    assert "stablehlo.reverse" not in text
    assert text.count(f"stablehlo.custom_call @{target}") == 2, impl


@pytest.mark.parametrize("save_every", [1, 3])
def test_training_saves_only_the_states_at_segment_starts(save_every):
    """README: for the backward pass the forward saves the state only at every ``save_every``-th chunk start (12
    chunks of 4 for 45 positions: 12 or 4 states per sequence and direction), never one per position."""
    (kf, static), (kb, _) = _directions(45, 16, "float32", "full", 40, 2)
    z = kf.pop("z")
    kb.pop("z")
    blocks = BlockSizes(chunk=4, block_d=16, save_every=save_every)
    fn = lambda f, b, z: KERNELS["gpu"][1](f, b, z, static["delta_softplus"], blocks=blocks)
    _, vjp = jax.vjp(fn, ScanDirection(**kf), ScanDirection(**kb), z)
    residuals = [leaf.shape for leaf in jax.tree.leaves(vjp)]
    states = [shape for shape in residuals if len(shape) == 4 and shape[2:] == (16, 40)]  # (batch, saved, N, D)
    assert states and all(shape[:2] == (2, 12 // save_every) for shape in states), residuals


@pytest.mark.parametrize("save_every", [1, 4, 100])
def test_gpu_checkpoint_spacing_changes_nothing(save_every):
    """Saving the state every chunk, every few chunks or once gives the same values and gradients: the
    backward pass recomputes the same states with the same operations (up to how XLA contracts them)."""
    (kf, static), (kb, _) = _directions(45, 16, "float32", "full", 40, 2)
    z = kf.pop("z")
    kb.pop("z")
    fwd, bwd = ScanDirection(**kf), ScanDirection(**kb)

    def value_and_grads(blocks):
        fn = lambda f, b, z: KERNELS["gpu"][1](f, b, z, static["delta_softplus"], blocks=blocks)
        loss = lambda f, b, z: jnp.sum(jnp.sin(fn(f, b, z)))
        return fn(fwd, bwd, z), jax.grad(loss, argnums=(0, 1, 2))(fwd, bwd, z)

    expected = value_and_grads(BlockSizes(chunk=4, block_d=16, save_every=2))
    got = value_and_grads(BlockSizes(chunk=4, block_d=16, save_every=save_every))
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


# 4,096 float32 points for the GPU kernels' softplus and sigmoid: -100 to 40, and both sides of their branches
# (e = exp(x) = 1/8 near -2.08, softplus's identity above 20).
_MATH_EDGES = [-20.0, -3.5, -3.4, -2.1, -2.0, 0.0, 19.99, 20.0, 20.01]
MATH_POINTS = np.pad(np.concatenate([np.linspace(-100.0, 40.0, 4000), _MATH_EDGES]),
                     (0, 4096 - 4000 - len(_MATH_EDGES))).astype(np.float32)


def assert_kernel_math_matches_float64(got, x, name: str) -> None:
    """``got``: softplus (with PyTorch's threshold) or sigmoid of ``x`` as a GPU kernel computed it; against float64,
    within 1e-6 relative interpreted and 5e-6 compiled (approximate ex2/lg2/rcp)."""
    x64 = np.asarray(x, np.float64)
    expected = np.where(x64 > 20, x64, np.log1p(np.exp(x64))) if name == "softplus" else 1 / (1 + np.exp(-x64))
    np.testing.assert_allclose(got, expected, rtol=1e-6 if ON_CPU else 5e-6, atol=1e-37)


@pytest.mark.parametrize("name", ["softplus", "sigmoid"])
def test_gpu_kernel_math_matches_float64(name):
    """The GPU kernel's softplus and sigmoid formulas; compiled on a GPU, on its approximate PTX ex2/lg2/rcp."""
    fn = {"softplus": pallas_gpu_triton._softplus, "sigmoid": pallas_gpu_triton._sigmoid}[name]

    def kernel(x_ref, o_ref):
        o_ref[...] = fn(x_ref[...], not ON_CPU)

    x = MATH_POINTS
    got = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, jnp.float32), interpret=ON_CPU)(x)
    assert_kernel_math_matches_float64(got, x, name)


def test_block_sizes_parse_and_print():
    blocks = BlockSizes.parse("2, 32,1,1,8")
    assert blocks == BlockSizes(chunk=2, block_d=32, num_warps=1, num_stages=1, save_every=8)
    assert BlockSizes.parse(str(blocks)) == blocks and str(blocks) == "2,32,1,1,8"
    for bad in ("2", "4,64", "2,x,1,1,1", "2,32,1,1,8,1", "-2,32,1,1,1", "\u00b2,32,1,1,1", ""):
        with pytest.raises(ValueError, match="expected 5 positive integers"):
            BlockSizes.parse(bad)


def test_autotune_picks_the_fastest_and_reports_failures(monkeypatch):
    shape = autotune.ScanShape(batch=1, length=9, d_inner=24, d_state=4)
    fast, slow, broken = (BlockSizes(chunk=2, block_d=8, num_warps=1, save_every=2),
                          BlockSizes(chunk=4, block_d=16, num_warps=1), BlockSizes(chunk=2, block_d=32, num_warps=1))
    times = {fast: 1.0, slow: 2.0}

    def timer(fn, args, iters):
        blocks = seen[-1]
        if blocks == broken:
            raise RuntimeError("out of registers\nsecond line")
        jax.block_until_ready(fn(*args))  # the timed function runs: forward and backward of a real kernel
        return times[blocks]

    seen, scan_fn = [], autotune.scan_fn
    monkeypatch.setattr(autotune, "scan_fn", lambda impl, n, blocks: seen.append(blocks) or scan_fn(impl, n, blocks))
    best, rows = autotune.autotune(shape, blocks=[slow, broken, fast], iters=1, timer=timer)
    assert best == fast
    assert [r["blocks"] for r in rows] == [slow, broken, fast]
    assert rows[1]["error"] == "RuntimeError: out of registers" and rows[2]["fwd+bwd ms"] == 1.0
    assert rows[0]["temp MiB"] > 0
    with pytest.raises(RuntimeError, match="every candidate failed"):
        autotune.autotune(shape, blocks=[broken], iters=1, timer=lambda *a: 1 / 0)


def test_autotune_command_line_prints_the_flag_of_the_fastest(monkeypatch, capsys):
    """``python -m ...autotune --shape=...`` ends with the config flag that selects the fastest tiling (here two
    candidates with made-up times, the slower one first), and refuses a malformed --shape with a usage error."""
    fast = BlockSizes(chunk=2, block_d=32, num_warps=1, save_every=2)
    slow = BlockSizes(chunk=4, block_d=16, num_warps=1)
    monkeypatch.setattr(autotune, "candidates", lambda shape, kernel=None: [slow, fast])
    times, real = [2.0, 1.0], autotune.autotune  # slow's time, then fast's
    monkeypatch.setattr(autotune, "autotune", lambda shape, dtype, iters: real(
        shape, dtype=dtype, iters=iters, timer=lambda fn, args, n: times.pop(0)))
    autotune.main(["--shape=1,8,32,4", "--iters=1"])
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "fastest: --config.student.scan_blocks=2,32,1,1,2", out
    assert BlockSizes.parse(out[-1].split("=", 1)[1]) == fast
    with pytest.raises(SystemExit) as exit_info:
        autotune.main(["--shape=1,8,32"])
    assert exit_info.value.code == 2 and "--shape must be four integers" in capsys.readouterr().err


def test_autotune_candidates_start_with_the_defaults_and_are_valid():
    for kernel, module in (("pallas_triton", pallas_gpu_triton), ("pallas_tpu", pallas_tpu),
                           ("pallas_mosaic", pallas_gpu_mosaic)):
        for d_state in (16, 64):
            shape = autotune.ScanShape(128, 197, 768, d_state)
            found = autotune.candidates(shape, kernel)
            assert found[0] == module.default_blocks(d_state) and len(found) == len(set(found)) >= 4


def test_block_sizes_validate():
    with pytest.raises(ValueError, match=r"BlockSizes\.chunk must be >= 1"):
        BlockSizes(chunk=0)
    with pytest.raises(ValueError, match=r"BlockSizes\.save_every must be >= 1"):
        BlockSizes(save_every=0)


# ------------------------------------------------------------------------------------------ dispatch


class _Gpu:
    def __init__(self, compute_capability):
        self.compute_capability = compute_capability


@pytest.mark.parametrize("backend,capability,impl,expected", [
    ("cpu", None, "auto", "associative"), ("cpu", None, "pallas", "pallas_triton"),
    ("tpu", None, "auto", "pallas_tpu"), ("tpu", None, "pallas", "pallas_tpu"),
    ("gpu", "9.0", "auto", "pallas_triton"), ("gpu", "8.0", "pallas", "pallas_triton"),
    ("gpu", "9.0", "pallas_mosaic", "pallas_mosaic"), ("cpu", None, "pallas_mosaic", "pallas_mosaic")])
def test_auto_and_pallas_pick_the_backends_kernel(monkeypatch, backend, capability, impl, expected):
    monkeypatch.setattr(scan_api.jax, "default_backend", lambda: backend)
    monkeypatch.setattr(scan_api.jax, "devices", lambda: [_Gpu(capability)])
    assert scan_api.resolve_impl(impl) == expected


@pytest.fixture
def logged(monkeypatch):
    """The api module's log lines, as (level, message) (absl's logger may not propagate to pytest's capture)."""
    lines = []
    for level in ("info", "warning"):
        monkeypatch.setattr(scan_api.logging, level,
                            lambda msg, *args, level=level: lines.append((level, msg % args)))
    return lines


@pytest.fixture
def jax_without_triton(monkeypatch):
    """A GPU backend whose JAX no longer ships Pallas's Triton backend."""
    monkeypatch.setattr(scan_api.jax, "default_backend", lambda: "gpu")
    real_find_spec = scan_api.importlib.util.find_spec
    monkeypatch.setattr(scan_api.importlib.util, "find_spec",
                        lambda name: None if name.endswith("pallas.triton") else real_find_spec(name))
    scan_api.gpu_kernel.cache_clear()
    scan_api._warn_no_gpu_kernel.cache_clear()
    yield lambda capability: monkeypatch.setattr(scan_api.jax, "devices", lambda: [_Gpu(capability)])
    scan_api.gpu_kernel.cache_clear()


def test_without_triton_hopper_runs_mosaic_and_saying_so_once(jax_without_triton, logged):
    jax_without_triton("9.0")
    assert scan_api.resolve_impl("auto") == scan_api.resolve_impl("pallas") == "pallas_mosaic"
    assert logged == [("info", "selective scan: the pallas_mosaic kernel (compute capability 9.0; this JAX has no "
                               "Pallas Triton backend)")]


def test_with_triton_a_gpu_runs_the_triton_kernel_and_says_so_once(monkeypatch, logged):
    """README: the first scan of a run logs which kernel it chose; while JAX ships Pallas's Triton backend that is
    the Triton kernel on any GPU, Hopper included, and the line says why."""
    monkeypatch.setattr(scan_api.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(scan_api.jax, "devices", lambda: [_Gpu("9.0")])
    scan_api.gpu_kernel.cache_clear()
    try:
        assert [scan_api.resolve_impl(impl) for impl in ("auto", "pallas", "auto")] == ["pallas_triton"] * 3
    finally:
        scan_api.gpu_kernel.cache_clear()
    assert logged == [("info", "selective scan: the pallas_triton kernel (compute capability 9.0; as fast as "
                               "pallas_mosaic and compiled in seconds, not minutes; JAX deprecates Pallas's Triton "
                               "backend)")]


def test_a_gpu_without_a_kernel_falls_back_to_associative_or_says_why(jax_without_triton, logged):
    """Before Hopper, once JAX drops Pallas's Triton backend: "auto" warns once and runs associative; "pallas"
    fails naming both requirements."""
    jax_without_triton("8.6")
    assert scan_api.resolve_impl("auto") == scan_api.resolve_impl("auto") == "associative"
    assert len(logged) == 1 and logged[0][0] == "warning" and "falls back to 'associative'" in logged[0][1]
    with pytest.raises(ValueError, match=r"compute capability 9\.0 .* no longer ships"):
        scan_api.resolve_impl("pallas")


@pytest.mark.parametrize("impl,module,interpret", [("pallas_triton", pallas_gpu_triton, True),
                                                   ("pallas_mosaic", pallas_gpu_mosaic, True),
                                                   ("pallas_tpu", pallas_tpu, True)])
def test_pallas_launches_the_kernels_scan(monkeypatch, impl, module, interpret):
    """A kernel impl calls its module's ``scan`` with the launch config of the call: the directions' order,
    softplus, the given block sizes or the kernel's defaults, interpreted on CPU (where these tests run)."""
    monkeypatch.setattr(scan_api, "resolve_impl", lambda name: impl)
    launched = []

    def scan(dirs, z, cfg):
        launched.append((len(dirs), z is not None, cfg))
        assert all(d.D is not None and d.delta_bias is not None for d in dirs)  # the kernels take both
        return jnp.zeros_like(dirs[0].u)

    monkeypatch.setattr(module, "scan", scan)
    (kf, _), (kb, _) = _directions(7, 16, "float32", "bare", 12, 2)  # no D, delta_bias or z
    kf.pop("z")
    kb.pop("z")
    z = jnp.ones_like(kf["u"])
    blocks = BlockSizes(chunk=8, block_d=128)
    selective_scan(**kf, z=z, delta_softplus=True, reverse=True, impl="pallas")
    selective_scan_bidirectional(ScanDirection(**kf), ScanDirection(**kb), impl="pallas", blocks=blocks)
    assert launched == [(1, True, KernelConfig((True,), True, module.default_blocks(16), interpret)),
                        (2, False, KernelConfig((False, True), False, blocks, interpret))]


def test_api_pallas_matches_reference_bidirectional():
    (kf, static), (kb, _) = _directions(9, 16, "bfloat16", "full", 12, 2)
    z = kf.pop("z")
    kb.pop("z")
    fwd, bwd = ScanDirection(**kf), ScanDirection(**kb)
    y = selective_scan_bidirectional(fwd, bwd, z, static["delta_softplus"], impl="pallas")
    y_ref = selective_scan_bidirectional(fwd, bwd, z, static["delta_softplus"], impl="reference")
    assert y.dtype == jnp.bfloat16
    _assert_close(y, y_ref, VALUE_TOL["bfloat16"])


def test_bidirectional_shape_mismatch_is_reported():
    (kf, _), (kb, _) = _directions(9, 16, "float32", "bare", 12, 2)
    kf.pop("z")
    kb.pop("z")
    kb["u"] = kb["u"][:, :5]
    with pytest.raises(ValueError, match="expected"):
        selective_scan_bidirectional(ScanDirection(**kf), ScanDirection(**kb), impl="reference")


# ---------------------------------------------------------------------------------------- lowering


def _export_grad(fn, platform: str, dtype: str, bidirectional: bool, reverse: bool = False):
    batch, length, d_inner, d_state = 2, 197, 200, 16
    sds = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, jnp.dtype(dt))
    direction = {"u": sds((batch, length, d_inner)), "delta": sds((batch, length, d_inner)),
                 "A": sds((d_inner, d_state), "float32"), "B": sds((batch, length, d_state)),
                 "C": sds((batch, length, d_state)), "D": sds((d_inner,), "float32"),
                 "delta_bias": sds((d_inner,), "float32")}
    uni, bi = fn
    if bidirectional:
        loss = lambda dirs, z: jnp.sum(bi(ScanDirection(**dirs[0]), ScanDirection(**dirs[1]), z,
                                          True).astype(jnp.float32))
        args = ([direction, direction], sds((batch, length, d_inner)))
    else:
        loss = lambda dirs, z: jnp.sum(uni(**dirs[0], z=z, delta_softplus=True, reverse=reverse).astype(jnp.float32))
        args = ([direction], sds((batch, length, d_inner)))
    target = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}[platform]
    exported = jax.export.export(
        jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)])(*args)
    return exported.mlir_module()


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("bidirectional,reverse", [(False, False), (False, True), (True, False)])
def test_forward_and_backward_lower_for_gpu_and_tpu(platform, dtype, bidirectional, reverse):
    kernel = "pallas_triton" if platform == "cuda" else "pallas_tpu"
    text = _export_grad(_pallas_fns(kernel, interpret=False), platform, dtype, bidirectional, reverse)
    target = lower.KERNEL_TARGETS[kernel]
    # Forward (with residuals) and backward are both kernels: two custom calls, no XLA scan.
    assert text.count(f"@{target}") == 2, text.count(f"@{target}")
    assert "stablehlo.while" not in text


def _tpu_forward_text(tpu: str, length: int) -> str:
    """The exported TPU module of a bidirectional forward over 128 channels, for generation ``tpu``."""
    with scan_api.lowering_for("tpu", tpu=tpu):
        d = ScanDirection(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in [(1, length, 128)] * 2 + [(128, 16)]
                            + [(1, length, 16)] * 2 + [(128,)] * 2))
        fn = jax.jit(lambda f, b: selective_scan_bidirectional(f, b, None, True, impl="pallas"))
        return jax.export.export(fn, platforms=["tpu"])(d, d).mlir_module()


@pytest.mark.parametrize("tpu,launches,vmem", [("v4", 2, 16), ("v5e", 1, 128), ("v5p", 1, 64), ("v6e", 1, 128)])
def test_the_tpu_kernel_plans_with_each_generations_vmem(tpu, launches, vmem):
    """The resident budget is half of the generation's VMEM per core (JAX's table), 8 MiB on 16 MiB chips: at 20,480
    positions the first direction's float32 output (80 KiB per channel) fits 128 channels on v5e/v5p/v6e (one
    launch), not on v4 (two launches, the sum through HBM). README: past 16 MiB the kernel raises the scoped VMEM
    limit to 3/4 of the core's VMEM (v2-v4 keep their default)."""
    assert scan_api.tpu_vmem_bytes() == 16 << 20  # outside lowering_for, on a machine without a TPU: v4's
    with scan_api.lowering_for("tpu", tpu=tpu):
        assert scan_api.tpu_vmem_bytes() == vmem << 20
    text = _tpu_forward_text(tpu, 20480)
    assert text.count("@tpu_custom_call") == launches
    assert pallas_tpu.resident_bytes(vmem << 20) == (8 << 20 if vmem == 16 else vmem << 19)
    scoped = {int(size) for size in re.findall(r"scoped_memory_configs\\22: \[\{[^}]*\\22size\\22: (\d+)", text)}
    assert scoped == (set() if vmem == 16 else {(vmem << 20) * 3 // 4}), scoped


@pytest.mark.parametrize("length,launches", [(131072, 1), (135168, 2)])
def test_on_v5e_the_first_directions_sum_stays_in_vmem_up_to_128k_positions(length, launches):
    """README: the sum goes through HBM in two launches past about 128k positions on v5e (64 MiB resident: 128
    channels x 4 bytes per position)."""
    assert _tpu_forward_text("v5e", length).count("@tpu_custom_call") == launches


@pytest.mark.parametrize("past,launches", [(0, 1), (512, 2)])
def test_on_v4_the_first_directions_sum_stays_in_vmem_up_to_16k_positions(past, launches):
    """README: on v4 the sum goes through HBM in two launches "from about 16k positions" (8 MiB resident: 128
    channels x 4 bytes per position): one launch at README's 16k (16,384), two at 512 positions more."""
    import readme_text

    (thousands,) = readme_text.find(r"on v4 from about (\d+)k positions")
    assert _tpu_forward_text("v4", int(thousands) * 1024 + past).count("@tpu_custom_call") == launches


@pytest.mark.parametrize("resident_bytes,path,launches", [(4 * 200 * 128, "narrowed block_d", [(2, 128)]),
                                                           (1024, "two launches", [(1, 256), (1, 256)])])
def test_tpu_long_sequence_fallbacks_match_reference(monkeypatch, resident_bytes, path, launches):
    """Two TPU directions keep the first one's sum in VMEM; when that does not fit, block_d narrows, and past
    128 channels the sum goes through HBM between two launches. A small budget forces each path."""
    monkeypatch.setattr(pallas_tpu, "resident_bytes", lambda vmem_bytes: resident_bytes)
    seen, forward_call = [], pallas_tpu._forward_call

    def spy(dirs, z, cfg, geo, *args, **kwargs):
        seen.append((len(dirs), geo.block_d))
        return forward_call(dirs, z, cfg, geo, *args, **kwargs)

    monkeypatch.setattr(pallas_tpu, "_forward_call", spy)
    (kf, _), (kb, _) = _directions(197, 16, "float32", "full", 300, 2)
    z = kf.pop("z")
    kb.pop("z")
    fwd, bwd = ScanDirection(**kf), ScanDirection(**kb)
    blocks = BlockSizes(chunk=8, block_d=256)
    loss = lambda fn: lambda f, b: jnp.sum(fn(f, b) ** 2)
    kernel = lambda f, b: KERNELS["tpu"][1](f, b, z, True, blocks=blocks)
    reference = lambda f, b: selective_scan_bidirectional(f, b, z, True, impl="reference")
    _assert_close(kernel(fwd, bwd), reference(fwd, bwd), VALUE_TOL["float32"], path)
    assert seen == launches
    grads = jax.grad(loss(kernel), argnums=(0, 1))(fwd, bwd)
    grads_ref = jax.grad(loss(reference), argnums=(0, 1))(fwd, bwd)
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        _assert_close(g, g_ref, GRAD_TOL["float32"], path)

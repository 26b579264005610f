"""Tests of the Mamba-2 (SSD) scan: reference vs a float64 NumPy oracle, chunked vs reference (values, final
state and gradients), ``ssd_step`` token by token and split sequences vs the whole, and the public API."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cab_jax.kernels.ssd import SSD_IMPLS, ssd, ssd_step
from cab_jax.kernels.ssd import api as ssd_api
from cab_jax.kernels.ssd.chunked import ssd_chunked
from cab_jax.kernels.ssd.reference import ssd_reference

BATCH, HEADS, HEAD_DIM, D_STATE = 2, 4, 3, 5

# Tolerances per input dtype. ``atol`` is relative to the scale of the expected array (max(1, max|x|)).
# float32: the two algorithms sum in different orders (and the chunked one takes exp of differences of
# cumulative sums), so they agree to a few float32 ulps of the largest value. bfloat16: the inputs are
# upcast exactly and all arithmetic is float32 in both, but y is rounded to bfloat16 (2**-8 relative
# spacing), so the two can differ by one bfloat16 ulp; the float32 state and gradients w.r.t. float32
# arguments stay tight, bfloat16 gradients are rounded to bfloat16 as well.
VALUE_TOL = {"float32": {"rtol": 1e-5, "atol": 1e-5}, "bfloat16": {"rtol": 8e-3, "atol": 8e-3}}
STATE_TOL = {"float32": {"rtol": 1e-5, "atol": 1e-5}, "bfloat16": {"rtol": 1e-5, "atol": 1e-5}}
GRAD_TOL = {"float32": {"rtol": 2e-5, "atol": 2e-5}, "bfloat16": {"rtol": 8e-3, "atol": 8e-3}}
# Range of log_decay per regime: "none" is 0 (no decay, the state only accumulates), "strong" reaches -10.
DECAYS = {"none": (0.0, 0.0), "mixed": (-2.0, 0.0), "strong": (-10.0, 0.0)}


def _make_inputs(seed, length, dtype="float32", groups=2, decay="mixed", D=True, initial_state=True):
    """Keyword arguments of ``ssd``: activations in ``dtype``; D and the initial state float32 (model params)."""
    rng = np.random.default_rng(seed)
    low, high = DECAYS[decay]
    kw = {
        "x": jnp.asarray(rng.normal(size=(BATCH, length, HEADS, HEAD_DIM)), dtype),
        "log_decay": jnp.asarray(rng.uniform(low, high, (BATCH, length, HEADS)), dtype),
        "B": jnp.asarray(rng.normal(size=(BATCH, length, groups, D_STATE)), dtype),
        "C": jnp.asarray(rng.normal(size=(BATCH, length, groups, D_STATE)), dtype),
        "D": jnp.asarray(rng.normal(size=HEADS), jnp.float32) if D else None,
        "initial_state": (jnp.asarray(rng.normal(size=(BATCH, HEADS, HEAD_DIM, D_STATE)), jnp.float32)
                          if initial_state else None),
    }
    return kw


def _numpy_ssd(x, log_decay, B, C, D=None, initial_state=None):
    """Independent float64 oracle: the recurrence as an explicit loop over time and heads."""
    f64 = lambda t: None if t is None else np.asarray(jnp.asarray(t, jnp.float32), np.float64)
    x, log_decay, B, C, D, initial_state = map(f64, (x, log_decay, B, C, D, initial_state))
    batch, length, heads, head_dim = x.shape
    per_group = heads // B.shape[2]
    h = np.zeros((batch, heads, head_dim, B.shape[3])) if initial_state is None else initial_state.copy()
    y = np.zeros_like(x)
    for t in range(length):
        for head in range(heads):
            g = head // per_group
            for b in range(batch):
                h[b, head] = np.exp(log_decay[b, t, head]) * h[b, head] + np.outer(x[b, t, head], B[b, t, g])
                y[b, t, head] = h[b, head] @ C[b, t, g]
                if D is not None:
                    y[b, t, head] += D[head] * x[b, t, head]
    return y, h


def _assert_close(actual, expected, tol, what=""):
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale, err_msg=what)


# ------------------------------------------------------------------------------------- reference vs NumPy

# (length, groups, dtype, decay, D and initial_state given)
REFERENCE_CASES = [
    (1, 2, "float32", "mixed", True),
    (7, 4, "float32", "strong", True),
    (100, 2, "float32", "none", False),
    (197, 1, "float32", "mixed", True),
    (64, 2, "bfloat16", "strong", True),
]


@pytest.mark.parametrize("length,groups,dtype,decay,extras", REFERENCE_CASES)
def test_reference_vs_numpy(length, groups, dtype, decay, extras):
    kw = _make_inputs(length + 1, length, dtype, groups, decay, D=extras, initial_state=extras)
    y, state = ssd_reference(**kw, return_final_state=True)
    assert y.shape == (BATCH, length, HEADS, HEAD_DIM) and y.dtype == jnp.dtype(dtype)
    assert state.shape == (BATCH, HEADS, HEAD_DIM, D_STATE) and state.dtype == jnp.float32
    y_np, state_np = _numpy_ssd(**kw)
    _assert_close(y, y_np, VALUE_TOL[dtype], "y")
    _assert_close(state, state_np, STATE_TOL[dtype], "final state")


# ------------------------------------------------------------------------------------ chunked vs reference

# (length, chunk_size, groups, dtype, decay). Lengths that are not multiples of the chunk exercise padding;
# 1 and 7 < chunk a single short chunk. Compile-bound, hence a sparse grid.
CHUNKED_CASES = [
    (1, 16, 2, "float32", "mixed"),
    (7, 16, 4, "float32", "strong"),
    (64, 16, 2, "float32", "mixed"),
    (64, 32, 4, "bfloat16", "none"),
    (100, 32, 2, "float32", "none"),
    (100, 16, 1, "bfloat16", "mixed"),
    (197, 32, 2, "float32", "strong"),
    (197, 16, 4, "float32", "mixed"),
    (197, 32, 2, "bfloat16", "strong"),
]


@pytest.mark.parametrize("length,chunk,groups,dtype,decay", CHUNKED_CASES)
def test_chunked_vs_reference(length, chunk, groups, dtype, decay):
    kw = _make_inputs(length * 7 + chunk, length, dtype, groups, decay)
    y, state = ssd_chunked(**kw, return_final_state=True, chunk_size=chunk)
    y_ref, state_ref = ssd_reference(**kw, return_final_state=True)
    assert y.dtype == jnp.dtype(dtype) and state.dtype == jnp.float32
    _assert_close(y, y_ref, VALUE_TOL[dtype], "y")
    _assert_close(state, state_ref, STATE_TOL[dtype], "final state")


def test_chunked_without_optional_arguments():
    kw = _make_inputs(5, 37, groups=2, D=False, initial_state=False)
    _assert_close(ssd_chunked(**kw, chunk_size=16), ssd_reference(**kw), VALUE_TOL["float32"])


def test_chunked_precision_strong_decay_long_chunks():
    # Segment sums reach -1000 within a chunk of 128: summing them as differences of cumulative sums would
    # cost ~1e-5 relative (float32 cancellation); the direct sums keep the chunked scan within ~1e-7.
    kw = _make_inputs(6, 256, groups=2, decay="strong")
    y, state = ssd_chunked(**kw, return_final_state=True, chunk_size=128)
    y_np, state_np = _numpy_ssd(**kw)
    tight = {"rtol": 1e-6, "atol": 1e-6}
    _assert_close(y, y_np, tight, "y")
    _assert_close(state, state_np, tight, "final state")


def _grads(fn, kw, weights, **static):
    params = {k: v for k, v in kw.items() if v is not None}

    @jax.jit  # One compilation for forward and backward (the tests are compile-bound).
    def grad(p):
        def loss(p):
            y, state = fn(**p, return_final_state=True, **static)
            return jnp.sum(y.astype(jnp.float32) * weights[0]) + jnp.sum(state * weights[1])

        return jax.grad(loss)(p)

    return grad(params)


GRAD_CASES = [
    (197, 32, 2, "float32", "strong"),
    (100, 16, 4, "float32", "none"),
    (100, 32, 1, "bfloat16", "mixed"),
]


@pytest.mark.parametrize("length,chunk,groups,dtype,decay", GRAD_CASES)
def test_gradients_chunked_vs_reference(length, chunk, groups, dtype, decay):
    kw = _make_inputs(length * 3 + chunk, length, dtype, groups, decay)
    rng = np.random.default_rng(length)
    weights = (jnp.asarray(rng.normal(size=(BATCH, length, HEADS, HEAD_DIM)), jnp.float32),
               jnp.asarray(rng.normal(size=(BATCH, HEADS, HEAD_DIM, D_STATE)), jnp.float32))
    g_ref = _grads(ssd_reference, kw, weights)
    g_chunked = _grads(ssd_chunked, kw, weights, chunk_size=chunk)
    assert set(g_ref) == set(g_chunked) == {"x", "log_decay", "B", "C", "D", "initial_state"}
    for name, g in g_ref.items():
        assert g_chunked[name].dtype == g.dtype == kw[name].dtype, name
        assert bool(jnp.all(jnp.isfinite(g_chunked[name].astype(jnp.float32)))), f"non-finite gradient for {name}"
        assert float(jnp.max(jnp.abs(g.astype(jnp.float32)))) > 0.0, f"zero gradient for {name}"
        tol = GRAD_TOL[dtype] if kw[name].dtype == jnp.bfloat16 else GRAD_TOL["float32"]
        _assert_close(g_chunked[name], g, tol, what=name)


# -------------------------------------------------------------------------- step-by-step and split sequences


@pytest.mark.parametrize("dtype,groups", [("float32", 2), ("bfloat16", 4)])
def test_step_by_step_matches_full_sequence(dtype, groups):
    length = 11
    kw = _make_inputs(21, length, dtype, groups, "mixed")
    y_full, state_full = ssd(**kw, return_final_state=True, chunk_size=4)
    state = kw["initial_state"]
    step = jax.jit(ssd_step)
    ys = []
    for t in range(length):
        y_t, state = step(state, kw["x"][:, t], kw["log_decay"][:, t], kw["B"][:, t], kw["C"][:, t], kw["D"])
        assert y_t.dtype == jnp.dtype(dtype) and state.dtype == jnp.float32
        ys.append(y_t)
    _assert_close(jnp.stack(ys, axis=1), y_full, VALUE_TOL[dtype], "y")
    _assert_close(state, state_full, STATE_TOL[dtype], "final state")


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_split_sequence_with_initial_state(impl):
    length, split = 45, 19
    kw = _make_inputs(8, length, groups=2)
    y_full, state_full = ssd(**kw, return_final_state=True, chunk_size=8, impl=impl)
    part = lambda sl: {k: kw[k][:, sl] for k in ("x", "log_decay", "B", "C")}
    y1, state1 = ssd(**part(slice(0, split)), D=kw["D"], initial_state=kw["initial_state"],
                     return_final_state=True, chunk_size=8, impl=impl)
    y2, state2 = ssd(**part(slice(split, None)), D=kw["D"], initial_state=state1,
                     return_final_state=True, chunk_size=8, impl=impl)
    _assert_close(jnp.concatenate([y1, y2], axis=1), y_full, VALUE_TOL["float32"], "y")
    _assert_close(state2, state_full, STATE_TOL["float32"], "final state")


def test_initial_state_matters():
    # Guards the tests above against inputs for which the initial state would not matter.
    kw = _make_inputs(9, 20)
    y_zero = ssd(**{**kw, "initial_state": None})
    assert float(jnp.max(jnp.abs(ssd(**kw) - y_zero))) > 1e-2


def test_chunked_memory_is_linear_in_length():
    # Phi-Mamba shape (batch 8, length 8192, 32 heads, head_dim 64, d_state 64, B and C per head): forward + backward
    # must not materialise anything of size length^2 (8 * 32 * 8192^2 float32 = 64 GiB). Compiled, not run.
    b, n, h, p, s = 8, 8192, 32, 64, 64
    args = (jax.ShapeDtypeStruct((b, n, h, p), jnp.bfloat16), jax.ShapeDtypeStruct((b, n, h), jnp.float32),
            jax.ShapeDtypeStruct((b, n, h, s), jnp.bfloat16), jax.ShapeDtypeStruct((b, n, h, s), jnp.bfloat16))
    loss = lambda *a: jnp.sum(ssd(*a, impl="chunked", chunk_size=64).astype(jnp.float32))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("memory analysis not available on this backend")
    one_square = b * h * n * n * 4
    assert analysis.temp_size_in_bytes < one_square / 4, analysis.temp_size_in_bytes


# --------------------------------------------------------------------------------------------------- API


def test_ssd_impls():
    assert SSD_IMPLS == ("auto", "reference", "chunked")


@pytest.mark.parametrize("impl,target", [("auto", "chunked"), ("chunked", "chunked"), ("reference", "reference")])
def test_api_dispatch_and_arguments(monkeypatch, impl, target):
    calls = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(ssd_api, "ssd_reference", spy("reference", ssd_reference))
    monkeypatch.setattr(ssd_api, "ssd_chunked", spy("chunked", ssd_chunked))
    kw = _make_inputs(13, 10)
    y, state = ssd(**kw, return_final_state=True, chunk_size=4, impl=impl)
    assert calls == [target]
    static = {"chunk_size": 4} if target == "chunked" else {}
    direct = {"reference": ssd_reference, "chunked": ssd_chunked}[target](**kw, return_final_state=True, **static)
    # Same function, same arguments: bit-identical (catches a dropped D or initial_state).
    np.testing.assert_array_equal(np.asarray(y), np.asarray(direct[0]))
    np.testing.assert_array_equal(np.asarray(state), np.asarray(direct[1]))
    assert ssd(**kw, chunk_size=4, impl=impl).shape == y.shape  # without the final state: y alone


@pytest.mark.parametrize("impl", ["Chunked", "", "pallas", "associative"])
def test_api_unknown_impl(impl):
    msg = f"unknown impl {impl!r}; valid choices are ('auto', 'reference', 'chunked')"
    with pytest.raises(ValueError, match=re.escape(msg)):
        ssd(**_make_inputs(0, 4), impl=impl)


_B, _L, _H, _P, _G, _N = BATCH, 4, HEADS, HEAD_DIM, 2, D_STATE


@pytest.mark.parametrize(
    "name,bad_shape,expected",
    [
        ("log_decay", (_B, _L, _H, 1), f"expected (batch, length, heads) = {(_B, _L, _H)}"),
        ("log_decay", (_B, _L + 1, _H), f"expected (batch, length, heads) = {(_B, _L, _H)}"),
        ("C", (_B, _L, _G, _N + 1), f"expected (batch, length, groups, d_state) = {(_B, _L, _G, _N)}"),
        ("C", (_B + 1, _L, _G, _N), f"expected (batch, length, groups, d_state) = {(_B, _L, _G, _N)}"),
        # B defines groups and d_state, not batch and length.
        ("B", (_B, _L + 1, _G, _N), f"expected (batch, length, groups, d_state) = {(_B, _L, _G, _N)}"),
        ("D", (_H, 1), f"expected (heads,) = {(_H,)}"),
        ("initial_state", (_B, _H, _N, _P), f"expected (batch, heads, head_dim, d_state) = {(_B, _H, _P, _N)}"),
    ],
)
def test_api_shape_errors(name, bad_shape, expected):
    kw = _make_inputs(0, _L, groups=_G)
    kw[name] = jnp.zeros(bad_shape, jnp.float32)
    with pytest.raises(ValueError, match=re.escape(f"{name} has shape {bad_shape}, {expected}")):
        ssd(**kw)


@pytest.mark.parametrize(
    "name,bad_shape,msg",
    [
        ("x", (_B, _L, _H * _P), "x must have shape (batch, length, heads, head_dim) with length >= 1"),
        ("x", (_B, 0, _H, _P), "x must have shape (batch, length, heads, head_dim) with length >= 1"),
        ("B", (_B, _L, _G * _N), f"B must have shape (batch, length, groups, d_state), got {(_B, _L, _G * _N)}"),
        ("B", (_B, _L, 3, _N), "heads = 4 (from x) must be a multiple of groups = 3 (from B)"),
    ],
)
def test_api_rank_and_group_errors(name, bad_shape, msg):
    kw = _make_inputs(0, _L, groups=_G, D=False, initial_state=False)
    kw[name] = jnp.zeros(bad_shape, jnp.float32)
    if name == "B":
        kw["C"] = jnp.zeros(bad_shape, jnp.float32)
    with pytest.raises(ValueError, match=re.escape(msg)):
        ssd(**kw)


@pytest.mark.parametrize("chunk_size", [0, -4, 2.0])
def test_api_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match=re.escape(f"chunk_size must be a positive int, got {chunk_size!r}")):
        ssd(**_make_inputs(0, _L), chunk_size=chunk_size)


@pytest.mark.parametrize(
    "name,bad_shape,msg",
    [
        ("x", (_B, _H, _P + 1), f"x has shape {(_B, _H, _P + 1)}, expected (batch, heads, head_dim) = {(_B, _H, _P)}"),
        ("log_decay", (_B, 1, _H), f"log_decay has shape {(_B, 1, _H)}, expected (batch, heads) = {(_B, _H)}"),
        ("C", (_B, _G, _N - 1), f"C has shape {(_B, _G, _N - 1)}, expected (batch, groups, d_state) = {(_B, _G, _N)}"),
        ("D", (_H + 1,), f"D has shape {(_H + 1,)}, expected (heads,) = {(_H,)}"),
        ("state", (_B, _H, _P), f"state must have shape (batch, heads, head_dim, d_state), got {(_B, _H, _P)}"),
        ("B", (_B, 3, _N), "heads = 4 (from state) must be a multiple of groups = 3 (from B)"),
    ],
)
def test_step_shape_errors(name, bad_shape, msg):
    kw = _make_inputs(0, 1, groups=_G)
    args = {"state": kw["initial_state"], "x": kw["x"][:, 0], "log_decay": kw["log_decay"][:, 0],
            "B": kw["B"][:, 0], "C": kw["C"][:, 0], "D": kw["D"]}
    args[name] = jnp.zeros(bad_shape, jnp.float32)
    if name == "B":
        args["C"] = jnp.zeros(bad_shape, jnp.float32)
    with pytest.raises(ValueError, match=re.escape(msg)):
        ssd_step(**args)

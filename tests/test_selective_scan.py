"""Tests of the Mamba-1 selective scan: reference vs a float64 NumPy oracle, associative vs reference
(values and gradients), and the public ``selective_scan`` API (dispatch and error messages)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cab_jax.kernels.selective_scan import SCAN_IMPLS, selective_scan
from cab_jax.kernels.selective_scan import api as scan_api
from cab_jax.kernels.selective_scan.associative import selective_scan_associative
from cab_jax.kernels.selective_scan.reference import selective_scan_reference

BATCH, D_INNER, D_STATE = 2, 6, 5
LENGTHS = (1, 7, 197)
DTYPES = ("float32", "bfloat16")

# Tolerances, per input dtype. ``atol`` is relative to the scale of the expected array (max(1, max|x|)),
# so one constant serves outputs and gradients of very different magnitudes. bfloat16 outputs/gradients
# are rounded to bfloat16 (2**-8 relative spacing), so two implementations that agree in float32 can
# still differ by one bfloat16 ulp.
VALUE_TOL = {"float32": {"rtol": 1e-5, "atol": 1e-5}, "bfloat16": {"rtol": 8e-3, "atol": 8e-3}}
GRAD_TOL = {"float32": {"rtol": 2e-5, "atol": 2e-5}, "bfloat16": {"rtol": 8e-3, "atol": 8e-3}}

# Optional inputs per test case; "cab" uses the CAB initialisation A = -exp(-20) (no decay).
OPTIONS = {
    "bare": {},
    "D": {"D": True},
    "z": {"z": True},
    "bias": {"delta_bias": True},
    "softplus": {"delta_softplus": True},
    "full": {"D": True, "z": True, "delta_bias": True, "delta_softplus": True},
    "full_cab": {"D": True, "z": True, "delta_bias": True, "delta_softplus": True, "cab": True},
}


def _make_inputs(seed, length, dtype, options, batch=BATCH, d_inner=D_INNER, d_state=D_STATE):
    """Random inputs in ``dtype`` (A, D, delta_bias included), as keyword arguments of the scan."""
    rng = np.random.default_rng(seed)
    softplus = options.get("delta_softplus", False)
    act = (batch, length, d_inner)
    if options.get("cab", False):
        A = -np.exp(-20.0) * np.ones((d_inner, d_state))
    else:  # S4D-real, jittered per entry.
        A = -np.arange(1, d_state + 1)[None, :] * rng.uniform(0.5, 1.5, (d_inner, d_state))
    if softplus:
        delta = rng.normal(0.0, 0.5, act)
        dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), d_inner))
        delta_bias = np.log(np.expm1(dt))  # softplus^-1, as in Mamba's dt init
    else:
        delta = rng.uniform(1e-3, 0.2, act)
        delta_bias = rng.uniform(0.0, 0.05, d_inner)
    kw = {
        "u": rng.normal(size=act),
        "delta": delta,
        "A": A,
        "B": rng.normal(size=(batch, length, d_state)),
        "C": rng.normal(size=(batch, length, d_state)),
        "D": rng.normal(size=d_inner) if options.get("D") else None,
        "z": rng.normal(size=act) if options.get("z") else None,
        "delta_bias": delta_bias if options.get("delta_bias") else None,
    }
    kw = {k: None if v is None else jnp.asarray(v, dtype) for k, v in kw.items()}
    return kw, {"delta_softplus": softplus}


def _numpy_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, reverse=False):
    """Independent float64 oracle: an explicit loop; ``reverse`` by flipping the sequence."""
    f64 = lambda x: None if x is None else np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    u, delta, A, B, C, D, z, delta_bias = map(f64, (u, delta, A, B, C, D, z, delta_bias))
    if reverse:
        flip = lambda x: None if x is None else x[:, ::-1]
        y = _numpy_scan(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z), delta_bias, delta_softplus)
        return y[:, ::-1]
    if delta_bias is not None:
        delta = delta + delta_bias
    if delta_softplus:
        delta = np.logaddexp(0.0, delta)
    batch, length, d_inner = u.shape
    h = np.zeros((batch, d_inner, A.shape[1]))
    y = np.zeros((batch, length, d_inner))
    for t in range(length):
        for b in range(batch):
            dt = delta[b, t][:, None]
            h[b] = np.exp(dt * A) * h[b] + dt * u[b, t][:, None] * B[b, t][None, :]
            y[b, t] = h[b] @ C[b, t]
    if D is not None:
        y = y + D * u
    if z is not None:
        y = y * z / (1.0 + np.exp(-z))
    return y


def _assert_close(actual, expected, tol, what=""):
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale, err_msg=what)


def _value_cases():
    # The tests are compile-bound (one XLA compilation per case), hence a sparse grid: the full scan at
    # every length x direction x dtype; the bare scan at every length x direction; single options
    # (pre/post-processing, independent of length) at length 7; the CAB init (A ~ 0, no decay) at 197.
    cases = [(n, r, d, "full") for n in LENGTHS for r in (False, True) for d in DTYPES]
    cases += [(n, r, "float32", "bare") for n in LENGTHS for r in (False, True)]
    cases += [(7, r, "bfloat16", "bare") for r in (False, True)]
    cases += [(7, False, "float32", "D"), (7, False, "float32", "z")]
    cases += [(7, True, "float32", "bias"), (7, True, "float32", "softplus")]
    cases += [(197, False, "float32", "full_cab"), (197, True, "bfloat16", "full_cab")]
    return cases


VALUE_CASES = pytest.mark.parametrize("length,reverse,dtype,option", _value_cases())


@VALUE_CASES
def test_reference_vs_numpy(length, reverse, dtype, option):
    kw, static = _make_inputs(length * 31 + 1, length, dtype, OPTIONS[option])
    y = selective_scan_reference(**kw, **static, reverse=reverse)
    assert y.shape == (BATCH, length, D_INNER)
    assert y.dtype == jnp.dtype(dtype)
    _assert_close(y, _numpy_scan(**kw, **static, reverse=reverse), VALUE_TOL[dtype])


@VALUE_CASES
def test_associative_vs_reference(length, reverse, dtype, option):
    kw, static = _make_inputs(length * 31 + 1, length, dtype, OPTIONS[option])
    y = selective_scan_associative(**kw, **static, reverse=reverse)
    assert y.shape == (BATCH, length, D_INNER)
    assert y.dtype == jnp.dtype(dtype)
    _assert_close(y, selective_scan_reference(**kw, **static, reverse=reverse), VALUE_TOL[dtype])


def test_reverse_is_not_forward():
    # Guards the reverse tests above against inputs for which direction would not matter.
    kw, static = _make_inputs(3, 7, "float32", OPTIONS["full"])
    fwd = selective_scan_reference(**kw, **static, reverse=False)
    bwd = selective_scan_reference(**kw, **static, reverse=True)
    assert float(jnp.max(jnp.abs(fwd - bwd))) > 1e-2


def test_mixed_precision_params_in_float32():
    # Typical model use: bfloat16 activations, float32 A / D / delta_bias; the output follows u.
    kw, static = _make_inputs(5, 7, "float32", OPTIONS["full"])
    for name in ("u", "delta", "B", "C", "z"):
        kw[name] = kw[name].astype(jnp.bfloat16)
    y_ref = selective_scan_reference(**kw, **static)
    y_assoc = selective_scan_associative(**kw, **static)
    assert y_ref.dtype == y_assoc.dtype == jnp.bfloat16
    _assert_close(y_ref, _numpy_scan(**kw, **static), VALUE_TOL["bfloat16"])
    _assert_close(y_assoc, y_ref, VALUE_TOL["bfloat16"])


@pytest.mark.parametrize("scan", [selective_scan_reference, selective_scan_associative],
                         ids=["reference", "associative"])
def test_bfloat16_inputs_accumulate_in_a_float32_state(scan):
    # CAB's A ~ 0 (no decay): the state is a running sum of 600 equal increments. A bfloat16 state (8 significant
    # bits) stops growing once the sum is a few hundred increments large; a float32 one reaches 600 increments.
    length, dt = 600, 0.01
    ones = jnp.ones((1, length, 2), jnp.bfloat16)
    kw = dict(u=ones, delta=jnp.full((1, length, 2), dt, jnp.bfloat16), A=-jnp.exp(jnp.full((2, 1), -20.0)),
              B=ones[..., :1], C=ones[..., :1])
    y = np.asarray(scan(**kw).astype(jnp.float32))
    steps = np.asarray(jnp.asarray(dt, jnp.bfloat16), np.float64) * np.arange(1, length + 1)
    # Rounding the output to bfloat16 moves it by at most 2**-8 of its value (measured: 0.36 %); a bfloat16 state
    # in the associative scan's pairwise sums was 0.88 % off, in the sequential reference 33 %.
    np.testing.assert_allclose(y[0, :, 0], steps, rtol=2**-8 + 1e-4)


def _grads(fn, kw, static, reverse, weights):
    params = {k: v for k, v in kw.items() if v is not None}

    @jax.jit  # One compilation for forward and backward (the tests are compile-bound).
    def grad(p):
        def loss(p):
            y = fn(**p, **static, reverse=reverse)
            return jnp.sum(y.astype(jnp.float32) * weights)

        return jax.grad(loss)(p)

    return grad(params)


# Compile time dominates (about 3 s per length-197 case on CPU), hence a sparse grid.
GRAD_CASES = [
    (197, False, "float32", "full"),
    (197, True, "bfloat16", "full"),
    (197, True, "float32", "full_cab"),
    (7, True, "float32", "full"),
    (7, False, "bfloat16", "bare"),
]


@pytest.mark.parametrize("length,reverse,dtype,option", GRAD_CASES)
def test_gradients_associative_vs_reference(length, reverse, dtype, option):
    kw, static = _make_inputs(length * 17 + 2, length, dtype, OPTIONS[option])
    weights = jnp.asarray(np.random.default_rng(length).normal(size=(BATCH, length, D_INNER)), jnp.float32)
    g_ref = _grads(selective_scan_reference, kw, static, reverse, weights)
    g_assoc = _grads(selective_scan_associative, kw, static, reverse, weights)
    expected_names = {"u", "delta", "A", "B", "C"} | ({"D", "z", "delta_bias"} if option != "bare" else set())
    assert set(g_ref) == set(g_assoc) == expected_names
    for name, g in g_ref.items():
        assert g_assoc[name].dtype == g.dtype == jnp.dtype(dtype), name
        assert float(jnp.max(jnp.abs(g.astype(jnp.float32)))) > 0.0, f"zero gradient for {name}"
        _assert_close(g_assoc[name], g, GRAD_TOL[dtype], what=name)


# --------------------------------------------------------------------------------------------- API


def test_scan_impls_lists_the_implementations():
    assert SCAN_IMPLS == ("auto", "reference", "associative", "pallas", "pallas_triton", "pallas_mosaic")


@pytest.mark.parametrize("impl", SCAN_IMPLS)
def test_api_every_impl_matches_reference(impl):
    kw, static = _make_inputs(11, 7, "float32", OPTIONS["full"])
    y = selective_scan(**kw, **static, reverse=True, impl=impl)
    _assert_close(y, _numpy_scan(**kw, **static, reverse=True), VALUE_TOL["float32"])


@pytest.mark.parametrize(
    "impl,target", [("auto", "associative"), ("associative", "associative"), ("reference", "reference")]
)
@pytest.mark.parametrize("reverse", [False, True])
def test_api_dispatch_and_arguments(monkeypatch, impl, target, reverse):
    calls = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(scan_api.jax, "default_backend", lambda: "cpu")  # where "auto" is associative
    monkeypatch.setattr(scan_api, "selective_scan_reference", spy("reference", selective_scan_reference))
    monkeypatch.setattr(scan_api, "selective_scan_associative", spy("associative", selective_scan_associative))
    kw, static = _make_inputs(13, 7, "float32", OPTIONS["full"])
    y = selective_scan(**kw, **static, reverse=reverse, impl=impl)
    assert calls == [target]
    direct = {"reference": selective_scan_reference, "associative": selective_scan_associative}[target]
    # Same function, same arguments: bit-identical (catches a dropped D, z, delta_bias, softplus or reverse).
    np.testing.assert_array_equal(np.asarray(y), np.asarray(direct(**kw, **static, reverse=reverse)))


@pytest.mark.parametrize("impl", ["reference", "associative"])
def test_api_under_jit(impl):
    kw, static = _make_inputs(17, 7, "bfloat16", OPTIONS["full"])
    f = jax.jit(functools.partial(selective_scan, impl=impl, reverse=True, **static))
    y = f(**kw)
    assert y.dtype == jnp.bfloat16
    _assert_close(y, _numpy_scan(**kw, **static, reverse=True), VALUE_TOL["bfloat16"])


@pytest.mark.parametrize("impl", ["Pallas", "Auto", "", "triton"])
def test_api_unknown_impl(impl):
    kw, static = _make_inputs(0, 4, "float32", OPTIONS["bare"])
    msg = (f"unknown impl {impl!r}; valid choices are ('auto', 'reference', 'associative', 'pallas', "
           "'pallas_triton', 'pallas_mosaic')")
    with pytest.raises(ValueError, match=re.escape(msg)):
        selective_scan(**kw, **static, impl=impl)


_B, _L, _DI, _N = 2, 4, D_INNER, D_STATE


@pytest.mark.parametrize(
    "name,bad_shape,expected",
    [
        ("delta", (_B, _L + 1, _DI), f"expected (batch, length, d_inner) = {(_B, _L, _DI)}"),
        ("A", (_DI + 1, _N), f"expected (d_inner, d_state) = {(_DI, _N)}"),
        ("B", (_B, _L, _N + 1), f"expected (batch, length, d_state) = {(_B, _L, _N)}"),
        ("C", (_B + 1, _L, _N), f"expected (batch, length, d_state) = {(_B, _L, _N)}"),
        ("D", (_DI, 1), f"expected (d_inner,) = {(_DI,)}"),
        ("z", (_B, _L, _DI - 1), f"expected (batch, length, d_inner) = {(_B, _L, _DI)}"),
        ("delta_bias", (_N,), f"expected (d_inner,) = {(_DI,)}"),
    ],
)
def test_api_shape_errors(name, bad_shape, expected):
    kw, static = _make_inputs(0, _L, "float32", OPTIONS["full"])
    kw[name] = jnp.zeros(bad_shape, jnp.float32)
    msg = f"{name} has shape {bad_shape}, {expected}"
    with pytest.raises(ValueError, match=re.escape(msg)):
        selective_scan(**kw, **static)


@pytest.mark.parametrize(
    "name,bad_shape,msg",
    [
        ("u", (_B, _L * _DI), f"u must have shape (batch, length, d_inner), got {(_B, _L * _DI)}"),
        ("A", (1, _DI, _N), f"A must have shape (d_inner, d_state), got {(1, _DI, _N)}"),
    ],
)
def test_api_rank_errors(name, bad_shape, msg):
    kw, static = _make_inputs(0, _L, "float32", OPTIONS["bare"])
    kw[name] = jnp.zeros(bad_shape, jnp.float32)
    with pytest.raises(ValueError, match=re.escape(msg)):
        selective_scan(**kw, **static)


def test_api_shape_error_lists_every_mismatch():
    kw, static = _make_inputs(0, _L, "float32", OPTIONS["bare"])
    kw["B"] = jnp.zeros((_B, _L, _N + 2))
    kw["C"] = jnp.zeros((_B, _L + 3, _N))
    with pytest.raises(ValueError, match=r"B has shape \(2, 4, 7\).*; C has shape \(2, 7, 5\)"):
        selective_scan(**kw, **static)

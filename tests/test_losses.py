"""Tests of the distillation losses: KL against hand-computed values, soft-target cross-entropy against optax,
label smoothing, the loss modes (one vocabulary with the earlier language names as aliases) and each domain's
weights for them, and top-k accuracy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cab_jax.losses import (
    LANGUAGE_MODE_WEIGHTS,
    LOSS_MODES,
    MODE_ALIASES,
    VISION_MODE_WEIGHTS,
    LossWeights,
    attention_transfer,
    canonical_mode,
    kl_divergence,
    loss_weights,
    smooth_labels,
    soft_cross_entropy,
    topk_correct,
)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(p) || softmax(q)) per row, float64."""
    lp, lq = np_log_softmax(p_logits), np_log_softmax(q_logits)
    return np.sum(np.exp(lp) * (lp - lq), axis=-1)


# --------------------------------------------------------------------------------------------------- KL


def test_kl_two_classes_by_hand():
    teacher = np.array([[2.0, 0.0], [0.0, 0.5]])
    student = np.array([[0.0, 0.0], [1.0, -1.0]])
    # Row 0: p = (sigmoid(2), sigmoid(-2)), q = (1/2, 1/2): KL = sum p log(2 p).
    p0 = np.array([1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(2.0))])
    row0 = np.sum(p0 * np.log(2 * p0))
    # Row 1: p = softmax(0, 0.5), q = softmax(1, -1).
    p1 = np.exp([0.0, 0.5]) / np.exp([0.0, 0.5]).sum()
    q1 = np.exp([1.0, -1.0]) / np.exp([1.0, -1.0]).sum()
    row1 = np.sum(p1 * np.log(p1 / q1))
    expected = (row0 + row1) / 2  # "batchmean"
    got = kl_divergence(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32))
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # The direction matters: this is KL(teacher || student), not KL(student || teacher).
    reverse = np.mean(np_kl(student, teacher))
    assert abs(reverse - expected) > 0.01  # far outside the tolerance above


def test_kl_two_classes_closed_form_with_temperature():
    # Teacher logits (a, 0), student (0, a): KL = a * tanh(a / 2); at temperature T use a / T and scale by T^2.
    a, temperature = 1.0, 2.0
    teacher = jnp.array([[a, 0.0]])
    student = jnp.array([[0.0, a]])
    np.testing.assert_allclose(kl_divergence(student, teacher), a * np.tanh(a / 2), rtol=1e-5)
    at = a / temperature
    np.testing.assert_allclose(kl_divergence(student, teacher, temperature), temperature**2 * at * np.tanh(at / 2),
                               rtol=1e-5)


def test_kl_zero_iff_identical():
    key_a, key_b = jax.random.split(jax.random.key(0))
    x = 3.0 * jax.random.normal(key_a, (8, 10))
    y = 3.0 * jax.random.normal(key_b, (8, 10))
    np.testing.assert_allclose(kl_divergence(x, x), 0.0, atol=1e-6)
    np.testing.assert_allclose(kl_divergence(x + 4.0, x), 0.0, atol=1e-5)  # shift invariant
    assert float(kl_divergence(x, y)) > 0.1
    for t in (0.5, 1.0, 4.0):
        got = kl_divergence(x, y, temperature=t)
        np.testing.assert_allclose(got, t**2 * np.mean(np_kl(np.asarray(y) / t, np.asarray(x) / t)), rtol=1e-4)


def test_kl_temperature_squared_keeps_high_temperature_limit():
    """Hinton et al.: as T grows, T^2 KL -> (1 / 2K) sum_c (zt_c - zs_c)^2 with zero-mean logits, per example.
    Without the T^2 factor the loss would vanish like 1/T^2."""
    key_a, key_b = jax.random.split(jax.random.key(1))
    s = jax.random.normal(key_a, (4, 5))
    t = jax.random.normal(key_b, (4, 5))
    centred = lambda z: np.asarray(z, np.float64) - np.asarray(z, np.float64).mean(-1, keepdims=True)
    limit = np.mean(np.sum((centred(t) - centred(s)) ** 2, -1) / (2 * 5))
    np.testing.assert_allclose(kl_divergence(s, t, temperature=30.0), limit, rtol=0.05)
    assert abs(float(kl_divergence(s, t, temperature=30.0)) - limit) < abs(float(kl_divergence(s, t)) - limit)


# -------------------------------------------------------------------------------------- cross-entropy


def test_soft_cross_entropy_one_hot_matches_optax():
    logits = 2.0 * jax.random.normal(jax.random.key(2), (6, 7))
    labels = jnp.array([0, 3, 6, 2, 2, 5])
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    np.testing.assert_allclose(soft_cross_entropy(logits, jax.nn.one_hot(labels, 7)), expected, rtol=1e-6)


def test_soft_cross_entropy_soft_targets_match_numpy():
    key_a, key_b = jax.random.split(jax.random.key(3))
    logits = 2.0 * jax.random.normal(key_a, (4, 6))
    targets = jax.nn.softmax(jax.random.normal(key_b, (4, 6)))
    expected = np.mean(-np.sum(np.asarray(targets, np.float64) * np_log_softmax(np.asarray(logits)), -1))
    np.testing.assert_allclose(soft_cross_entropy(logits, targets), expected, rtol=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_smooth_labels(smoothing):
    k = 5
    labels = jnp.array([0, 4, 2])
    targets = np.asarray(smooth_labels(labels, k, smoothing), np.float64)
    assert targets.shape == (3, k)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    on = np.zeros((3, k), bool)
    on[np.arange(3), np.asarray(labels)] = True
    np.testing.assert_allclose(targets[on], 1 - smoothing + smoothing / k, rtol=1e-6)
    np.testing.assert_allclose(targets[~on], smoothing / k, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------- loss weights


@pytest.mark.parametrize(
    "mode,expected,needs_teacher",
    [
        ("vanilla", (1.0, 0.0, 0.0, 0.0), False),  # CE only
        ("soft", (0.0, 1.0, 0.0, 0.0), True),  # KL only
        ("cab", (0.0, 1.0, 3.0, 0.0), True),  # KL + 3 x bridge
        ("attention_transfer", (0.0, 1.0, 0.0, 3.0), True),  # KL + 3 x the maps' squared error
    ],
)
def test_vision_loss_weights_per_mode(mode, expected, needs_teacher):
    w = loss_weights(mode, VISION_MODE_WEIGHTS)
    assert isinstance(w, LossWeights)
    assert (w.ce, w.kl, w.bridge, w.attention) == expected
    assert w.needs_teacher is needs_teacher


@pytest.mark.parametrize(
    "mode,expected,needs_teacher",
    [
        ("vanilla", (1.0, 0.0, 0.0, 0.0), False),  # CE only
        ("soft", (1.0, 1.0, 0.0, 0.0), True),  # CE + KL
        ("cab", (1.0, 0.5, 0.5, 0.0), True),  # CE + 0.5 KL + 0.5 bridge
        ("attention_transfer", (1.0, 0.5, 0.0, 0.5), True),  # CE + 0.5 KL + 0.5 the maps' squared error
        ("ce", (1.0, 0.0, 0.0, 0.0), False),  # the earlier language names
        ("kl", (1.0, 1.0, 0.0, 0.0), True),
    ],
)
def test_language_loss_weights_per_mode(mode, expected, needs_teacher):
    w = loss_weights(mode, LANGUAGE_MODE_WEIGHTS)
    assert isinstance(w, LossWeights)
    assert (w.ce, w.kl, w.bridge, w.attention) == expected
    assert w.needs_teacher is needs_teacher


def test_one_mode_vocabulary_for_both_domains():
    assert LOSS_MODES == ("vanilla", "soft", "cab", "attention_transfer")
    assert tuple(VISION_MODE_WEIGHTS) == tuple(LANGUAGE_MODE_WEIGHTS) == LOSS_MODES
    assert MODE_ALIASES == {"ce": "vanilla", "kl": "soft"}
    assert [canonical_mode(m) for m in (*LOSS_MODES, "ce", "kl")] == [*LOSS_MODES, "vanilla", "soft"]
    for alias, mode in MODE_ALIASES.items():  # an alias means the same weights in either table
        for table in (VISION_MODE_WEIGHTS, LANGUAGE_MODE_WEIGHTS):
            assert loss_weights(alias, table) == loss_weights(mode, table) == table[mode]


def test_loss_weights_overrides():
    w = loss_weights("cab", VISION_MODE_WEIGHTS, ce=0.5)
    assert (w.ce, w.kl, w.bridge) == (0.5, 1.0, 3.0)
    w = loss_weights("cab", VISION_MODE_WEIGHTS, kl=0.0, bridge=1.5)
    assert (w.ce, w.kl, w.bridge) == (0.0, 0.0, 1.5)
    assert loss_weights("vanilla", VISION_MODE_WEIGHTS, kl=0.5).needs_teacher
    assert loss_weights("vanilla", VISION_MODE_WEIGHTS, bridge=1.0).needs_teacher
    assert not loss_weights("cab", VISION_MODE_WEIGHTS, ce=1.0, kl=0.0, bridge=0.0).needs_teacher
    # Positionally, as the domains pass the config's weights (None: the mode's own).
    w = loss_weights("kl", LANGUAGE_MODE_WEIGHTS, None, 0.25, None)
    assert (w.ce, w.kl, w.bridge) == (1.0, 0.25, 0.0)
    w = loss_weights("cab", LANGUAGE_MODE_WEIGHTS, 0.0, None, 2.0)
    assert (w.ce, w.kl, w.bridge) == (0.0, 0.5, 2.0)


@pytest.mark.parametrize("config_name", ["demo", "demo_lm"])
def test_each_weight_is_set_from_the_config(config_name):
    """README: each weight can be set with ``loss.{ce,kl,bridge,attention}_weight``, in both domains; unset, a mode
    keeps its own (CAB: KL + 3 x bridge for vision, CE + 0.5 KL + 0.5 bridge for language)."""
    import importlib

    from cab_jax import domains

    c = importlib.import_module(f"configs.{config_name}").get_config()
    c.task, c.loss.mode = "distill", "cab"
    own = LANGUAGE_MODE_WEIGHTS["cab"] if config_name == "demo_lm" else VISION_MODE_WEIGHTS["cab"]
    assert domains.for_config(c).job().weights == own
    c.loss.ce_weight, c.loss.kl_weight, c.loss.bridge_weight, c.loss.attention_weight = 0.25, 0.5, 2.0, 4.0
    assert domains.for_config(c).job().weights == LossWeights(ce=0.25, kl=0.5, bridge=2.0, attention=4.0)


@pytest.mark.parametrize("table", [VISION_MODE_WEIGHTS, LANGUAGE_MODE_WEIGHTS])
def test_loss_weights_unknown_mode(table):
    message = (r"unknown loss mode 'distill'; expected one of \('vanilla', 'soft', 'cab', 'attention_transfer'\) "
               r".*'ce' for 'vanilla'")
    with pytest.raises(ValueError, match=message):
        loss_weights("distill", table)
    with pytest.raises(ValueError, match="unknown loss mode 'CAB'"):
        canonical_mode("CAB")


# ------------------------------------------------------------------------------------------------ top-k


def test_topk_correct_by_hand():
    logits = jnp.array([[0.1, 0.5, 0.4], [0.3, 0.2, 0.5], [0.9, 0.0, 0.05]])
    labels = jnp.array([2, 0, 0])
    np.testing.assert_array_equal(topk_correct(logits, labels, 1), [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(topk_correct(logits, labels, 2), [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(topk_correct(logits, jnp.array([0, 1, 1]), 2), [0.0, 0.0, 0.0])
    assert topk_correct(logits, labels, 1).dtype == jnp.float32


@pytest.mark.parametrize("k", [1, 5])
def test_topk_correct_matches_numpy(k):
    key_a, key_b = jax.random.split(jax.random.key(4))
    logits = jax.random.normal(key_a, (64, 10))
    labels = jax.random.randint(key_b, (64,), 0, 10)
    ranks = np.argsort(-np.asarray(logits), axis=-1)[:, :k]
    expected = (ranks == np.asarray(labels)[:, None]).any(-1).astype(np.float32)
    got = np.asarray(topk_correct(logits, labels, k))
    np.testing.assert_array_equal(got, expected)
    assert 0 < got.sum() < 64


def test_an_earlier_mode_name_says_what_it_is_now(caplog):
    with caplog.at_level("WARNING"):
        assert canonical_mode("kl") == "soft"
    assert "'kl' is now called 'soft'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert canonical_mode("cab") == "cab"
    assert not caplog.text


@pytest.mark.parametrize("cls_position,causal", [(2, False), (None, True)])
def test_attention_transfer_is_the_squared_error_to_the_mapped_teacher_layers_maps(cls_position, causal):
    rng = np.random.default_rng(0)
    depth, batch, heads, tokens, head_dim = 3, 2, 2, 5, 4
    q, k = rng.normal(size=(2, depth, batch, heads, tokens, head_dim))
    student = rng.normal(size=(4, batch, tokens, tokens))
    mapping = (0, -1, 2, 2)  # layer 1 unbridged, teacher layer 2 taught twice, teacher layer 1 by no one
    logits = np.einsum("lbhqd,lbhkd->lbhqk", q, k) / np.sqrt(head_dim)
    if causal:
        logits = np.where(np.tril(np.ones((tokens, tokens))) > 0, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    maps = (weights / weights.sum(-1, keepdims=True)).mean(axis=2)  # (depth, batch, tokens, tokens)
    if cls_position is not None:  # teacher tokens (cls, p0, p1, p2, p3) -> student tokens (p0, p1, cls, p2, p3)
        order = [1, 2, 0, 3, 4]
        maps = maps[..., order, :][..., :, order]
    want = np.mean([np.mean((student[layer] - maps[g]) ** 2) for layer, g in enumerate(mapping) if g >= 0])
    got = attention_transfer(jnp.asarray(student), (jnp.asarray(q), jnp.asarray(k)), mapping, cls_position, causal)
    np.testing.assert_allclose(got, want, rtol=1e-5)

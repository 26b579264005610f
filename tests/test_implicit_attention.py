"""The selective scan's implicit attention against a brute-force reading of the scan itself: with one-hot inputs at
position s, the reference scan's output at t is the weight of s in t."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cab_jax.kernels.selective_scan.implicit_attention import implicit_attention
from cab_jax.kernels.selective_scan.reference import selective_scan_reference


def probed(delta, A, B, C, reverse, **kw):
    """(batch, t, s): the reference scan's output at t for a unit input at s on every channel, mean over channels."""
    batch, length, d_inner = delta.shape
    columns = []
    for s in range(length):
        u = jnp.zeros((batch, length, d_inner)).at[:, s, :].set(1.0)
        columns.append(selective_scan_reference(u, delta, A, B, C, reverse=reverse, **kw).mean(-1))  # (b, t)
    return jnp.stack(columns, axis=-1)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("length, d_inner, block, token_block", [(7, 6, 4, 16), (1, 3, 64, 16), (12, 8, 4, 5),
                                                                 (12, 8, 8, 4), (13, 4, 4, 1)])
def test_matches_the_scan_probed_one_input_at_a_time(reverse, length, d_inner, block, token_block):
    keys = jax.random.split(jax.random.key(length + d_inner), 4)
    batch, d_state = 2, 5
    delta = jax.random.normal(keys[0], (batch, length, d_inner))
    A = -jnp.exp(jax.random.normal(keys[1], (d_inner, d_state)))
    B = jax.random.normal(keys[2], (batch, length, d_state))
    C = jax.random.normal(keys[3], (batch, length, d_state))
    bias = jnp.linspace(-1.0, 1.0, d_inner)
    got = implicit_attention(delta, A, B, C, reverse=reverse, delta_bias=bias, delta_softplus=True,
                             channel_block=block, token_block=token_block)
    want = probed(delta, A, B, C, reverse, delta_bias=bias, delta_softplus=True)
    assert got.shape == (batch, length, length)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    lower = np.tril(np.ones((length, length)), k=-1).astype(bool)  # s < t: only the forward direction looks back
    assert not np.any(np.asarray(got)[:, lower.T if not reverse else lower])  # the other side is exactly 0


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_strong_decay_gives_finite_weights_and_gradients(reverse):
    """Decays of up to exp(-4000) over the sequence (a trained A of -40 at step sizes near 5): the weights are those
    of the float64 formula, finite, and so are their gradients (a factorisation taken relative to the sequence's
    start would overflow here)."""
    batch, length, d_inner, d_state = 1, 20, 2, 3
    keys = jax.random.split(jax.random.key(0), 4)
    delta = 5.0 + jax.random.uniform(keys[0], (batch, length, d_inner))
    A = -40.0 * jax.random.uniform(keys[1], (d_inner, d_state), minval=0.5, maxval=1.0)
    B, C = (jax.random.normal(k, (batch, length, d_state)) for k in keys[2:])
    got = implicit_attention(delta, A, B, C, reverse=reverse, token_block=4)
    d, a, b, c = (np.asarray(v, np.float64) for v in (delta, A, B, C))
    x = np.cumsum(d[..., None] * a, axis=1) - (d[..., None] * a if reverse else 0.0)  # X, exclusive for reverse
    t, s = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
    seen = (s >= t) if reverse else (s <= t)
    log_decay = np.where(seen[None, :, :, None, None], (x[:, None] - x[:, :, None]) if reverse
                         else (x[:, :, None] - x[:, None]), -np.inf)
    want = np.einsum("btn,btscn->bts", c, np.exp(log_decay) * (d[:, None, :, :, None] * b[:, None, :, None, :]))
    np.testing.assert_allclose(got, want / d_inner, rtol=1e-4, atol=1e-6)
    grads = jax.grad(lambda *v: jnp.sum(implicit_attention(*v, reverse=reverse, token_block=4) ** 2),
                     argnums=(0, 1, 2, 3))(delta, A, B, C)
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_bfloat16_inputs_give_the_float32_weights_of_their_values():
    keys = jax.random.split(jax.random.key(0), 4)
    delta = jax.nn.softplus(jax.random.normal(keys[0], (1, 9, 4))).astype(jnp.bfloat16)
    A = -jnp.exp(jax.random.normal(keys[1], (4, 3)))
    B, C = (jax.random.normal(k, (1, 9, 3)).astype(jnp.bfloat16) for k in keys[2:])
    got = implicit_attention(delta, A, B, C)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, probed(*(x.astype(jnp.float32) for x in (delta, A, B, C)), False),
                               rtol=1e-5, atol=1e-6)

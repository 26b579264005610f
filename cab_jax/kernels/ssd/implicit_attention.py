"""The implicit attention of the Mamba-2 (SSD) recurrence of :mod:`.reference`.

The scan is linear in x: per head h, ``y[t] = sum_{s <= t} alpha[h, t, s] * x[s]`` (before the D skip) with::

    alpha[h, t, s] = C[t, g(h)] . B[s, g(h)] * exp(sum_{k=s+1..t} log_decay[k, h])

(g(h) the B/C group of head h). :func:`implicit_attention` returns alpha averaged over the heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cab_jax.kernels.ssd.reference import expand_groups


def implicit_attention(log_decay: jax.Array, B: jax.Array, C: jax.Array) -> jax.Array:
    """(batch, length t, length s) float32, the scan's weight of input s in output t averaged over heads, for
    log_decay (batch, length, heads) and B, C (batch, length, groups, d_state)."""
    heads, length = log_decay.shape[-1], log_decay.shape[1]
    cumulative = jnp.cumsum(log_decay.astype(jnp.float32), axis=1)  # (b, L, h)
    log_weight = cumulative[:, :, None, :] - cumulative[:, None, :, :]  # [b, t, s, h]: decay over k = s+1..t
    causal = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]  # [t, s]
    decay = jnp.exp(jnp.where(causal[None, :, :, None], log_weight, -jnp.inf))
    scores = jnp.einsum("bthn,bshn->btsh", expand_groups(C, heads), expand_groups(B, heads))
    return jnp.mean(scores * decay, axis=-1)

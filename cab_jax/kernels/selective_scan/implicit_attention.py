"""The implicit attention of a Mamba-1 selective scan (the matrix the scan applies to its input, CAB's Fig. 3).

With the step sizes, B and C fixed, the scan of :mod:`.reference` is linear in its input u: per channel d,
``y[t, d] = sum_s alpha[d, t, s] * u[s, d]`` (before the D skip and the silu(z) gate), where for the forward
direction (s <= t)::

    alpha[d, t, s] = sum_n C[t, n] * exp(sum_{k=s+1..t} delta[k, d] * A[d, n]) * delta[s, d] * B[s, n]

and for the reverse direction (s >= t) the decay runs over k = t..s-1. :func:`implicit_attention` returns alpha
averaged over the channels (a Vim layer's two directions are two calls, summed by the caller).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cab_jax.kernels.selective_scan.reference import effective_delta

_F32 = jnp.float32


def implicit_attention(delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *, reverse: bool = False,
                       delta_bias: jax.Array | None = None, delta_softplus: bool = False,
                       channel_block: int = 64) -> jax.Array:
    """(batch, length t, length s) float32: the scan's weight of input s in output t, averaged over channels.

    Shapes as the scan's: delta (batch, length, d_inner), A (d_inner, d_state), B and C (batch, length, d_state);
    ``delta_bias`` / ``delta_softplus`` as the scan applies them. Channels are processed ``channel_block`` at a
    time, so memory is (batch, length, length, channel_block, d_state) floats, not the whole d_inner.
    """
    delta = effective_delta(delta, delta_bias, delta_softplus)  # (b, L, d)
    B, C, A = B.astype(_F32), C.astype(_F32), A.astype(_F32)
    length, d_inner = delta.shape[1], delta.shape[2]
    t = jnp.arange(length)[:, None]
    s = jnp.arange(length)[None, :]
    causal = (s <= t) if not reverse else (s >= t)  # (t, s)

    def block(start: int) -> jax.Array:
        dlt = jax.lax.dynamic_slice_in_dim(delta, start, channel_block, axis=2)  # (b, L, c)
        a = jax.lax.dynamic_slice_in_dim(A, start, channel_block, axis=0)  # (c, n)
        # Cumulative log-decay through position k inclusive: S[k] = sum_{j<=k} delta[j] A.
        cumulative = jnp.cumsum(dlt[..., None] * a, axis=1)  # (b, L, c, n)
        if reverse:  # decay over k = t..s-1: S[s-1] - S[t-1] = (S[s] - delta_s A) - (S[t] - delta_t A)
            before = cumulative - dlt[..., None] * a
            log_decay = before[:, None, :] - before[:, :, None]  # [b, t, s] = before[s] - before[t]
        else:  # decay over k = s+1..t: S[t] - S[s]
            log_decay = cumulative[:, :, None] - cumulative[:, None, :]  # [b, t, s]
        log_decay = jnp.where(causal[None, :, :, None, None], log_decay, -jnp.inf)
        weight = jnp.exp(log_decay) * (dlt[:, None, :, :, None] * B[:, None, :, None, :])  # (b, t, s, c, n)
        return jnp.einsum("btn,btscn->bts", C, weight)  # summed over this block's channels

    if d_inner % channel_block:
        channel_block = d_inner
    total = sum(block(start) for start in range(0, d_inner, channel_block))
    return total / d_inner

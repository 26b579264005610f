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
                       channel_block: int = 64, token_block: int = 16) -> jax.Array:
    """(batch, length t, length s) float32: the scan's weight of input s in output t, averaged over channels.

    Shapes as the scan's: delta (batch, length, d_inner), A (d_inner, d_state), B and C (batch, length, d_state);
    ``delta_bias`` / ``delta_softplus`` as the scan applies them.

    The decay between s and t is exp(X[t] - X[s]) with X a running sum of delta * A (per channel and state), so a
    weight of an output t after a block of ``token_block`` inputs is a product of a factor of t and one of s: one
    matrix product over (channel, state) per input block. Both factors are taken relative to X at the block's last
    position, which bounds each by 1 (no overflow however strong the decay). Within the block the weights are
    computed directly. Memory is (batch, length, ``channel_block``, d_state) floats per input block, computed one
    block after another (in the backward pass too).
    """
    delta = effective_delta(delta, delta_bias, delta_softplus)  # (b, L, d)
    B, C, A = B.astype(_F32), C.astype(_F32), A.astype(_F32)
    batch, length, d_inner = delta.shape
    if reverse:  # the reverse direction is the forward one on the flipped sequence, flipped back
        flip = lambda x: jnp.flip(x, axis=1)
        return jnp.flip(implicit_attention(flip(delta), A, flip(B), flip(C), channel_block=channel_block,
                                           token_block=token_block), axis=(1, 2))
    blocks = -(-length // token_block)
    padded = lambda v: jnp.pad(v, [(0, 0), (0, blocks * token_block - length)] + [(0, 0)] * (v.ndim - 2))
    if d_inner % channel_block:
        channel_block = d_inner
    t = jnp.arange(blocks * token_block)
    local = jnp.arange(token_block)
    C = padded(C)[:, :, None, :]  # (b, Lp, 1, n)

    def channels(start: int) -> jax.Array:
        dlt = jax.lax.dynamic_slice_in_dim(delta, start, channel_block, axis=2)  # (b, L, c)
        x = padded(jnp.cumsum(dlt[..., None] * jax.lax.dynamic_slice_in_dim(A, start, channel_block, axis=0),
                              axis=1))  # (b, Lp, c, n); X, 0 past the end
        source = padded(dlt[..., None] * B[:, :, None, :])  # (b, Lp, c, n): what input s puts into the state

        def input_block(j: jax.Array) -> jax.Array:  # (b, Lp, token_block): the weights of block j's inputs
            first = j * token_block
            last = jnp.minimum(first + token_block, length) - 1
            xs, src = (jax.lax.dynamic_slice_in_dim(v, first, token_block, axis=1) for v in (x, source))
            ref = x[:, last][:, None]  # (b, 1, c, n)
            right = jnp.exp(ref - xs) * src  # 0 past the end (src is)
            after = ((t > last) & (t < length))[None, :, None, None]
            left = C * jnp.exp(jnp.where(after, x - ref, -jnp.inf))  # 0 up to the block's end
            weights = jnp.einsum("btcn,bscn->bts", left, right, precision=jax.lax.Precision.HIGHEST)
            inside = (local[None, :] <= local[:, None]) & (first + local < length)[:, None]  # (t, s) of the block
            decay = jnp.where(inside[None, :, :, None, None], xs[:, :, None] - xs[:, None, :], -jnp.inf)
            diagonal = jnp.einsum("btcn,btscn->bts", jax.lax.dynamic_slice_in_dim(C, first, token_block, axis=1),
                                  jnp.exp(decay) * src[:, None], precision=jax.lax.Precision.HIGHEST)
            return jax.lax.dynamic_update_slice_in_dim(weights, diagonal, first, axis=1)

        # Checkpointed: the backward pass recomputes a block's factors instead of keeping every block's.
        columns = jax.lax.map(jax.checkpoint(input_block), jnp.arange(blocks))  # (blocks, b, Lp, Q)
        return jnp.moveaxis(columns, 0, 2).reshape(batch, blocks * token_block, -1)[:, :length, :length]

    total = sum(channels(start) for start in range(0, d_inner, channel_block))
    return total / d_inner

"""Chunked Mamba-2 scan (the SSD algorithm of Dao & Gu 2024, "Transformers are SSMs"), in plain XLA.

Same semantics as ``reference.py``. The length is cut into chunks of ``chunk_size`` (padded with x = 0,
log_decay = 0, which leaves the state unchanged; the output is sliced back). With ``s_i`` the cumulative
sum of log_decay within a chunk (s_i = a_1 + ... + a_i, so s_i - s_j = a_{j+1} + ... + a_i) and ``h_in`` the
state entering the chunk::

    y_i       = sum_{j <= i} exp(s_i - s_j) (C_i . B_j) x_j  +  exp(s_i) C_i . h_in      # intra + carried state
    h_out     = exp(s_Q) h_in + sum_j exp(s_Q - s_j) outer(x_j, B_j)                   # state passing

The intra-chunk term is a masked (Q, Q) matrix per chunk and head, so memory is O(length * chunk_size),
never O(length^2); the only sequential part is a ``lax.scan`` over chunks carrying the float32 state. Every
exponent is <= 0 (the causal mask is applied before ``exp``), so nothing overflows and autodiff is NaN-free.
The intra-chunk matrices are recomputed in the backward pass rather than saved (``jax.checkpoint``).
B and C stay per group: C B^T is computed once per group and shared by its heads. All arithmetic is float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cab_jax.kernels.ssd.reference import add_skip

_F32 = jnp.float32


def _to_chunks(t: jax.Array, pad: int, chunk: int) -> jax.Array:
    """(batch, length, ...) -> (batch, n_chunks, chunk, ...) in float32, zero-padded at the end."""
    t = jnp.pad(t.astype(_F32), [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
    return t.reshape(t.shape[0], -1, chunk, *t.shape[2:])


def _segment_sums(log_decay: jax.Array) -> jax.Array:
    """(..., Q) -> (..., Q, Q): [i, j] = a_{j+1} + ... + a_i for i >= j (0 on the diagonal), -inf above it.

    Summed directly (a cumulative sum of the masked values) rather than as a difference of two cumulative sums,
    which would lose float32 precision to cancellation when the sums are large (strong decay, long chunks).
    """
    q = log_decay.shape[-1]
    rows = jnp.arange(q)
    terms = jnp.where(rows[:, None] > rows[None, :], log_decay[..., :, None], 0.0)  # [k, j] = a_k for k > j
    return jnp.where(rows[:, None] >= rows[None, :], jnp.cumsum(terms, axis=-2), -jnp.inf)


@jax.checkpoint  # Recomputed in the backward pass: the (Q, Q) matrices stay out of the saved residuals.
def _intra_chunk(x: jax.Array, log_decay: jax.Array, B: jax.Array, C: jax.Array) -> jax.Array:
    """sum_{j <= i} exp(a_{j+1} + ... + a_i) (C_i . B_j) x_j within each chunk.

    x: (batch, chunks, Q, groups, r, head_dim); log_decay: (batch, chunks, Q, groups, r); B, C: (batch, chunks,
    Q, groups, d_state). Returns (batch, chunks, Q, groups, r, head_dim).
    """
    decay = jnp.exp(_segment_sums(jnp.moveaxis(log_decay, 2, -1)))  # (batch, chunks, groups, r, Q, Q)
    scores = jnp.einsum("bcign,bcjgn->bcgij", C, B)
    return jnp.einsum("bcgrij,bcjgrp->bcigrp", scores[:, :, :, None] * decay, x)


@functools.partial(jax.jit, static_argnames=("return_final_state", "chunk_size"))
def ssd_chunked(
    x: jax.Array,
    log_decay: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    *,
    initial_state: jax.Array | None = None,
    return_final_state: bool = False,
    chunk_size: int = 64,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The SSD chunked scan (see the module docstring); arguments and results as ``api.ssd``."""
    batch, length, heads, head_dim = x.shape
    groups, d_state = B.shape[-2:]
    r = heads // groups
    chunk = min(chunk_size, length)  # a single short chunk rather than padding a short sequence
    pad = -length % chunk
    xc = _to_chunks(x, pad, chunk).reshape(batch, -1, chunk, groups, r, head_dim)
    log_decay_c = _to_chunks(log_decay, pad, chunk).reshape(batch, -1, chunk, groups, r)
    Bc, Cc = _to_chunks(B, pad, chunk), _to_chunks(C, pad, chunk)

    y = _intra_chunk(xc, log_decay_c, Bc, Cc)

    # Each chunk's contribution to the state at its end, starting from zero: x_j B_j decayed by a_{j+1} + ... + a_Q
    # (summed directly, from the end).
    after = jnp.concatenate([log_decay_c[:, :, 1:], jnp.zeros_like(log_decay_c[:, :, :1])], axis=2)
    to_end = jnp.exp(jax.lax.cumsum(after, axis=2, reverse=True))  # (batch, chunks, Q, groups, r)
    chunk_states = jnp.einsum("bcjgrp,bcjgn->bcgrpn", to_end[..., None] * xc, Bc)
    log_cum = jnp.cumsum(log_decay_c, axis=2)  # s_i, from the chunk start
    log_total = log_cum[:, :, -1]  # (batch, chunks, groups, r)

    def pass_state(h, inputs):
        decay, added = inputs
        return jnp.exp(decay)[..., None, None] * h + added, h

    if initial_state is None:
        h0 = jnp.zeros((batch, groups, r, head_dim, d_state), _F32)
    else:
        h0 = initial_state.astype(_F32).reshape(batch, groups, r, head_dim, d_state)
    final_state, h_in = jax.lax.scan(pass_state, h0, (jnp.moveaxis(log_total, 1, 0), jnp.moveaxis(chunk_states, 1, 0)))
    y = y + jnp.exp(log_cum)[..., None] * jnp.einsum("bcign,cbgrpn->bcigrp", Cc, h_in)

    y = add_skip(y.reshape(batch, -1, heads, head_dim)[:, :length], x, D, x.dtype)
    if return_final_state:
        return y, final_state.reshape(batch, heads, head_dim, d_state)
    return y

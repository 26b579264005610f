"""Chunked Mamba-2 scan (the SSD algorithm of Dao & Gu 2024, "Transformers are SSMs"), in plain XLA.

Same semantics as ``reference.py``. The length is cut into chunks of ``chunk_size`` (padded with x = 0,
log_decay = 0, which leaves the state unchanged; the output is sliced back). With ``s_i`` the cumulative
sum of log_decay within a chunk (s_i = a_1 + ... + a_i, so s_i - s_j = a_{j+1} + ... + a_i) and ``h_in`` the
state entering the chunk::

    y_i       = sum_{j <= i} exp(s_i - s_j) (C_i . B_j) x_j  +  exp(s_i) C_i . h_in      # intra + carried state
    h_out     = exp(s_Q) h_in + sum_j exp(s_Q - s_j) outer(x_j, B_j)                   # state passing

The intra-chunk term is a masked (Q, Q) matrix per chunk and head, so memory is O(length * chunk_size),
never O(length^2). The state passing between chunks is the same segment-sum form one level up (a
(chunks + 1)^2 decay matrix per head): nothing runs sequentially, which on a GPU saves a launch per chunk. Every
exponent is <= 0 (the causal mask is applied before ``exp``), so nothing overflows and autodiff is NaN-free.
The intra-chunk matrices are recomputed in the backward pass rather than saved (``jax.checkpoint``).
B and C stay per group: C B^T is computed once per group and shared by its heads. x, B and C stay in their dtype
(bfloat16 halves their copies); every product accumulates in float32, and all other arithmetic is float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cab_jax.kernels.ssd.reference import add_skip

_F32 = jnp.float32


def _to_chunks(t: jax.Array, pad: int, chunk: int) -> jax.Array:
    """(batch, length, ...) -> (batch, n_chunks, chunk, ...), zero-padded at the end, dtype kept."""
    t = jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
    return t.reshape(t.shape[0], -1, chunk, *t.shape[2:])


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """a + b as (rounded sum, its exact rounding error) (Knuth's TwoSum)."""
    s = a + b
    b_part = s - a
    return s, (a - (s - b_part)) + (b - b_part)


def _compensated_cumsum(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inclusive cumulative sum along the last axis as hi + lo, lo holding hi's float32 rounding errors."""

    def add(left, right):
        hi, err = _two_sum(left[0], right[0])
        return hi, err + (left[1] + right[1])

    return jax.lax.associative_scan(add, (a, jnp.zeros_like(a)), axis=a.ndim - 1)


def _segment_sums(log_decay: jax.Array) -> jax.Array:
    """(..., Q) -> (..., Q, Q): [i, j] = a_{j+1} + ... + a_i for i >= j (0 on the diagonal), -inf above it.

    A difference of cumulative sums s_i - s_j, each carried with its rounding error (``_compensated_cumsum``):
    plain float32 sums would lose ~ulp(|s_i|) to cancellation when the sums are large (strong decay, long
    chunks); with the errors the difference is as accurate as a direct sum, at O(Q) work before the (Q, Q) step.
    """
    q = log_decay.shape[-1]
    hi, lo = _compensated_cumsum(log_decay)
    diff = (hi[..., :, None] - hi[..., None, :]) + (lo[..., :, None] - lo[..., None, :])
    rows = jnp.arange(q)
    return jnp.where(rows[:, None] >= rows[None, :], diff, -jnp.inf)


@jax.checkpoint  # Recomputed in the backward pass: the (Q, Q) matrices stay out of the saved residuals.
def _intra_chunk(x: jax.Array, log_decay: jax.Array, B: jax.Array, C: jax.Array) -> jax.Array:
    """sum_{j <= i} exp(a_{j+1} + ... + a_i) (C_i . B_j) x_j within each chunk.

    x: (batch, chunks, Q, groups, r, head_dim); log_decay: (batch, chunks, Q, groups, r); B, C: (batch, chunks,
    Q, groups, d_state). Returns (batch, chunks, Q, groups, r, head_dim).
    """
    decay = jnp.exp(_segment_sums(jnp.moveaxis(log_decay, 2, -1)))  # (batch, chunks, groups, r, Q, Q)
    scores = jnp.einsum("bcign,bcjgn->bcgij", C, B, preferred_element_type=_F32)  # exact for bfloat16 inputs
    return jnp.einsum("bcgrij,bcjgrp->bcigrp", scores[:, :, :, None] * decay, x)


def _pass_states(h0: jax.Array, chunk_states: jax.Array, log_total: jax.Array) -> jax.Array:
    """The state entering each chunk, and the final state: h_in[c] = exp(T_{c-1}) h_in[c-1] + chunk_states[c-1].

    h0: (batch, 1, groups, r, head_dim, d_state); chunk_states: (batch, chunks, groups, r, head_dim, d_state);
    log_total: (batch, chunks, groups, r), each chunk's summed log decay. Returns (batch, chunks + 1, ...).
    Unrolled as one product with the chunks' (chunks + 1)^2 segment-sum decays rather than a sequential loop
    (a GPU pays a launch or more per loop step): O(chunks^2) work that is small beside the intra-chunk products
    up to tens of thousands of tokens. Full float32 precision: these are the carried states.
    """
    states = jnp.concatenate([h0, chunk_states], axis=1)
    log_total = jnp.pad(log_total, [(0, 0), (1, 0), (0, 0), (0, 0)])  # h0 enters chunk 0 undecayed
    decay = jnp.exp(_segment_sums(jnp.moveaxis(log_total, 1, -1)))  # (batch, groups, r, chunks + 1, chunks + 1)
    return jnp.einsum("bgrcd,bdgrpn->bcgrpn", decay, states, precision=jax.lax.Precision.HIGHEST)


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
    log_decay_c = _to_chunks(log_decay.astype(_F32), pad, chunk).reshape(batch, -1, chunk, groups, r)
    Bc, Cc = _to_chunks(B, pad, chunk), _to_chunks(C, pad, chunk)

    y = _intra_chunk(xc, log_decay_c, Bc, Cc)

    # Each chunk's contribution to the state at its end, starting from zero: x_j B_j decayed by a_{j+1} + ... + a_Q
    # (summed directly, from the end).
    after = jnp.concatenate([log_decay_c[:, :, 1:], jnp.zeros_like(log_decay_c[:, :, :1])], axis=2)
    to_end = jnp.exp(jax.lax.cumsum(after, axis=2, reverse=True))  # (batch, chunks, Q, groups, r)
    chunk_states = jnp.einsum("bcjgrp,bcjgn->bcgrpn", to_end[..., None] * xc, Bc)
    log_cum = jnp.cumsum(log_decay_c, axis=2)  # s_i, from the chunk start
    if initial_state is None:
        h0 = jnp.zeros((batch, 1, groups, r, head_dim, d_state), _F32)
    else:
        h0 = initial_state.astype(_F32).reshape(batch, 1, groups, r, head_dim, d_state)
    h_in = _pass_states(h0, chunk_states, log_cum[:, :, -1])  # (batch, chunks + 1, groups, r, head_dim, d_state)
    y = y + jnp.exp(log_cum)[..., None] * jnp.einsum("bcign,bcgrpn->bcigrp", Cc, h_in[:, :-1])

    y = add_skip(y.reshape(batch, -1, heads, head_dim)[:, :length], x, D, x.dtype)
    if return_final_state:
        return y, h_in[:, -1].reshape(batch, heads, head_dim, d_state)
    return y

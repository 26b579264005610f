"""Mamba-1 selective scan, parallel over length with ``jax.lax.associative_scan`` (plain XLA, any backend).

The recurrence h_t = a_t * h_{t-1} + b_t (a_t = exp(delta_t * A), b_t = delta_t * B_t * u_t) is a scan
under the associative operator (a1, b1) . (a2, b2) = (a1 * a2, a2 * b1 + b2), with (a1, b1) the earlier
segment (for ``reverse`` the later positions, which come first in scan order).

Memory: a_t and b_t are materialised as (batch, length, d_inner, d_state) float32, once each, and the
scan's output state has the same size; y is then a contraction of the states with C.
Semantics, shapes and dtypes are those of ``reference.selective_scan_reference``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cab_jax.kernels.selective_scan.reference import effective_delta, finish_output

_F32 = jnp.float32


def _combine(earlier, later):
    a1, b1 = earlier
    a2, b2 = later
    return a1 * a2, a2 * b1 + b2


@functools.partial(jax.jit, static_argnames=("delta_softplus", "reverse"))
def selective_scan_associative(
    u: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    z: jax.Array | None = None,
    delta_bias: jax.Array | None = None,
    delta_softplus: bool = False,
    reverse: bool = False,
) -> jax.Array:
    """Mamba-1 selective scan via ``jax.lax.associative_scan`` over the length axis."""
    dt = effective_delta(delta, delta_bias, delta_softplus)  # (batch, length, d_inner)
    dA = jnp.exp(dt[..., None] * A.astype(_F32))  # (batch, length, d_inner, d_state)
    dBu = (dt * u.astype(_F32))[..., None] * B.astype(_F32)[:, :, None, :]
    _, h = jax.lax.associative_scan(_combine, (dA, dBu), reverse=reverse, axis=1)
    y = jnp.einsum("bldn,bln->bld", h, C.astype(_F32), precision=jax.lax.Precision.HIGHEST)
    return finish_output(y, u, D, z, u.dtype)

"""Sequential Mamba-1 selective scan: the readable ground truth.

For every position t (in order, or from the last to the first when ``reverse``)::

    delta_t = softplus(delta_t + delta_bias)            # bias / softplus only when asked
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t     # (d_inner, d_state), h_0 = 0
    y_t     = sum_n C_t[n] * h_t[:, n] + D * u_t
    y_t     = y_t * silu(z_t)                            # only when z is given

State and accumulation are float32 whatever the input dtype; the output has ``u.dtype``.
Shapes: u, delta, z: (batch, length, d_inner); A: (d_inner, d_state);
B, C: (batch, length, d_state); D, delta_bias: (d_inner,). Shape checks live in ``api.selective_scan``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def effective_delta(delta: jax.Array, delta_bias: jax.Array | None, delta_softplus: bool) -> jax.Array:
    """The float32 step size actually used by the scan: softplus(delta + delta_bias) as requested."""
    delta = delta.astype(_F32)
    if delta_bias is not None:
        delta = delta + delta_bias.astype(_F32)
    if delta_softplus:
        delta = jax.nn.softplus(delta)
    return delta


def finish_output(
    y: jax.Array, u: jax.Array, D: jax.Array | None, z: jax.Array | None, out_dtype: jnp.dtype
) -> jax.Array:
    """Adds the D skip connection and the silu(z) gate to the float32 scan output ``y``."""
    if D is not None:
        y = y + u.astype(_F32) * D.astype(_F32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(_F32))
    return y.astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("delta_softplus", "reverse"))
def selective_scan_reference(
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
    """Mamba-1 selective scan as a ``jax.lax.scan`` over the length axis (see the module docstring)."""
    batch, _, d_inner = u.shape
    d_state = A.shape[-1]
    dt = effective_delta(delta, delta_bias, delta_softplus)
    a = A.astype(_F32)

    def step(h, xs):
        dt_t, u_t, b_t, c_t = xs  # (batch, d_inner), (batch, d_inner), (batch, d_state), (batch, d_state)
        h = jnp.exp(dt_t[:, :, None] * a) * h + (dt_t * u_t)[:, :, None] * b_t[:, None, :]
        y_t = jnp.sum(h * c_t[:, None, :], axis=-1)
        return h, y_t

    # Time-major inputs so that lax.scan walks the length axis.
    xs = tuple(jnp.swapaxes(x.astype(_F32), 0, 1) for x in (dt, u, B, C))
    h0 = jnp.zeros((batch, d_inner, d_state), _F32)
    _, ys = jax.lax.scan(step, h0, xs, reverse=reverse)
    return finish_output(jnp.swapaxes(ys, 0, 1), u, D, z, u.dtype)

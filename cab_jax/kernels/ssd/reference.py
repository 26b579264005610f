"""Sequential Mamba-2 (SSD) scan: the readable ground truth, and the one-token step used in generation.

Per (batch, head), with the state h of shape (head_dim, d_state), h_0 = initial_state (zeros by default)::

    h_t = exp(log_decay_t) * h_{t-1} + outer(x_t, B_t)
    y_t = h_t @ C_t + D * x_t

Head ``h`` reads group ``h // (heads // groups)`` of B and C. This is the discrete Mamba-2 mixer of Phi-Mamba:
its call ``mamba_chunk_scan_combined(x / dt, dt, A=-1)`` with dt = softplus(A_log) is exactly this recurrence
with log_decay = -softplus(A_log). State and accumulation are float32 whatever the input dtype; outputs have
``x.dtype``. Shapes are documented (and checked) in ``api.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def expand_groups(t: jax.Array, heads: int) -> jax.Array:
    """(..., groups, d_state) -> (..., heads, d_state): every head gets its group's row, in float32."""
    return jnp.repeat(t.astype(_F32), heads // t.shape[-2], axis=-2)


def add_skip(y: jax.Array, x: jax.Array, D: jax.Array | None, out_dtype: jnp.dtype) -> jax.Array:
    """y + D * x (D per head, broadcast over head_dim) in float32, cast to ``out_dtype``."""
    if D is not None:
        y = y + D.astype(_F32)[:, None] * x.astype(_F32)
    return y.astype(out_dtype)


def state_update(
    state: jax.Array, x: jax.Array, log_decay: jax.Array, B: jax.Array, C: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One step of the recurrence without the D skip, all float32.

    state: (batch, heads, head_dim, d_state); x: (batch, heads, head_dim); log_decay: (batch, heads);
    B, C: (batch, heads, d_state) (already expanded from groups). Returns (new state, y (batch, heads, head_dim)).
    """
    state = jnp.exp(log_decay)[:, :, None, None] * state + x[:, :, :, None] * B[:, :, None, :]
    return state, jnp.einsum("bhpn,bhn->bhp", state, C)


@jax.jit
def ssd_step_reference(
    state: jax.Array, x: jax.Array, log_decay: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """One token: returns (y (batch, heads, head_dim) in ``x.dtype``, new float32 state)."""
    heads = x.shape[1]
    new_state, y = state_update(
        state.astype(_F32), x.astype(_F32), log_decay.astype(_F32), expand_groups(B, heads), expand_groups(C, heads)
    )
    return add_skip(y, x, D, x.dtype), new_state


@functools.partial(jax.jit, static_argnames=("return_final_state",))
def ssd_reference(
    x: jax.Array,
    log_decay: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    *,
    initial_state: jax.Array | None = None,
    return_final_state: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The recurrence as a ``jax.lax.scan`` over the length axis (see the module docstring)."""
    batch, _, heads, head_dim = x.shape
    d_state = B.shape[-1]
    if initial_state is None:
        initial_state = jnp.zeros((batch, heads, head_dim, d_state), _F32)
    # Time-major inputs so that lax.scan walks the length axis.
    xs = (x.astype(_F32), log_decay.astype(_F32), expand_groups(B, heads), expand_groups(C, heads))
    xs = tuple(jnp.swapaxes(t, 0, 1) for t in xs)
    final_state, ys = jax.lax.scan(lambda h, step: state_update(h, *step), initial_state.astype(_F32), xs)
    y = add_skip(jnp.swapaxes(ys, 0, 1), x, D, x.dtype)
    return (y, final_state) if return_final_state else y

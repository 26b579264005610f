"""Public entry points of the Mamba-2 (SSD) scan: shape checks and dispatch on ``impl``.

``impl``: "reference" (sequential ``lax.scan`` over tokens), "chunked" (the SSD chunked algorithm in XLA), or
"auto", which is "chunked" on every backend for now.
"""

from __future__ import annotations

import jax

from cab_jax.kernels.ssd.chunked import ssd_chunked
from cab_jax.kernels.ssd.reference import ssd_reference, ssd_step_reference

# Valid values of ``impl``.
SSD_IMPLS: tuple[str, ...] = ("auto", "reference", "chunked")


def _shape_errors(given: dict[str, jax.Array | None], expected: dict[str, tuple[tuple[int, ...], str]]) -> list[str]:
    return [
        f"{name} has shape {tuple(t.shape)}, expected {names} = {shape}"
        for name, t in given.items()
        if t is not None
        for shape, names in [expected[name]]
        if tuple(t.shape) != shape
    ]


def _check_groups(fn: str, heads: int, groups: int, heads_from: str) -> None:
    if groups == 0 or heads % groups:
        raise ValueError(f"{fn}: heads = {heads} (from {heads_from}) must be a multiple of groups = {groups} (from B)")


def _check_ssd_shapes(x, log_decay, B, C, D, initial_state, chunk_size) -> None:
    if x.ndim != 4 or x.shape[1] == 0:
        raise ValueError(f"ssd: x must have shape (batch, length, heads, head_dim) with length >= 1, got "
                         f"{tuple(x.shape)}")
    if B.ndim != 4:
        raise ValueError(f"ssd: B must have shape (batch, length, groups, d_state), got {tuple(B.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"ssd: chunk_size must be a positive int, got {chunk_size!r}")
    batch, length, heads, head_dim = x.shape
    groups, d_state = B.shape[2:]
    expected = {
        "log_decay": ((batch, length, heads), "(batch, length, heads)"),
        "B": ((batch, length, groups, d_state), "(batch, length, groups, d_state)"),
        "C": ((batch, length, groups, d_state), "(batch, length, groups, d_state)"),
        "D": ((heads,), "(heads,)"),
        "initial_state": ((batch, heads, head_dim, d_state), "(batch, heads, head_dim, d_state)"),
    }
    given = {"log_decay": log_decay, "B": B, "C": C, "D": D, "initial_state": initial_state}
    if errors := _shape_errors(given, expected):
        raise ValueError(
            f"ssd: with x of shape (batch, length, heads, head_dim) = {tuple(x.shape)} and "
            f"(groups, d_state) = {(groups, d_state)} (from B): " + "; ".join(errors)
        )
    _check_groups("ssd", heads, groups, "x")


def ssd(
    x: jax.Array,
    log_decay: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    *,
    initial_state: jax.Array | None = None,
    return_final_state: bool = False,
    chunk_size: int = 64,
    impl: str = "auto",
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Mamba-2 scan h_t = exp(log_decay_t) h_{t-1} + outer(x_t, B_t), y_t = h_t C_t + D x_t.

    x: (batch, length, heads, head_dim); log_decay: (batch, length, heads), <= 0 (log of the per-step decay);
    B, C: (batch, length, groups, d_state) with heads % groups == 0 (head h uses group h // (heads // groups));
    D: (heads,) or None; initial_state: (batch, heads, head_dim, d_state) or None (zeros).
    Returns y (batch, length, heads, head_dim) in x.dtype, and with ``return_final_state`` also the final
    state (batch, heads, head_dim, d_state) float32. State and accumulation are float32 whatever the input
    dtype. ``chunk_size`` is used by "chunked" only; ``impl`` is one of ``SSD_IMPLS``.
    """
    if impl not in SSD_IMPLS:
        raise ValueError(f"ssd: unknown impl {impl!r}; valid choices are {SSD_IMPLS}")
    _check_ssd_shapes(x, log_decay, B, C, D, initial_state, chunk_size)
    if impl == "reference":
        return ssd_reference(x, log_decay, B, C, D, initial_state=initial_state,
                             return_final_state=return_final_state)
    return ssd_chunked(x, log_decay, B, C, D, initial_state=initial_state, return_final_state=return_final_state,
                       chunk_size=chunk_size)


def ssd_step(
    state: jax.Array, x: jax.Array, log_decay: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """One recurrent step for generation.

    state: (batch, heads, head_dim, d_state) float32; x: (batch, heads, head_dim); log_decay: (batch, heads);
    B, C: (batch, groups, d_state); D: (heads,) or None. Returns (y (batch, heads, head_dim) in x.dtype,
    new float32 state).
    """
    if state.ndim != 4:
        raise ValueError(f"ssd_step: state must have shape (batch, heads, head_dim, d_state), got "
                         f"{tuple(state.shape)}")
    if B.ndim != 3:
        raise ValueError(f"ssd_step: B must have shape (batch, groups, d_state), got {tuple(B.shape)}")
    batch, heads, head_dim, d_state = state.shape
    groups = B.shape[1]
    expected = {
        "x": ((batch, heads, head_dim), "(batch, heads, head_dim)"),
        "log_decay": ((batch, heads), "(batch, heads)"),
        "B": ((batch, groups, d_state), "(batch, groups, d_state)"),
        "C": ((batch, groups, d_state), "(batch, groups, d_state)"),
        "D": ((heads,), "(heads,)"),
    }
    given = {"x": x, "log_decay": log_decay, "B": B, "C": C, "D": D}
    if errors := _shape_errors(given, expected):
        raise ValueError(
            f"ssd_step: with state of shape (batch, heads, head_dim, d_state) = {tuple(state.shape)} and "
            f"groups = {groups} (from B): " + "; ".join(errors)
        )
    _check_groups("ssd_step", heads, groups, "state")
    return ssd_step_reference(state, x, log_decay, B, C, D)

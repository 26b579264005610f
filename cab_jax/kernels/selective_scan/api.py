"""Public entry point of the Mamba-1 selective scan: shape checks and dispatch on ``impl``."""

from __future__ import annotations

from collections.abc import Callable

import jax

from cab_jax.kernels.selective_scan.associative import selective_scan_associative
from cab_jax.kernels.selective_scan.reference import selective_scan_reference

# Valid values of ``impl`` (and of the config's ``model.scan_impl``).
SCAN_IMPLS: tuple[str, ...] = ("auto", "reference", "associative")


def _resolve(impl: str) -> Callable[..., jax.Array]:
    if impl in ("auto", "associative"):
        # "auto" is the associative scan on every backend until the Pallas kernels exist; they are
        # selected here (by backend) and added to SCAN_IMPLS as "pallas" in their own issue.
        return selective_scan_associative
    if impl == "reference":
        return selective_scan_reference
    raise ValueError(f"selective_scan: unknown impl {impl!r}; valid choices are {SCAN_IMPLS}")


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.ndim != 3:
        raise ValueError(f"selective_scan: u must have shape (batch, length, d_inner), got {tuple(u.shape)}")
    if A.ndim != 2:
        raise ValueError(f"selective_scan: A must have shape (d_inner, d_state), got {tuple(A.shape)}")
    batch, length, d_inner = u.shape
    d_state = A.shape[1]
    expected = {
        "delta": ((batch, length, d_inner), "(batch, length, d_inner)"),
        "A": ((d_inner, d_state), "(d_inner, d_state)"),
        "B": ((batch, length, d_state), "(batch, length, d_state)"),
        "C": ((batch, length, d_state), "(batch, length, d_state)"),
        "D": ((d_inner,), "(d_inner,)"),
        "z": ((batch, length, d_inner), "(batch, length, d_inner)"),
        "delta_bias": ((d_inner,), "(d_inner,)"),
    }
    given = {"delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    errors = [
        f"{name} has shape {tuple(x.shape)}, expected {names} = {shape}"
        for name, x in given.items()
        if x is not None
        for shape, names in [expected[name]]
        if tuple(x.shape) != shape
    ]
    if errors:
        raise ValueError(
            f"selective_scan: with u of shape (batch, length, d_inner) = {tuple(u.shape)} and "
            f"d_state = {d_state} (from A): " + "; ".join(errors)
        )


def selective_scan(
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
    impl: str = "auto",
) -> jax.Array:
    """Mamba-1 selective scan (semantics in ``reference.py``) with the implementation chosen by ``impl``.

    u, delta, z: (batch, length, d_inner); A: (d_inner, d_state); B, C: (batch, length, d_state);
    D, delta_bias: (d_inner,). Returns y of shape (batch, length, d_inner) and dtype ``u.dtype``.
    ``impl`` is one of ``SCAN_IMPLS``.
    """
    fn = _resolve(impl)
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    return fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus, reverse=reverse)

"""What the Pallas backends share: the per-direction inputs, block sizes and the ``custom_vjp`` wiring.

A backend supplies two launchers over one or two scan directions that share one output and one gate z:

    forward(dirs, z, cfg, save) -> (out, ypre, states)
        out:    (batch, length, d_inner) in u.dtype = (sum over dirs of scan + D*u) * silu(z)
        ypre:   float32 (batch, length, d_inner), the ungated sum (a residual; None unless ``save``)
        states: per direction, float32, the scan state at the start of every chunk of positions, in scan
                order, in a layout each backend chooses (None unless ``save``)
    backward(dirs, z, ypre, states, dout, cfg) -> (grads per direction, dz)

Block sizes are a frozen dataclass so that they are static and hashable.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

_F32 = jnp.float32


class ScanDirection(NamedTuple):
    """The inputs of one scan direction, shapes as in ``reference.py`` (the kernels need D and delta_bias)."""

    u: jax.Array
    delta: jax.Array
    A: jax.Array
    B: jax.Array
    C: jax.Array
    D: jax.Array | None = None
    delta_bias: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of a selective-scan kernel.

    chunk: positions per chunk; the forward pass stores the state at every chunk start and the backward
        pass recomputes the states inside a chunk from it (memory ~ length / chunk states).
    block_d: channels of d_inner per program (a power of two on GPU, a multiple of 128 on TPU).
    num_warps, num_stages: Triton launch parameters (GPU only).
    """

    chunk: int = 16
    block_d: int = 32
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        for name in ("chunk", "block_d", "num_warps", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"BlockSizes.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Everything static about one launch."""

    reverses: tuple[bool, ...]  # one per direction
    delta_softplus: bool
    blocks: BlockSizes
    interpret: bool


class DirectionGrads(NamedTuple):
    du: jax.Array
    ddelta: jax.Array
    dA: jax.Array
    dB: jax.Array
    dC: jax.Array
    dD: jax.Array
    ddelta_bias: jax.Array


def softplus(x: jax.Array) -> jax.Array:
    """softplus with PyTorch's threshold (identity above 20), written with primitives every backend lowers."""
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def sigmoid(x: jax.Array) -> jax.Array:
    return 1.0 / (1.0 + jnp.exp(-x))


def num_chunks(length: int, chunk: int) -> int:
    return -(-length // chunk)


def with_defaults(d: ScanDirection) -> ScanDirection:
    """Zeros for an absent D or delta_bias (the kernels always take both)."""
    zeros = jnp.zeros((d.u.shape[-1],), _F32)
    return d._replace(D=zeros if d.D is None else d.D, delta_bias=zeros if d.delta_bias is None else d.delta_bias)


Forward = Callable[..., tuple[jax.Array, jax.Array | None, tuple[jax.Array, ...] | None]]
Backward = Callable[..., tuple[tuple[DirectionGrads, ...], jax.Array | None]]


def make_scan(forward: Forward, backward: Backward) -> Callable[..., jax.Array]:
    """Builds ``scan(dirs, z, cfg) -> out`` with the backend's kernels as forward and backward."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
    def scan(dirs: tuple[ScanDirection, ...], z: jax.Array | None, cfg: KernelConfig) -> jax.Array:
        return forward(dirs, z, cfg, save=False)[0]

    def scan_fwd(dirs, z, cfg):
        out, ypre, states = forward(dirs, z, cfg, save=True)
        return out, (dirs, z, ypre, states)

    def scan_bwd(cfg, residuals, dout):
        dirs, z, ypre, states = residuals
        grads, dz = backward(dirs, z, ypre, states, dout, cfg)
        dirs_grads = tuple(
            ScanDirection(*(g.astype(x.dtype) for g, x in zip(grad, d, strict=True)))
            for grad, d in zip(grads, dirs, strict=True)
        )
        return dirs_grads, (None if z is None else dz.astype(z.dtype))

    scan.defvjp(scan_fwd, scan_bwd)
    return scan

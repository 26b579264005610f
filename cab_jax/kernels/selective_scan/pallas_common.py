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
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

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

    chunk: positions per chunk; the forward pass stores the state at chunk starts and the backward pass
        recomputes the states inside a chunk from it (memory ~ length / (chunk * save_every) states).
    block_d: channels of d_inner per program (a power of two on GPU, a multiple of 128 on TPU).
    num_warps, num_stages: Triton launch parameters (GPU only).
    save_every: GPU only: the forward pass stores the state at the start of every ``save_every`` chunks
        (a segment) instead of every chunk; the backward pass first recomputes a segment's chunk-start
        states into a scratch buffer of save_every states per program (batch x d_inner x save_every x
        d_state floats in all), then walks the segment's chunks backwards. Less memory, more compute.
    """

    chunk: int = 16
    block_d: int = 32
    num_warps: int = 4
    num_stages: int = 1
    save_every: int = 1

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < 1:
                raise ValueError(f"BlockSizes.{field.name} must be >= 1, got {getattr(self, field.name)}")

    def __str__(self) -> str:
        """The fields as ``parse`` reads them: "chunk,block_d,num_warps,num_stages,save_every"."""
        return ",".join(str(getattr(self, f.name)) for f in dataclasses.fields(self))

    @classmethod
    def parse(cls, text: str) -> BlockSizes:
        """BlockSizes from "chunk,block_d,num_warps,num_stages,save_every" (all five, as ``str`` writes)."""
        names = [f.name for f in dataclasses.fields(cls)]
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != len(names) or not all(p.isdecimal() for p in parts):
            raise ValueError(f"block sizes {text!r}: expected {len(names)} positive integers "
                             f"{','.join(names)}, e.g. '2,32,1,1,1'")
        return cls(**dict(zip(names, map(int, parts), strict=True)))


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
# Partition spec of one direction's saved states, given (batch mesh axes, channel mesh axis).
StatesSpec = Callable[[tuple[str, ...] | None, str | None], P]

# Mesh axes as in ``cab_jax.sharding``: the batch is split over BATCH_AXES and d_inner over CHANNEL_AXIS.
BATCH_AXES = ("data", "fsdp")
CHANNEL_AXIS = "tensor"


class _Split(NamedTuple):
    """How a launch is split over the current mesh: the mesh axes of the batch and of d_inner."""

    mesh: jax.sharding.AbstractMesh
    batch: tuple[str, ...] | None
    channels: str | None

    def act(self) -> P:
        return P(self.batch, None, self.channels)

    def direction(self) -> ScanDirection:
        return ScanDirection(self.act(), self.act(), P(self.channels, None), P(self.batch, None, None),
                             P(self.batch, None, None), P(self.channels), P(self.channels))


def _mesh_split(batch: int, d_inner: int) -> _Split | None:
    """The split over the mesh set with ``jax.set_mesh`` (None without one, or when nothing divides)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    batch_axes = tuple(a for a in BATCH_AXES if sizes.get(a, 1) > 1)
    if batch % math.prod(sizes[a] for a in batch_axes):
        batch_axes = ()
    channels = CHANNEL_AXIS if sizes.get(CHANNEL_AXIS, 1) > 1 and d_inner % sizes[CHANNEL_AXIS] == 0 else None
    if not batch_axes and channels is None:
        return None
    return _Split(mesh, batch_axes or None, channels)


def _on_mesh(split: _Split | None, fn: Callable, args: tuple, in_specs: tuple, out_specs):
    """fn(*args), as one launch per device on its shard of the mesh when ``split`` is given. Pallas kernels
    are custom calls that the SPMD partitioner cannot split; without this every device would run the
    whole batch. None arguments are passed through."""
    if split is None:
        return fn(*args)
    present = [i for i, a in enumerate(args) if a is not None]

    def local(*xs):
        full = list(args)
        for i, x in zip(present, xs, strict=True):
            full[i] = x
        return fn(*full)

    return jax.shard_map(local, mesh=split.mesh, in_specs=tuple(in_specs[i] for i in present),
                         out_specs=out_specs, check_vma=False)(*[args[i] for i in present])


def make_scan(forward: Forward, backward: Backward, states_spec: StatesSpec) -> Callable[..., jax.Array]:
    """Builds ``scan(dirs, z, cfg) -> out`` with the backend's kernels as forward and backward.

    Under a mesh (``jax.set_mesh``) each kernel launch runs per device on its shard: batch over BATCH_AXES,
    d_inner over CHANNEL_AXIS (where they divide); the gradients that sum over a split axis are psum-ed.
    """

    def run_forward(dirs, z, cfg, save):
        split = _mesh_split(dirs[0].u.shape[0], dirs[0].u.shape[2])
        if split is None:
            return forward(dirs, z, cfg, save)
        n = len(dirs)
        out_specs = (split.act(), split.act() if (save or n > 1) else None,
                     (states_spec(split.batch, split.channels),) * n if save else None)
        run = lambda dirs, z: forward(dirs, z, cfg, save)
        return _on_mesh(split, run, (dirs, z), ((split.direction(),) * n, split.act()), out_specs)

    def run_backward(dirs, z, ypre, states, dout, cfg):
        split = _mesh_split(dirs[0].u.shape[0], dirs[0].u.shape[2])
        if split is None:
            return backward(dirs, z, ypre, states, dout, cfg)
        n = len(dirs)

        def local(dirs, z, ypre, states, dout):
            grads, dz = backward(dirs, z, ypre, states, dout, cfg)
            reduce = lambda x, axes: x if axes is None else jax.lax.psum(x, axes)
            grads = tuple(g._replace(dA=reduce(g.dA, split.batch), dD=reduce(g.dD, split.batch),
                                     ddelta_bias=reduce(g.ddelta_bias, split.batch),
                                     dB=reduce(g.dB, split.channels), dC=reduce(g.dC, split.channels))
                          for g in grads)
            return grads, dz

        act, direction = split.act(), split.direction()
        in_specs = ((direction,) * n, act, act, (states_spec(split.batch, split.channels),) * n, act)
        out_specs = (tuple(DirectionGrads(*direction) for _ in range(n)), act if z is not None else None)
        return _on_mesh(split, local, (dirs, z, ypre, states, dout), in_specs, out_specs)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
    def scan(dirs: tuple[ScanDirection, ...], z: jax.Array | None, cfg: KernelConfig) -> jax.Array:
        return run_forward(dirs, z, cfg, save=False)[0]

    def scan_fwd(dirs, z, cfg):
        out, ypre, states = run_forward(dirs, z, cfg, save=True)
        return out, (dirs, z, ypre, states)

    def scan_bwd(cfg, residuals, dout):
        dirs, z, ypre, states = residuals
        grads, dz = run_backward(dirs, z, ypre, states, dout, cfg)
        dirs_grads = tuple(
            ScanDirection(*(g.astype(x.dtype) for g, x in zip(grad, d, strict=True)))
            for grad, d in zip(grads, dirs, strict=True)
        )
        return dirs_grads, (None if z is None else dz.astype(z.dtype))

    scan.defvjp(scan_fwd, scan_bwd)
    return scan

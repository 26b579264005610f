"""What the Pallas backends share: the per-direction inputs, block sizes, the launch config and the
``custom_vjp`` wiring (``make_scan``).

A backend supplies two launchers over one or two scan directions that share one output and one gate z:

    forward(dirs, z, cfg, save) -> (out, ypre, states)
        out:    (batch, length, d_inner) in u.dtype = (sum over dirs of scan + D*u) * silu(z)
        ypre:   float32 (batch, length, d_inner), the ungated sum (a residual; None unless ``save``)
        states: per direction, float32, the scan state at the start of every chunk of positions, in scan
                order, in a layout each backend chooses (None unless ``save``)
    backward(dirs, z, ypre, states, dout, cfg) -> (grads per direction, dz)

and exports ``scan = make_scan(forward, backward)``, which ``api.py`` calls with a ``KernelConfig``. The
kernels compute on the arrays they are given; splitting them over a mesh is the caller's business.
Block sizes are a frozen dataclass so that they are static and hashable.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

_F32 = jnp.float32

# The name of a kernel forward's outputs when it runs for a gradient (the output, the first direction's sum and the
# saved chunk states): a remat policy that saves this name keeps them, so the backward pass does not run the forward
# kernel again (``jax.checkpoint_policies.save_only_these_names(SCAN_RESIDUALS)``).
SCAN_RESIDUALS = "selective_scan_residuals"
SMALLEST_TPU_VMEM = 16 << 20  # VMEM per TensorCore of TPU v2-v4 (JAX's TPU table), the smallest generations


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
    num_warps, num_stages: Triton launch parameters (GPU only). The Mosaic GPU kernel reads num_stages as the
        chunks per tile it stages in shared memory.
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
    name_residuals: bool = False  # see ``make_scan``
    vmem_bytes: int = SMALLEST_TPU_VMEM  # VMEM per TensorCore of the TPU the kernel is built for (TPU kernel only)


class DirectionGrads(NamedTuple):
    """The gradients of one direction's inputs (in the kernels: the refs of their per-block partial sums)."""

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


def softplus_from_exp_and_log(x: jax.Array, exp: Callable = jnp.exp, log: Callable = jnp.log,
                              fma: Callable = lambda a, b, c: a * b + c) -> jax.Array:
    """softplus with PyTorch's threshold, for backends without log1p: log1p(e) is ``log(1 + e)`` where that is
    accurate, and its series where e = ``exp(x)`` < 1/8 (there rounding 1 + e, and an approximate log's absolute
    error, would be large relative ones). ``exp``, ``log``, ``fma`` may be a backend's own instructions."""
    e = exp(jnp.minimum(x, 20.0))
    series = -1.0 / 6.0
    for k in range(5, 0, -1):  # (e - e**2/2 + ... - e**6/6) / e, relative error below e**6 / 7 (5e-7)
        series = fma(series, e, (-1.0) ** (k + 1) / k)
    return jnp.where(x > 20.0, x, jnp.where(e < 0.125, series * e, log(1.0 + e)))


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


def make_scan(forward: Forward, backward: Backward, interpreter_has_effects: bool = False) -> Callable[..., jax.Array]:
    """``scan(dirs, z, cfg) -> out``: a ``custom_vjp`` whose forward and backward passes are the backend's
    launchers (``dirs`` with D and delta_bias given, see ``with_defaults``). It computes on the arrays it is
    given: a caller that shards them runs it inside ``jax.shard_map``.

    With ``cfg.name_residuals`` the gradient's forward pass names the kernel's outputs ``SCAN_RESIDUALS`` (for a
    remat policy that keeps them). Without it, a forward pass whose residuals ``jax.checkpoint`` drops runs the
    kernel without saving states (``optimize_remat``), and the backward pass runs it again with them; except
    interpreted when the backend's interpreter has effects (``interpreter_has_effects``: optimize_remat refuses
    those)."""

    def scan_bwd(cfg, residuals, dout):
        dirs, z, ypre, states = residuals
        grads, dz = backward(dirs, z, ypre, states, dout, cfg)
        dirs_grads = tuple(
            ScanDirection(*(g.astype(x.dtype) for g, x in zip(grad, d, strict=True)))
            for grad, d in zip(grads, dirs, strict=True)
        )
        return dirs_grads, (None if z is None else dz.astype(z.dtype))

    def with_vjp(name: str | None) -> Callable[..., jax.Array]:
        @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
        def scan(dirs: tuple[ScanDirection, ...], z: jax.Array | None, cfg: KernelConfig) -> jax.Array:
            return forward(dirs, z, cfg, save=False)[0]

        def scan_fwd(dirs, z, cfg):
            saved = forward(dirs, z, cfg, save=True)
            out, ypre, states = saved if name is None else checkpoint_name(saved, name)
            return out, (dirs, z, ypre, states)

        # A policy cannot see names inside an optimize_remat forward, so the named variant goes without it.
        scan.defvjp(scan_fwd, scan_bwd, optimize_remat=name is None)
        return scan

    named, unnamed = with_vjp(SCAN_RESIDUALS), with_vjp(None)

    def scan(dirs: tuple[ScanDirection, ...], z: jax.Array | None, cfg: KernelConfig) -> jax.Array:
        plain = not cfg.name_residuals and not (cfg.interpret and interpreter_has_effects)
        return (unnamed if plain else named)(dirs, z, cfg)

    return scan

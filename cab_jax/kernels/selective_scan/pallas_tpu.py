"""Mamba-1 selective scan as Pallas kernels lowered through Mosaic (TPU), forward and backward, and ``scan``,
their ``custom_vjp`` that ``api.py`` calls.

Grid (batch, d_inner blocks, [direction,] chunk): the chunk axis (and the direction axis) runs in order
("arbitrary") and carries the float32 state, laid out (d_state_padded, block_d) with d_inner on lanes, in a
VMEM scratch. Activations arrive as (chunk, block_d) tiles; B and C are transposed in XLA (they are small)
to (batch, n_chunks, d_state_padded, chunk) so that B_t and C_t are static lane slices, i.e. columns that
broadcast over the channels. The steps of a chunk are unrolled, so every index inside a tile is static;
per-step rows go through float32 VMEM scratches. Partial blocks hold garbage: positions past the end get
dt = 0 (state unchanged) and out-of-range channels are zeroed before anything sums over channels.

Two directions sharing one output and z (Vim's bidirectional mixer) run in one launch, one after the other
along the direction axis. The reverse one's BlockSpecs map chunk c to n_chunks-1-c and it walks a chunk's
rows backwards: its inputs are read in place. The first direction's float32 output stays in a VMEM scratch
of the whole (length, block_d) slice until the second one adds to it, so that output is written once (past
a VMEM budget, i.e. for very long sequences, it goes through HBM between two launches instead).

Training stores the state at every chunk start (in scan order); the backward pass walks every direction's
chunks from its end in one launch, recomputes the states inside a chunk into VMEM and carries dh back.
Gradients that sum over channels (dB, dC) are written per channel block, those that sum over positions
(dA, dD, d delta_bias) accumulate over the chunk axis per (batch, channel block); XLA sums the partials
afterwards: no atomics, deterministic.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from cab_jax.kernels.selective_scan.pallas_common import (
    SMALLEST_TPU_VMEM,
    BlockSizes,
    DirectionGrads,
    KernelConfig,
    ScanDirection,
    make_scan,
    num_chunks,
    sigmoid,
    softplus,
)

_F32 = jnp.float32
_I32 = jnp.int32
_SUBLANES, _LANES = 8, 128
_SQ = pl.squeezed


def default_blocks(d_state: int) -> BlockSizes:
    """32 positions per chunk; block_d so that the state (d_state_padded, block_d) is about 8 vregs."""
    n_pad = _round_up(d_state, _SUBLANES)
    return BlockSizes(chunk=32, block_d=512 if n_pad <= 16 else 256 if n_pad <= 32 else 128)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class _Geometry:
    """Static sizes of one launch."""

    def __init__(self, u: jax.Array, d_state: int, blocks: BlockSizes):
        if blocks.block_d % _LANES or blocks.chunk % _SUBLANES:
            raise ValueError(f"Pallas TPU selective scan: block_d must be a multiple of {_LANES} and chunk of "
                             f"{_SUBLANES}, got {blocks!r}")
        self.batch, self.length, self.d_inner = u.shape
        self.d_state, self.n_pad = d_state, _round_up(d_state, _SUBLANES)
        # A block spanning a whole dimension is legal whatever its size.
        self.chunk, self.block_d = min(blocks.chunk, self.length), min(blocks.block_d, self.d_inner)
        self.n_chunks = num_chunks(self.length, self.chunk)
        self.n_dblocks = num_chunks(self.d_inner, self.block_d)

    def to_chunks(self, x: jax.Array) -> jax.Array:
        """(batch, length, d_state) -> float32 (batch, n_chunks, n_pad, chunk), zero padded."""
        x = jnp.pad(x.astype(_F32), ((0, 0), (0, self.n_chunks * self.chunk - self.length),
                                     (0, self.n_pad - self.d_state)))
        return jnp.swapaxes(x.reshape(self.batch, self.n_chunks, self.chunk, self.n_pad), 2, 3)

    def from_chunks(self, x: jax.Array) -> jax.Array:
        """Inverse of ``to_chunks``."""
        x = jnp.swapaxes(x, 2, 3).reshape(self.batch, self.n_chunks * self.chunk, self.n_pad)
        return x[:, :self.length, :self.d_state]

    def kernel_inputs(self, d: ScanDirection) -> ScanDirection:
        """u, delta as given; A transposed to (n_pad, d_inner); B, C in chunks; D, delta_bias as (1, d_inner)."""
        a_t = jnp.pad(d.A.astype(_F32).T, ((0, self.n_pad - self.d_state), (0, 0)))
        row = lambda x: x.astype(_F32).reshape(1, self.d_inner)
        return ScanDirection(d.u, d.delta, a_t, self.to_chunks(d.B), self.to_chunks(d.C), row(d.D),
                             row(d.delta_bias))


class _Specs:
    """BlockSpecs of one direction; ``scan(*grid) -> (batch, d block, chunk in scan order)``."""

    def __init__(self, geo: _Geometry, scan: Callable, reverse: bool):
        self.geo, self.scan, self.reverse = geo, scan, reverse

    def _spec(self, shape: tuple, arrange: Callable) -> pl.BlockSpec:
        """``arrange(b, d, array chunk, scan chunk)`` gives the block index."""

        def index(*grid):
            b, d, c = self.scan(*grid)
            return arrange(b, d, self.geo.n_chunks - 1 - c if self.reverse else c, c)

        return pl.BlockSpec(shape, index)

    def act(self) -> pl.BlockSpec:
        return self._spec((_SQ, self.geo.chunk, self.geo.block_d), lambda b, d, ci, c: (b, ci, d))

    def chunk_cols(self) -> pl.BlockSpec:
        return self._spec((_SQ, _SQ, self.geo.n_pad, self.geo.chunk), lambda b, d, ci, c: (b, ci, 0, 0))

    def params(self, rows: int) -> pl.BlockSpec:
        return self._spec((rows, self.geo.block_d), lambda b, d, ci, c: (0, d))

    def inputs(self) -> ScanDirection:
        """The specs of ``_Geometry.kernel_inputs``."""
        act, cols, row = self.act(), self.chunk_cols(), self.params(1)
        return ScanDirection(act, act, self.params(self.geo.n_pad), cols, cols, row, row)

    def state(self) -> pl.BlockSpec:
        return self._spec((_SQ, _SQ, self.geo.n_pad, self.geo.block_d), lambda b, d, ci, c: (b, c, 0, d))

    def per_dblock_cols(self) -> pl.BlockSpec:
        return self._spec((_SQ, _SQ, _SQ, self.geo.n_pad, self.geo.chunk), lambda b, d, ci, c: (b, d, ci, 0, 0))

    def per_batch(self, rows: int) -> pl.BlockSpec:
        return self._spec((_SQ, rows, self.geo.block_d), lambda b, d, ci, c: (b, 0, d))


class _Tiles(NamedTuple):
    """One chunk of one direction as float32 values, zero outside the sequence and d_inner (but ``pre``)."""

    mask: jax.Array  # (chunk, block_d): inside the sequence and d_inner
    lanes: jax.Array  # scalar: valid channels in this block
    u: jax.Array
    pre: jax.Array  # delta + delta_bias
    dt: jax.Array  # the step size
    A: jax.Array  # (n_pad, block_d): A transposed
    D: jax.Array  # (1, block_d)


def _lane_mask(geo: _Geometry, rows: int, lanes: jax.Array) -> jax.Array:
    return jax.lax.broadcasted_iota(_I32, (rows, geo.block_d), 1) < lanes


def _load_tiles(refs: ScanDirection, geo: _Geometry, ci: jax.Array, dblock: jax.Array,
                delta_softplus: bool) -> _Tiles:
    """Chunk ``ci`` (in array order) of channel block ``dblock`` of one direction's input refs."""
    lanes = geo.d_inner - dblock * geo.block_d
    rows = jax.lax.broadcasted_iota(_I32, (geo.chunk, geo.block_d), 0)
    mask = (rows < geo.length - ci * geo.chunk) & _lane_mask(geo, geo.chunk, lanes)
    keep = lambda ok, ref: jnp.where(ok, ref[...].astype(_F32), 0.0)
    pre = refs.delta[...].astype(_F32) + keep(_lane_mask(geo, 1, lanes), refs.delta_bias)
    dt = jnp.where(mask, softplus(pre) if delta_softplus else pre, 0.0)
    return _Tiles(mask, lanes, keep(mask, refs.u), pre, dt, keep(_lane_mask(geo, geo.n_pad, lanes), refs.A),
                  keep(_lane_mask(geo, 1, lanes), refs.D))


def _scan_rows(geo: _Geometry, reverse: bool) -> list[int]:
    """The rows of a chunk in scan order."""
    return list(range(geo.chunk))[::-1] if reverse else list(range(geo.chunk))


def _row(ref, r: int) -> jax.Array:
    return ref[r:r + 1, :]


def _col(ref, r: int) -> jax.Array:
    return ref[:, r:r + 1]


class _ForwardScratch(NamedTuple):
    """The forward kernel's VMEM scratch, float32."""

    h: jax.Array  # (n_pad, block_d): the state, carried over the chunk axis
    dt: jax.Array  # (chunk, block_d) per-step rows: dt, dt * u, the scan's output
    dtu: jax.Array
    y: jax.Array
    acc: jax.Array | None  # (n_chunks, chunk, block_d): the sum of the directions before the last one


class _BackwardScratch(NamedTuple):
    """The backward kernel's VMEM scratch, float32."""

    dt: jax.Array  # (chunk, block_d) per-step rows: dt, dt * u, dy, sum_n dh * A * h_prev, sum_n dh * B
    dtu: jax.Array
    dy: jax.Array
    ga: jax.Array
    sb: jax.Array
    hs: jax.Array  # (chunk + 1, n_pad, block_d): the chunk's states
    dh: jax.Array  # (n_dirs, n_pad, block_d): per direction, dh carried over the chunk axis


class _BackwardDirection(NamedTuple):
    """What the backward kernel reads of one direction, each in that direction's chunk order."""

    inputs: ScanDirection
    state: jax.Array  # the state at the chunk's start
    dout: jax.Array
    z: jax.Array | None


def _zero(*refs) -> None:
    for ref in refs:
        ref[...] = jnp.zeros(ref.shape, _F32)


def _forward_kernel(dirs: tuple[ScanDirection, ...], z_ref, carry_ref, out_ref, ypre_ref, state_refs,
                    scratch: _ForwardScratch, *, geo: _Geometry, cfg: KernelConfig):
    """Grid step (batch, channel block, direction, chunk): chunk c of one direction.

    dirs: per direction, its input refs; z_ref: the gate (None: no gate); carry_ref: a float32 sum of earlier
    directions from another launch (None: none); out_ref: the (gated) output; ypre_ref: the ungated float32
    sum (None: not kept); state_refs: per direction, the state at the chunk's start (None without ``save``).
    """
    dblock, k, c = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    n_dirs = len(dirs)
    for j, (refs, reverse) in enumerate(zip(dirs, cfg.reverses, strict=True)):
        pl.when(k == j)(functools.partial(
            _forward_direction, refs, None if state_refs is None else state_refs[j], dblock, c, geo=geo, cfg=cfg,
            reverse=reverse, first=j == 0, last=j == n_dirs - 1, z_ref=z_ref, carry_ref=carry_ref,
            out_ref=out_ref, ypre_ref=ypre_ref, scratch=scratch))


def _forward_direction(refs: ScanDirection, state_ref, dblock, c, *, geo: _Geometry, cfg: KernelConfig,
                       reverse: bool, first: bool, last: bool, z_ref, carry_ref, out_ref, ypre_ref,
                       scratch: _ForwardScratch):
    """Chunk ``c`` (in scan order) of one direction. Before the last direction, its sum with the earlier ones
    goes to ``scratch.acc``; the last one writes the output."""
    sc = scratch
    ci = geo.n_chunks - 1 - c if reverse else c
    pl.when(c == 0)(functools.partial(_zero, sc.h))
    if state_ref is not None:
        state_ref[...] = sc.h[...]
    t = _load_tiles(refs, geo, ci, dblock, cfg.delta_softplus)
    sc.dt[...] = t.dt
    sc.dtu[...] = t.dt * t.u
    h = sc.h[...]
    for r in _scan_rows(geo, reverse):
        h = jnp.exp(_row(sc.dt, r) * t.A) * h + _col(refs.B, r) * _row(sc.dtu, r)
        sc.y[r:r + 1, :] = jnp.sum(h * _col(refs.C, r), axis=0, keepdims=True)
    sc.h[...] = h
    y = sc.y[...] + t.D * t.u
    if not first:
        y = y + sc.acc[ci]
    if not last:
        sc.acc[ci] = y
        return
    if carry_ref is not None:
        y = y + carry_ref[...]
    if ypre_ref is not None:
        ypre_ref[...] = y
    if z_ref is not None:
        z = z_ref[...].astype(_F32)
        y = y * z * sigmoid(z)
    out_ref[...] = y.astype(out_ref.dtype)


def _backward_kernel(dirs: tuple[_BackwardDirection, ...], ypre_ref, dz_ref, grads: tuple[DirectionGrads, ...],
                     scratch: _BackwardScratch, *, geo: _Geometry, cfg: KernelConfig):
    """Grid step (batch, channel block, s): chunk s from the end of every direction, one after the other.

    dirs: per direction, its inputs, saved state, output gradient and gate (None: no gate) in its chunk
    order; ypre_ref: the ungated forward output and dz_ref the gate's gradient (both None without a gate);
    grads: per direction, its gradients' refs (dB, dC per channel block and chunk, dA, dD, d delta_bias
    accumulated over the chunk axis).
    """
    dblock, s = pl.program_id(1), pl.program_id(2)
    cols = jax.lax.broadcasted_iota(_I32, (geo.n_pad, geo.chunk), 1)
    for j, (refs, g, reverse) in enumerate(zip(dirs, grads, cfg.reverses, strict=True)):
        _backward_direction(j, refs, g, dblock, s, cols, geo=geo, cfg=cfg, reverse=reverse, ypre_ref=ypre_ref,
                            dz_ref=dz_ref if j == 0 else None, scratch=scratch)


def _start_backward_direction(dh_s, j: int, g: DirectionGrads) -> None:
    dh_s[j] = jnp.zeros(dh_s.shape[1:], _F32)
    _zero(g.dA, g.dD, g.ddelta_bias)


def _backward_direction(j: int, refs: _BackwardDirection, g: DirectionGrads, dblock, s, cols, *, geo: _Geometry,
                        cfg: KernelConfig, reverse: bool, ypre_ref, dz_ref, scratch: _BackwardScratch):
    """Direction ``j``'s chunk s from its end: recompute the chunk's states, carry dh back through it, write
    the chunk's gradients (and dz, where ``dz_ref`` is given)."""
    sc, x = scratch, refs.inputs
    ci = s if reverse else geo.n_chunks - 1 - s
    pl.when(s == 0)(functools.partial(_start_backward_direction, sc.dh, j, g))

    t = _load_tiles(x, geo, ci, dblock, cfg.delta_softplus)
    dy = refs.dout[...].astype(_F32)
    if refs.z is not None:
        z = refs.z[...].astype(_F32)
        sig = sigmoid(z)
        if dz_ref is not None:
            dz_ref[...] = (dy * ypre_ref[...] * sig * (1.0 + z * (1.0 - sig))).astype(dz_ref.dtype)
        dy = dy * z * sig
    dy = jnp.where(t.mask, dy, 0.0)
    sc.dt[...] = t.dt
    sc.dtu[...] = t.dt * t.u
    sc.dy[...] = dy

    rows = _scan_rows(geo, reverse)
    h = jnp.where(_lane_mask(geo, geo.n_pad, t.lanes), refs.state[...], 0.0)
    sc.hs[0] = h
    for i, r in enumerate(rows):  # Recompute the states inside the chunk: hs[i + 1] after step i.
        h = jnp.exp(_row(sc.dt, r) * t.A) * h + _col(x.B, r) * _row(sc.dtu, r)
        sc.hs[i + 1] = h

    dh, dA = sc.dh[j], jnp.zeros((geo.n_pad, geo.block_d), _F32)
    db = dc = jnp.zeros((geo.n_pad, geo.chunk), _F32)
    for i in reversed(range(geo.chunk)):
        r = rows[i]
        dt_r, dy_r, b_col = _row(sc.dt, r), _row(sc.dy, r), _col(x.B, r)
        dh = dh + _col(x.C, r) * dy_r
        dc = jnp.where(cols == r, jnp.sum(sc.hs[i + 1] * dy_r, axis=1, keepdims=True), dc)
        a = jnp.exp(dt_r * t.A)
        ga = dh * a * sc.hs[i]
        dA = dA + dt_r * ga
        sc.ga[r:r + 1, :] = jnp.sum(ga * t.A, axis=0, keepdims=True)
        sc.sb[r:r + 1, :] = jnp.sum(dh * b_col, axis=0, keepdims=True)
        db = jnp.where(cols == r, jnp.sum(dh * _row(sc.dtu, r), axis=1, keepdims=True), db)
        dh = a * dh
    sc.dh[j] = dh

    sb = sc.sb[...]  # sum_n dh * B: d/d(dt * u)
    ddt = sc.ga[...] + sb * t.u
    dpre = jnp.where(t.mask, ddt * sigmoid(t.pre) if cfg.delta_softplus else ddt, 0.0)
    g.du[...] = (sb * t.dt + t.D * dy).astype(g.du.dtype)
    g.ddelta[...] = dpre.astype(g.ddelta.dtype)
    g.dB[...] = db
    g.dC[...] = dc
    g.dA[...] += dA
    g.dD[...] += jnp.sum(dy * t.u, axis=0, keepdims=True)
    g.ddelta_bias[...] += jnp.sum(dpre, axis=0, keepdims=True)


def _vmem(shape: tuple[int, ...]) -> pltpu.VMEM:
    return pltpu.VMEM(shape, _F32)




def _compiler_params(n_parallel: int, n_arbitrary: int, vmem_bytes: int) -> pltpu.CompilerParams:
    """Grid semantics; on TPUs with more VMEM than ``SMALLEST_TPU_VMEM`` (v5e, v6e: 128 MiB; v5p, v7: 64 MiB per
    core) the scoped VMEM limit is raised to 3/4 of it, the room ``resident_bytes`` plans with (the smallest
    generations keep their default scoped limit, 16 MiB)."""
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_parallel + ("arbitrary",) * n_arbitrary,
                                vmem_limit_bytes=vmem_bytes * 3 // 4 if vmem_bytes > SMALLEST_TPU_VMEM else None)


def resident_bytes(vmem_bytes: int) -> int:
    """Of two directions, the first keeps its float32 output, (n_chunks * chunk, block_d), in VMEM until the second
    adds to it: within this budget block_d narrows to fit; past it (very long sequences) that output makes a round
    trip through HBM between two launches instead. Half of the generation's VMEM per core (the rest holds the
    tiles, the state and the pipeline's buffers), or 8 MiB within the 16 MiB default scoped limit of v2-v4."""
    return 8 << 20 if vmem_bytes <= SMALLEST_TPU_VMEM else vmem_bytes // 2


def _forward(dirs: tuple[ScanDirection, ...], z: jax.Array | None, cfg: KernelConfig, save: bool):
    u, d_state = dirs[0].u, dirs[0].A.shape[1]
    geo = _Geometry(u, d_state, cfg.blocks)
    row_bytes, budget = 4 * geo.n_chunks * geo.chunk, resident_bytes(cfg.vmem_bytes)
    if len(dirs) == 1 or row_bytes * geo.block_d <= budget:
        return _forward_call(dirs, z, cfg, geo, save)
    width = budget // row_bytes // _LANES * _LANES
    if width:
        return _forward_call(dirs, z, cfg, _Geometry(u, d_state, dataclasses.replace(cfg.blocks, block_d=width)), save)
    split = [dataclasses.replace(cfg, reverses=cfg.reverses[i:i + 1]) for i in range(2)]
    first, _, states0 = _forward_call(dirs[:1], z, split[0], geo, save, finish=False)
    out, ypre, states1 = _forward_call(dirs[1:], z, split[1], geo, save, carry=first)
    return out, ypre, (states0 + states1 if save else None)


def _forward_call(dirs: tuple[ScanDirection, ...], z: jax.Array | None, cfg: KernelConfig, geo: _Geometry,
                  save: bool, carry: jax.Array | None = None, finish: bool = True):
    """One launch over ``dirs``, ``carry`` (float32) added to their sum; unless ``finish``, the output is that
    float32 sum, ungated (and no ypre)."""
    u = dirs[0].u
    n_dirs, last = len(dirs), geo.n_chunks - 1
    has_z, has_ypre = z is not None and finish, save and finish

    def scan(j: int) -> Callable:  # Direction j runs at k == j; before that at its first chunk, after at its last.
        return lambda b, d, k, c: (b, d, jnp.where(k < j, 0, jnp.where(k > j, last, c)))

    specs = [_Specs(geo, scan(j), r) for j, r in enumerate(cfg.reverses)]
    act = specs[-1].act()
    states = jax.ShapeDtypeStruct((geo.batch, geo.n_chunks, geo.n_pad, geo.d_inner), _F32)
    tile = (geo.chunk, geo.block_d)
    scratch = _ForwardScratch(_vmem((geo.n_pad, geo.block_d)), _vmem(tile), _vmem(tile), _vmem(tile),
                              _vmem((geo.n_chunks, *tile)) if n_dirs > 1 else None)
    out, ypre, states = pl.pallas_call(
        functools.partial(_forward_kernel, geo=geo, cfg=cfg),
        grid=(geo.batch, geo.n_dblocks, n_dirs, geo.n_chunks),
        in_specs=(tuple(sp.inputs() for sp in specs), act if has_z else None, act if carry is not None else None),
        out_specs=(act, act if has_ypre else None, tuple(sp.state() for sp in specs) if save else None),
        out_shape=(jax.ShapeDtypeStruct(u.shape, u.dtype if finish else _F32),
                   jax.ShapeDtypeStruct(u.shape, _F32) if has_ypre else None, (states,) * n_dirs if save else None),
        scratch_shapes=(scratch,),
        compiler_params=_compiler_params(2, 2, cfg.vmem_bytes), interpret=cfg.interpret, name="selective_scan_fwd",
    )(tuple(geo.kernel_inputs(d) for d in dirs), z if has_z else None, carry)
    return out, ypre, states


def _backward(dirs, z, ypre, states, dout, cfg: KernelConfig):
    u = dirs[0].u
    geo = _Geometry(u, dirs[0].A.shape[1], cfg.blocks)
    has_z = z is not None
    specs = [_Specs(geo, lambda b, d, s: (b, d, geo.n_chunks - 1 - s), r) for r in cfg.reverses]
    inputs = tuple(_BackwardDirection(geo.kernel_inputs(direction), state, dout, z)
                   for direction, state in zip(dirs, states, strict=True))
    in_specs = tuple(_BackwardDirection(sp.inputs(), sp.state(), sp.act(), sp.act() if has_z else None)
                     for sp in specs)
    cols = jax.ShapeDtypeStruct((geo.batch, geo.n_dblocks, geo.n_chunks, geo.n_pad, geo.chunk), _F32)
    per_batch = lambda rows: jax.ShapeDtypeStruct((geo.batch, rows, geo.d_inner), _F32)
    grad_shapes = tuple(DirectionGrads(jax.ShapeDtypeStruct(u.shape, direction.u.dtype),
                                       jax.ShapeDtypeStruct(u.shape, direction.delta.dtype),
                                       per_batch(geo.n_pad), cols, cols, per_batch(1), per_batch(1))
                        for direction in dirs)
    grad_specs = tuple(DirectionGrads(sp.act(), sp.act(), sp.per_batch(geo.n_pad), sp.per_dblock_cols(),
                                      sp.per_dblock_cols(), sp.per_batch(1), sp.per_batch(1)) for sp in specs)
    tile = (geo.chunk, geo.block_d)
    scratch = _BackwardScratch(*(_vmem(tile) for _ in range(5)), _vmem((geo.chunk + 1, geo.n_pad, geo.block_d)),
                               _vmem((len(dirs), geo.n_pad, geo.block_d)))
    ypre_spec = dz_spec = specs[0].act() if has_z else None
    dz, raw = pl.pallas_call(
        functools.partial(_backward_kernel, geo=geo, cfg=cfg),
        grid=(geo.batch, geo.n_dblocks, geo.n_chunks),
        in_specs=(in_specs, ypre_spec), out_specs=(dz_spec, grad_specs),
        out_shape=(jax.ShapeDtypeStruct(u.shape, z.dtype) if has_z else None, grad_shapes),
        scratch_shapes=(scratch,),
        compiler_params=_compiler_params(2, 1, cfg.vmem_bytes), interpret=cfg.interpret, name="selective_scan_bwd",
    )(inputs, ypre if has_z else None)
    grads = tuple(DirectionGrads(g.du, g.ddelta, g.dA.sum(0).T[:, :geo.d_state], geo.from_chunks(g.dB.sum(1)),
                                 geo.from_chunks(g.dC.sum(1)), g.dD.sum((0, 1)), g.ddelta_bias.sum((0, 1)))
                  for g in raw)
    return grads, dz


# The Mosaic kernels as scan(dirs, z, cfg) -> out, with their custom_vjp (what api.py calls).
scan = make_scan(_forward, _backward)

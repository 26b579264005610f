"""Mamba-1 selective scan as Pallas kernels lowered through Mosaic (TPU), forward and backward.

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
from jax.sharding import PartitionSpec as P

from cab_jax.kernels.selective_scan.pallas_common import (
    BlockSizes,
    DirectionGrads,
    KernelConfig,
    ScanDirection,
    make_scan,
    num_chunks,
    sigmoid,
    softplus,
    with_defaults,
)

_F32 = jnp.float32
_I32 = jnp.int32
_N_INPUTS = len(ScanDirection._fields)
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

    def kernel_inputs(self, d: ScanDirection) -> list[jax.Array]:
        """u, delta as given; A transposed to (n_pad, d_inner); B, C in chunks; D, delta_bias as (1, d_inner)."""
        a_t = jnp.pad(d.A.astype(_F32).T, ((0, self.n_pad - self.d_state), (0, 0)))
        row = lambda x: x.astype(_F32).reshape(1, self.d_inner)
        return [d.u, d.delta, a_t, self.to_chunks(d.B), self.to_chunks(d.C), row(d.D), row(d.delta_bias)]


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

    def inputs(self) -> list[pl.BlockSpec]:
        act, cols, row = self.act(), self.chunk_cols(), self.params(1)
        return [act, act, self.params(self.geo.n_pad), cols, cols, row, row]

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


def _load_tiles(refs, geo: _Geometry, ci: jax.Array, d: jax.Array, delta_softplus: bool) -> _Tiles:
    u_ref, delta_ref, a_ref, _, _, d_ref, bias_ref = refs
    lanes = geo.d_inner - d * geo.block_d
    rows = jax.lax.broadcasted_iota(_I32, (geo.chunk, geo.block_d), 0)
    mask = (rows < geo.length - ci * geo.chunk) & _lane_mask(geo, geo.chunk, lanes)
    keep = lambda ok, ref: jnp.where(ok, ref[...].astype(_F32), 0.0)
    pre = delta_ref[...].astype(_F32) + keep(_lane_mask(geo, 1, lanes), bias_ref)
    dt = jnp.where(mask, softplus(pre) if delta_softplus else pre, 0.0)
    return _Tiles(mask, lanes, keep(mask, u_ref), pre, dt, keep(_lane_mask(geo, geo.n_pad, lanes), a_ref),
                  keep(_lane_mask(geo, 1, lanes), d_ref))


def _scan_rows(geo: _Geometry, reverse: bool) -> list[int]:
    """The rows of a chunk in scan order."""
    return list(range(geo.chunk))[::-1] if reverse else list(range(geo.chunk))


def _row(ref, r: int) -> jax.Array:
    return ref[r:r + 1, :]


def _col(ref, r: int) -> jax.Array:
    return ref[:, r:r + 1]


def _forward_kernel(*refs, geo: _Geometry, cfg: KernelConfig, has_z: bool, has_carry: bool, has_ypre: bool,
                    save: bool):
    n_dirs = len(cfg.reverses)
    it = iter(refs)
    dir_refs = [[next(it) for _ in range(_N_INPUTS)] for _ in range(n_dirs)]
    z_ref = next(it) if has_z else None
    carry_ref = next(it) if has_carry else None  # float32 sum of earlier directions (from another launch)
    out_ref = next(it)
    ypre_ref = next(it) if has_ypre else None
    state_refs = [next(it) if save else None for _ in range(n_dirs)]
    h_s, dt_s, dtu_s, y_s = next(it), next(it), next(it), next(it)
    acc_s = next(it, None)  # (n_chunks, chunk, block_d): the sum of the directions before the last one
    d, k, c = pl.program_id(1), pl.program_id(2), pl.program_id(3)

    def run(j: int, drefs, reverse: bool, state_ref):
        ci = geo.n_chunks - 1 - c if reverse else c
        bt_ref, ct_ref = drefs[3], drefs[4]

        @pl.when(c == 0)
        def _():
            h_s[...] = jnp.zeros(h_s.shape, _F32)

        if state_ref is not None:
            state_ref[...] = h_s[...]
        t = _load_tiles(drefs, geo, ci, d, cfg.delta_softplus)
        dt_s[...] = t.dt
        dtu_s[...] = t.dt * t.u
        h = h_s[...]
        for r in _scan_rows(geo, reverse):
            h = jnp.exp(_row(dt_s, r) * t.A) * h + _col(bt_ref, r) * _row(dtu_s, r)
            y_s[r:r + 1, :] = jnp.sum(h * _col(ct_ref, r), axis=0, keepdims=True)
        h_s[...] = h
        y = y_s[...] + t.D * t.u
        if j > 0:
            y = y + acc_s[ci]
        if j < n_dirs - 1:
            acc_s[ci] = y
            return
        if carry_ref is not None:
            y = y + carry_ref[...]
        if ypre_ref is not None:
            ypre_ref[...] = y
        if z_ref is not None:
            z = z_ref[...].astype(_F32)
            y = y * z * sigmoid(z)
        out_ref[...] = y.astype(out_ref.dtype)

    for j, args in enumerate(zip(dir_refs, cfg.reverses, state_refs, strict=True)):
        pl.when(k == j)(functools.partial(run, j, *args))


def _backward_kernel(*refs, geo: _Geometry, cfg: KernelConfig, has_z: bool):
    n_dirs = len(cfg.reverses)
    it = iter(refs)
    # Per direction: its 7 inputs, the saved states, dout [and z], each with the direction's chunk order.
    dir_refs = [[next(it) for _ in range(_N_INPUTS + 2 + has_z)] for _ in range(n_dirs)]
    ypre_ref = next(it) if has_z else None
    dz_ref = next(it) if has_z else None
    grad_refs = [[next(it) for _ in range(_N_INPUTS)] for _ in range(n_dirs)]
    dt_s, dtu_s, dy_s, ga_s, sb_s, hs_s, dh_s = it
    d, s = pl.program_id(1), pl.program_id(2)
    cols = jax.lax.broadcasted_iota(_I32, (geo.n_pad, geo.chunk), 1)

    for j, (drefs, grefs, reverse) in enumerate(zip(dir_refs, grad_refs, cfg.reverses, strict=True)):
        bt_ref, ct_ref, state_ref, dout_ref = drefs[3], drefs[4], drefs[_N_INPUTS], drefs[_N_INPUTS + 1]
        du_ref, ddelta_ref, da_ref, db_ref, dc_ref, dd_ref, dbias_ref = grefs
        ci = s if reverse else geo.n_chunks - 1 - s

        @pl.when(s == 0)
        def _(j=j, da_ref=da_ref, dd_ref=dd_ref, dbias_ref=dbias_ref):
            dh_s[j] = jnp.zeros(dh_s.shape[1:], _F32)
            for ref in (da_ref, dd_ref, dbias_ref):
                ref[...] = jnp.zeros(ref.shape, _F32)

        t = _load_tiles(drefs[:_N_INPUTS], geo, ci, d, cfg.delta_softplus)
        dy = dout_ref[...].astype(_F32)
        if has_z:
            z = drefs[_N_INPUTS + 2][...].astype(_F32)
            sig = sigmoid(z)
            if j == 0:
                dz_ref[...] = (dy * ypre_ref[...] * sig * (1.0 + z * (1.0 - sig))).astype(dz_ref.dtype)
            dy = dy * z * sig
        dy = jnp.where(t.mask, dy, 0.0)
        dt_s[...] = t.dt
        dtu_s[...] = t.dt * t.u
        dy_s[...] = dy

        rows = _scan_rows(geo, reverse)
        h = jnp.where(_lane_mask(geo, geo.n_pad, t.lanes), state_ref[...], 0.0)
        hs_s[0] = h
        for i, r in enumerate(rows):  # Recompute the states inside the chunk: hs_s[i + 1] after step i.
            h = jnp.exp(_row(dt_s, r) * t.A) * h + _col(bt_ref, r) * _row(dtu_s, r)
            hs_s[i + 1] = h

        dh, dA = dh_s[j], jnp.zeros((geo.n_pad, geo.block_d), _F32)
        db = dc = jnp.zeros((geo.n_pad, geo.chunk), _F32)
        for i in reversed(range(geo.chunk)):
            r = rows[i]
            dt_r, dy_r, b_col = _row(dt_s, r), _row(dy_s, r), _col(bt_ref, r)
            dh = dh + _col(ct_ref, r) * dy_r
            dc = jnp.where(cols == r, jnp.sum(hs_s[i + 1] * dy_r, axis=1, keepdims=True), dc)
            a = jnp.exp(dt_r * t.A)
            g = dh * a * hs_s[i]
            dA = dA + dt_r * g
            ga_s[r:r + 1, :] = jnp.sum(g * t.A, axis=0, keepdims=True)
            sb_s[r:r + 1, :] = jnp.sum(dh * b_col, axis=0, keepdims=True)
            db = jnp.where(cols == r, jnp.sum(dh * _row(dtu_s, r), axis=1, keepdims=True), db)
            dh = a * dh
        dh_s[j] = dh

        sb = sb_s[...]  # sum_n dh * B: d/d(dt * u)
        ddt = ga_s[...] + sb * t.u
        dpre = jnp.where(t.mask, ddt * sigmoid(t.pre) if cfg.delta_softplus else ddt, 0.0)
        du_ref[...] = (sb * t.dt + t.D * dy).astype(du_ref.dtype)
        ddelta_ref[...] = dpre.astype(ddelta_ref.dtype)
        db_ref[...] = db
        dc_ref[...] = dc
        da_ref[...] += dA
        dd_ref[...] += jnp.sum(dy * t.u, axis=0, keepdims=True)
        dbias_ref[...] += jnp.sum(dpre, axis=0, keepdims=True)


def _vmem(shape: tuple[int, ...]) -> pltpu.VMEM:
    return pltpu.VMEM(shape, _F32)


def _compiler_params(n_parallel: int, n_arbitrary: int) -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_parallel + ("arbitrary",) * n_arbitrary)


# Of two directions, the first keeps its float32 output, (n_chunks * chunk, block_d), in VMEM until the second
# adds to it. Within this budget (room is left in the smallest default scoped VMEM, 16 MiB) block_d narrows to
# fit; past it (very long sequences) that output makes a round trip through HBM between two launches instead.
_RESIDENT_BYTES = 8 << 20


def _forward(dirs: tuple[ScanDirection, ...], z: jax.Array | None, cfg: KernelConfig, save: bool):
    u, d_state = dirs[0].u, dirs[0].A.shape[1]
    geo = _Geometry(u, d_state, cfg.blocks)
    row_bytes = 4 * geo.n_chunks * geo.chunk
    if len(dirs) == 1 or row_bytes * geo.block_d <= _RESIDENT_BYTES:
        return _forward_call(dirs, z, cfg, geo, save)
    width = _RESIDENT_BYTES // row_bytes // _LANES * _LANES
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
    extra = ([z] if has_z else []) + ([carry] if carry is not None else [])
    states = jax.ShapeDtypeStruct((geo.batch, geo.n_chunks, geo.n_pad, geo.d_inner), _F32)
    out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype if finish else _F32)]
    out_shape += [jax.ShapeDtypeStruct(u.shape, _F32)] if has_ypre else []
    out_shape += [states] * n_dirs if save else []
    out_specs = [specs[-1].act()] * (2 if has_ypre else 1) + ([sp.state() for sp in specs] if save else [])
    tile = (geo.chunk, geo.block_d)
    scratch = [_vmem((geo.n_pad, geo.block_d)), _vmem(tile), _vmem(tile), _vmem(tile)]
    if n_dirs > 1:
        scratch.append(_vmem((geo.n_chunks, *tile)))
    outs = pl.pallas_call(
        functools.partial(_forward_kernel, geo=geo, cfg=cfg, has_z=has_z, has_carry=carry is not None,
                          has_ypre=has_ypre, save=save),
        grid=(geo.batch, geo.n_dblocks, n_dirs, geo.n_chunks),
        in_specs=[s for sp in specs for s in sp.inputs()] + [specs[-1].act()] * len(extra),
        out_specs=out_specs, out_shape=out_shape, scratch_shapes=scratch,
        compiler_params=_compiler_params(2, 2), interpret=cfg.interpret, name="selective_scan_fwd",
    )(*[x for d in dirs for x in geo.kernel_inputs(d)], *extra)
    out, outs = outs[0], list(outs[1:])
    ypre = outs.pop(0) if has_ypre else None
    return out, ypre, (tuple(outs) if save else None)


def _backward(dirs, z, ypre, states, dout, cfg: KernelConfig):
    u = dirs[0].u
    geo = _Geometry(u, dirs[0].A.shape[1], cfg.blocks)
    has_z = z is not None
    specs = [_Specs(geo, lambda b, d, s: (b, d, geo.n_chunks - 1 - s), r) for r in cfg.reverses]
    in_specs, args = [], []
    for sp, direction, state in zip(specs, dirs, states, strict=True):
        in_specs += sp.inputs() + [sp.state(), sp.act()] + ([sp.act()] if has_z else [])
        args += geo.kernel_inputs(direction) + [state, dout] + ([z] if has_z else [])
    out_shape, out_specs = [], []
    if has_z:
        in_specs.append(specs[0].act())
        args.append(ypre)
        out_shape.append(jax.ShapeDtypeStruct(u.shape, z.dtype))
        out_specs.append(specs[0].act())
    cols = jax.ShapeDtypeStruct((geo.batch, geo.n_dblocks, geo.n_chunks, geo.n_pad, geo.chunk), _F32)
    per_batch = lambda rows: jax.ShapeDtypeStruct((geo.batch, rows, geo.d_inner), _F32)
    for sp, direction in zip(specs, dirs, strict=True):
        out_shape += [jax.ShapeDtypeStruct(u.shape, direction.u.dtype),
                      jax.ShapeDtypeStruct(u.shape, direction.delta.dtype),
                      per_batch(geo.n_pad), cols, cols, per_batch(1), per_batch(1)]
        out_specs += [sp.act(), sp.act(), sp.per_batch(geo.n_pad), sp.per_dblock_cols(), sp.per_dblock_cols(),
                      sp.per_batch(1), sp.per_batch(1)]
    tile = (geo.chunk, geo.block_d)
    scratch = [_vmem(tile) for _ in range(5)] + [_vmem((geo.chunk + 1, geo.n_pad, geo.block_d)),
                                                 _vmem((len(dirs), geo.n_pad, geo.block_d))]
    outs = pl.pallas_call(
        functools.partial(_backward_kernel, geo=geo, cfg=cfg, has_z=has_z),
        grid=(geo.batch, geo.n_dblocks, geo.n_chunks),
        in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, scratch_shapes=scratch,
        compiler_params=_compiler_params(2, 1), interpret=cfg.interpret, name="selective_scan_bwd",
    )(*args)
    dz = outs[0] if has_z else None
    raw = outs[1:] if has_z else outs
    grads = []
    for k in range(len(dirs)):
        du, ddelta, da, db, dc, dd, dbias = raw[k * _N_INPUTS:(k + 1) * _N_INPUTS]
        grads.append(DirectionGrads(du, ddelta, da.sum(0).T[:, :geo.d_state], geo.from_chunks(db.sum(1)),
                                    geo.from_chunks(dc.sum(1)), dd.sum((0, 1)), dbias.sum((0, 1))))
    return tuple(grads), dz


_scan = make_scan(_forward, _backward, lambda batch, channels: P(batch, None, None, channels))


def selective_scan_pallas_tpu(
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
    *,
    blocks: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Selective scan (semantics of ``reference.selective_scan_reference``) as a Mosaic TPU Pallas kernel."""
    cfg = KernelConfig((reverse,), delta_softplus, blocks or default_blocks(A.shape[1]), interpret)
    return _scan((with_defaults(ScanDirection(u, delta, A, B, C, D, delta_bias)),), z, cfg)


def selective_scan_bidirectional_pallas_tpu(
    fwd: ScanDirection,
    bwd: ScanDirection,
    z: jax.Array | None = None,
    delta_softplus: bool = False,
    *,
    blocks: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """(scan(fwd) + scan(bwd, reverse=True)) * silu(z) in one launch; ``bwd`` is read back to front in place."""
    cfg = KernelConfig((False, True), delta_softplus, blocks or default_blocks(fwd.A.shape[1]), interpret)
    return _scan((with_defaults(fwd), with_defaults(bwd)), z, cfg)

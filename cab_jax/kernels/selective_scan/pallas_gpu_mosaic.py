"""Mamba-1 selective scan as Pallas kernels lowered through Mosaic GPU (Hopper and newer), forward and backward,
and ``scan``, their ``custom_vjp`` that ``api.py`` calls (the contract of ``pallas_common``).

One program (one warpgroup, 128 threads) owns one batch element and 128 channels of d_inner, one channel per thread;
the channel's d_state states are d_state float32 registers of that thread (d_state ``(128,)`` vectors of the
kernel). It walks the length once per direction in tiles of ``chunk * num_stages`` positions: TMA copies bring a
tile's inputs (u, delta, B, C, z...) into shared memory while the tile before it is computed, and copy its outputs
back out while the tile after it is computed (two slots of each tile). The first direction writes its float32 output
sum to ``ypre``, the second (Vim's backward direction, reading the positions from the last to the first in place)
copies it in and adds to it, and the last one applies the D skips' sum and the silu(z) gate and writes ``out``.
delta_bias + softplus are fused. For training the forward pass also stores the state at every chunk start; the
backward pass walks the same tiles from the end, each tile's chunks from its last: it recomputes a chunk's states
from its saved start in registers (a chunk's positions are unrolled), then walks the chunk backwards carrying dh.
Otherwise positions are loops, not unrolled (Mosaic GPU's compile time grows with unrolled code). A length that is
not a multiple of the tile ends with a shorter tile (its size is static: no masks). d_inner is padded to a multiple
of 128 (padded channels have u = 0, so their states stay 0 and add nothing to dB and dC).

Gradients that sum over channels (dB, dC) are staged per channel in shared memory for a chunk, summed once per
chunk (``_Products``) and written per channel block; those that sum over batch and length (dA, dD, d delta_bias)
are written per batch element: no atomics, so the result is deterministic. ``block_d`` must be 128 and
``save_every`` 1.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from cab_jax.kernels.selective_scan.pallas_common import (
    BlockSizes,
    DirectionGrads,
    KernelConfig,
    ScanDirection,
    make_scan,
    num_chunks,
    sigmoid,
    softplus_from_exp_and_log,
)

_F32 = jnp.float32
LANES = 128  # channels per program: one warpgroup, one channel per thread
_SUM_ROWS = 64  # rows of products summed at once: the rows of one WGMMA-layout tile
# Chunks of 2 in tiles of 4: the backward (about 72 KiB of shared memory at d_state 16 and 200 registers per thread)
# runs two programs per SM; longer chunks hold more of everything (BENCHMARKS.md compares them).
DEFAULT_BLOCKS = BlockSizes(chunk=2, block_d=LANES, num_warps=4, num_stages=2, save_every=1)
# Shared memory one program may have on Hopper (227 KiB per SM on the H100 and H200); Mosaic GPU aligns each array
# to 1 KiB and adds its barriers and a little of its own (2,064 bytes beside the arrays of one backward measured on the
# H200): ``_SMEM_RESERVE`` keeps room for those.
MAX_SMEM_BYTES = 227 * 1024
_SMEM_ALIGN, _SMEM_RESERVE = 1024, 3 * 1024


def default_blocks(d_state: int) -> BlockSizes:
    del d_state  # the state lives in registers of the channel's thread whatever its size
    return DEFAULT_BLOCKS


def load_ref(ref, **kwargs) -> jax.Array:
    """``plgpu.load`` of all of ``ref`` (index it with ``.at`` first): jax 0.10 requires an index argument, 0.11
    deprecates it and later releases take none."""
    return plgpu.load(ref, (), **kwargs) if _requires_index(plgpu.load) else plgpu.load(ref, **kwargs)


@functools.cache
def _requires_index(load: Callable) -> bool:
    index = inspect.signature(load).parameters.get("idx")
    return index is not None and index.default is inspect.Parameter.empty


def interpret_params():
    """Mosaic GPU's interpret mode (CPU tests). jax 0.10-0.11 keep its parameters outside ``plgpu``."""
    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params()


@dataclasses.dataclass(frozen=True)
class _Launch:
    """Static sizes and flags of one launch."""

    reverses: tuple[bool, ...]
    delta_softplus: bool
    has_z: bool
    length: int
    d_state: int
    chunk: int
    tile: int  # positions per tile staged in shared memory (a multiple of chunk)
    interpret: bool  # Mosaic GPU's interpret mode, which runs no layout casts (they are only hints) nor plgpu.load

    @property
    def n_chunks(self) -> int:
        return num_chunks(self.length, self.chunk)


class _Direction:
    """One direction's refs and its per-program parameters (A, D and delta_bias of its channels) as registers."""

    def __init__(self, refs: ScanDirection, reverse: bool, launch: _Launch):
        self.refs, self.reverse, self.launch = refs, reverse, launch
        self.b = jax.lax.axis_index("batch")
        self.block = jax.lax.axis_index("channels")
        self.cols = pl.ds(self.block * LANES, LANES)
        self.A = [refs.A[n, self.cols] for n in range(launch.d_state)]  # A as (d_state, width)
        self.D = refs.D[self.cols]
        self.bias = refs.delta_bias[self.cols]

    def inputs(self, ins, slot, r):
        """Tile row ``r`` of ``slot``: (u, delta + bias, dt, B scalars), float32."""
        u = ins["u"][slot, r].astype(_F32)
        pre = ins["delta"][slot, r].astype(_F32) + self.bias
        dt = softplus_from_exp_and_log(pre) if self.launch.delta_softplus else pre
        return u, pre, dt, [ins["B"][slot, r, n] for n in range(self.launch.d_state)]

    def zeros(self) -> jax.Array:
        """A zero register vector in the loops' layout (a loop carry must enter in the layout it leaves in)."""
        return self.D * 0.0

    def update(self, h, dt, u, b_scalars):
        """(decays, next state) of one position from state ``h``."""
        decays = [jnp.exp(dt * a) for a in self.A]
        du = dt * u
        return decays, [decay * h_n + du * b_n for decay, h_n, b_n in zip(decays, h, b_scalars, strict=True)]


class _Tiles:
    """A direction's scan steps in tiles of ``launch.tile`` positions staged in shared memory: ``n_full`` full
    tiles, then one of ``tail`` positions. Each input is copied in per tile and each output copied out per tile,
    double-buffered: tile q + 1's copies in flight while tile q is computed."""

    def __init__(self, launch: _Launch, d: _Direction):
        self.launch, self.d = launch, d
        self.n_full, self.tail = divmod(launch.length, launch.tile)

    def rows(self, j, size: int) -> pl.Slice:
        """The sequence positions of tile ``j`` (``size`` scan steps from ``j * tile``)."""
        start = j * self.launch.tile
        return pl.ds(self.launch.length - start - size if self.d.reverse else start, size)

    def row(self, i, size: int):
        """The row, in its tile of ``size``, of the tile's ``i``-th scan step."""
        return size - 1 - i if self.d.reverse else i

    def gmem(self, ref, j, size: int, wide: bool = True):
        """Tile ``j`` of ``ref``: (size, 128) of this program's channels when ``wide``, else (size, all)."""
        rows = self.rows(j, size)
        return ref.at[self.d.b, rows, self.d.cols] if wide else ref.at[self.d.b, rows]

    def fetch(self, reads, bars, j, size: int, slot) -> None:
        """Copies tile ``j`` of each ``(gmem_ref, smem_tiles, wide)`` of ``reads`` into ``slot``."""
        for ref, buf, wide in reads:
            plgpu.copy_gmem_to_smem(self.gmem(ref, j, size, wide), buf.at[slot, pl.ds(0, size)], bars.at[slot])

    def store(self, writes, j, size: int, slot, extra=()) -> None:
        """After a tile's stores: copies the first ``size`` rows of ``slot`` of each ``(gmem_ref, smem_tiles)`` of
        ``writes`` out to tile ``j`` of its ref, and each ``(gmem_view, smem_view)`` of ``extra``."""
        plgpu.commit_smem()  # the stores are visible to the copies, and every thread is past the tile's reads
        for ref, buf in writes:
            plgpu.copy_smem_to_gmem(buf.at[slot, pl.ds(0, size)], self.gmem(ref, j, size))
        for view, buf in extra:
            plgpu.copy_smem_to_gmem(buf, view)
        plgpu.commit_smem_to_gmem_group()

    def walk(self, reads, bars, compute, carry, backwards: bool):
        """``compute(j, size, slot, carry) -> carry`` over the tiles in scan order (``backwards``: from the last),
        each after its copies in arrived and the copies out of its slot's previous tile read their tiles."""
        n, tail, size = self.n_full, self.tail, self.launch.tile
        full = lambda q: n - 1 - q if backwards else q  # the q-th full tile computed
        tail_first = bool(backwards and tail)

        def run(j, size, slot, carry):
            plgpu.barrier_wait(bars.at[slot])
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            return compute(j, size, slot, carry)

        if tail_first or not n:
            self.fetch(reads, bars, n, tail, 0)
        else:
            self.fetch(reads, bars, full(0), size, 0)
        if tail_first:
            if n:
                self.fetch(reads, bars, full(0), size, 1)
            carry = run(n, tail, 0, carry)

        def step(q, carry):
            slot = (q + tail_first) % 2

            @pl.when(q + 1 < n)
            def _():
                self.fetch(reads, bars, full(q + 1), size, 1 - slot)

            if tail and not backwards:
                @pl.when(q + 1 == n)
                def _():
                    self.fetch(reads, bars, n, tail, 1 - slot)

            return run(full(q), size, slot, carry)

        carry = jax.lax.fori_loop(0, n, step, carry)
        if tail and not backwards:
            carry = run(n, tail, n % 2, carry)
        plgpu.wait_smem_to_gmem(0)  # every copy out has landed (a later direction may copy it in)
        return carry


_NARROW = ("B", "C")  # tiles of B/C width; the others are (tile, 128) of this program's channels


def _tile_types(launch: _Launch, dtypes: dict) -> dict:
    """Two slots of a shared-memory tile per name of ``dtypes``: (tile, B/C width) float32 for ``_NARROW`` names,
    else (tile, 128) of its dtype."""
    bc = _bc_width(launch.d_state)
    return {name: plgpu.SMEM((2, launch.tile, bc) if name in _NARROW else (2, launch.tile, LANES),
                             _F32 if name in _NARROW else dtype) for name, dtype in dtypes.items()}


def _forward_reads(launch: _Launch, k: int) -> tuple[str, ...]:
    """The tiles direction ``k`` of the forward kernel copies in."""
    last = k == len(launch.reverses) - 1
    return ("u", "delta", "B", "C") + (("ypre",) if k else ()) + (("z",) if last and launch.has_z else ())


def _backward_reads(launch: _Launch) -> tuple[str, ...]:
    """The tiles each direction of the backward kernel copies in."""
    return ("u", "delta", "B", "C", "dout") + (("z", "ypre") if launch.has_z else ())


def _barriers(reads: list[tuple[str, ...]]) -> list:
    """Per direction, two barriers (one per slot) that its copies in arrive at."""
    return [plgpu.Barrier(num_arrivals=len(names), num_barriers=2) for names in reads]


def _reads(names: tuple[str, ...], sources: dict, ins: dict) -> list:
    """``(gmem_ref, smem_tiles, wide)`` per name, as ``_Tiles.fetch`` takes them."""
    return [(sources[name], ins[name], name not in _NARROW) for name in names]


def _forward_scratch(launch: _Launch, dirs: tuple[ScanDirection, ...], z: jax.Array | None, out_dtype):
    """The forward kernel's tiles: inputs (``ins``), outputs (``outs``), and per direction the barriers of its
    copies in."""
    dtypes = {"u": dirs[0].u.dtype, "delta": dirs[0].delta.dtype, "B": _F32, "C": _F32, "ypre": _F32}
    if z is not None:
        dtypes["z"] = z.dtype
    reads = [_forward_reads(launch, k) for k in range(len(dirs))]
    ins = _tile_types(launch, {name: dtypes[name] for name in dict.fromkeys(sum(reads, ()))})
    outs = _tile_types(launch, {"ypre": _F32, "out": out_dtype})
    return ins, outs, _barriers(reads)


def _forward_kernel(launch: _Launch, save: bool, scratch, *refs):
    """refs: per direction its 7 inputs (``_kernel_inputs``), then z (if any); outputs out, ypre, then per
    direction its chunk-start states (batch, n_chunks, d_state, width) when ``save``. ``scratch``:
    ``_forward_scratch``'s types, allocated here."""
    n_dirs = len(launch.reverses)
    n_in = 7 * n_dirs + launch.has_z
    inputs, (out_ref, ypre_ref, *state_refs) = refs[:n_in], refs[n_in:]
    z_ref = inputs[-1] if launch.has_z else None

    def body(ins, outs, barriers):
        for k, reverse in enumerate(launch.reverses):
            d = _Direction(ScanDirection(*inputs[7 * k:7 * k + 7]), reverse, launch)
            first, last = k == 0, k == n_dirs - 1
            sources = {"u": d.refs.u, "delta": d.refs.delta, "B": d.refs.B, "C": d.refs.C, "ypre": ypre_ref,
                       "z": z_ref}
            reads = _reads(_forward_reads(launch, k), sources, ins)
            writes = [(ypre_ref, outs["ypre"])] + ([(out_ref, outs["out"])] if last else [])
            tiles = _Tiles(launch, d)
            compute = functools.partial(_forward_tile, tiles, ins, outs, writes, first=first, last=last,
                                        z=last and z_ref is not None, out_dtype=out_ref.dtype,
                                        state_ref=state_refs[k] if save else None)
            tiles.walk(reads, barriers[k], compute, (d.zeros(),) * launch.d_state, backwards=False)

    pl.run_scoped(body, *scratch)


def _forward_tile(tiles: _Tiles, ins, outs, writes, j, size: int, slot, h, *, first: bool, last: bool, z: bool,
                  out_dtype, state_ref):
    """Tile ``j`` of ``size`` scan steps (its inputs in ``slot``) from state ``h``: saves the chunk-start states,
    stores ypre (and out, in the last direction) and copies them out; returns the state after it."""
    d, launch = tiles.d, tiles.launch

    def step(i, h):
        if state_ref is not None:
            @pl.when(i % launch.chunk == 0)
            def _():
                for n, h_n in enumerate(h):
                    state_ref[d.b, (j * launch.tile + i) // launch.chunk, n, d.cols] = h_n

        r = tiles.row(i, size)
        u, _, dt, b_s = d.inputs(ins, slot, r)
        _, h = d.update(h, dt, u, b_s)
        y = d.D * u
        for n, h_n in enumerate(h):
            y = y + ins["C"][slot, r, n] * h_n
        if not first:
            y = y + ins["ypre"][slot, r]
        outs["ypre"][slot, r] = y
        if last:
            if z:
                zt = ins["z"][slot, r].astype(_F32)
                y = y * zt * sigmoid(zt)
            outs["out"][slot, r] = y.astype(out_dtype)
        return tuple(h)

    h = jax.lax.fori_loop(0, size, step, h)
    tiles.store(writes, j, size, slot)
    return h


def _backward_scratch(launch: _Launch, dirs: tuple[ScanDirection, ...], z: jax.Array | None, dout_dtype):
    """The backward kernel's tiles: inputs (``ins``), outputs (``outs``; dB and dC side by side per tile row,
    flat, with ``_Products.rows`` of room on either side), a chunk's dB and dC products (``_Products``), and per
    direction the barriers of its copies in."""
    dtypes = {"u": dirs[0].u.dtype, "delta": dirs[0].delta.dtype, "B": _F32, "C": _F32, "dout": dout_dtype,
              "z": None if z is None else z.dtype, "ypre": _F32}
    ins = _tile_types(launch, {name: dtypes[name] for name in _backward_reads(launch)})
    # du, d delta and dz in their inputs' dtypes: each position's is written once, rounded as a cast after would.
    outs = _tile_types(launch, {"du": dtypes["u"], "ddelta": dtypes["delta"],
                                **({"dz": dtypes["z"]} if z is not None else {})})
    products = _Products(launch)
    outs["dBC"] = plgpu.SMEM((2, launch.tile * products.width + 2 * products.rows), _F32)
    terms = plgpu.SMEM((products.rows, LANES), _F32)
    return ins, outs, terms, _barriers([_backward_reads(launch)] * len(dirs))


class _BlockGrads(NamedTuple):
    """One direction's outputs of the backward kernel: du, d delta (batch, length, width), dA (batch, d_state,
    width), dB and dC side by side (batch, channel blocks, length * ``_Products.width``), dD, d delta_bias
    (batch, width)."""

    du: jax.Array
    ddelta: jax.Array
    dA: jax.Array
    dBC: jax.Array
    dD: jax.Array
    ddelta_bias: jax.Array


@dataclasses.dataclass(frozen=True)
class _Products:
    """A chunk's dB and dC terms of each channel before their sum over the program's 128 channels, in an SMEM
    array (``rows``, 128): the flat dB/dC tile has ``width`` entries per position (dB's d_state, then dC's, then
    padding), and row i of the array holds, per channel, the term of flat tile entry ``base + i``. After the chunk
    the rows are read in the WGMMA register layout, where a row's 128 values sit in 4 threads (two shuffles to sum
    them), and the sums land in the flat tile from entry ``base`` on. ``rows`` is a multiple of 64 (one WGMMA tile
    per pass); rows past the chunk's entries hold stale values, and they land on entries that a later chunk of the
    walk overwrites (or on the tile's room at either end): below the chunk when the direction runs forward (its
    backward walk goes down the positions), above it when it runs in reverse."""

    launch: _Launch

    @property
    def width(self) -> int:
        return _bc_width(2 * self.launch.d_state)

    @property
    def rows(self) -> int:
        return -(-self.launch.chunk * self.width // _SUM_ROWS) * _SUM_ROWS

    def base(self, low, steps, reverse: bool):
        """The flat tile entry of product row 0 for a chunk of tile rows [low, low + steps): the chunk's first
        entry (reverse), or ``rows`` entries before its end (forward)."""
        return low * self.width if reverse else (low + steps) * self.width - self.rows


def _backward_kernel(launch: _Launch, scratch, *refs):
    """refs: per direction its 7 inputs, then z, ypre (if z), dout, per direction its saved states; outputs dz (if
    z), then per direction its ``_BlockGrads``. ``scratch``: ``_backward_scratch``'s types."""
    n_dirs = len(launch.reverses)
    n_in = 7 * n_dirs + 2 * launch.has_z + 1 + n_dirs
    inputs, outputs = refs[:n_in], refs[n_in:]
    rest = inputs[7 * n_dirs:]
    z_ref, ypre_ref = (rest[0], rest[1]) if launch.has_z else (None, None)
    dout_ref, state_refs = rest[2 * launch.has_z], rest[2 * launch.has_z + 1:]
    dz_ref = outputs[0] if launch.has_z else None
    n_out = len(_BlockGrads._fields)
    grads = [_BlockGrads(*outputs[launch.has_z + n_out * k:launch.has_z + n_out * (k + 1)]) for k in range(n_dirs)]

    def body(ins, outs, terms, barriers):
        for k, reverse in enumerate(launch.reverses):
            d, g = _Direction(ScanDirection(*inputs[7 * k:7 * k + 7]), reverse, launch), grads[k]
            sources = {"u": d.refs.u, "delta": d.refs.delta, "B": d.refs.B, "C": d.refs.C, "dout": dout_ref,
                       "z": z_ref, "ypre": ypre_ref}
            reads = _reads(_backward_reads(launch), sources, ins)
            writes = [(g.du, outs["du"]), (g.ddelta, outs["ddelta"])]
            writes += [(dz_ref, outs["dz"])] if z_ref is not None and k == 0 else []
            tiles = _Tiles(launch, d)
            compute = functools.partial(_backward_tile, tiles, ins, outs, terms, writes, g,
                                        state_ref=state_refs[k], dz=z_ref is not None and k == 0,
                                        z=z_ref is not None)
            zero, n = d.zeros(), launch.d_state
            _, dA, dD, dbias = tiles.walk(reads, barriers[k], compute, ((zero,) * n, (zero,) * n, zero, zero),
                                          backwards=True)
            for i, dA_n in enumerate(dA):
                g.dA[d.b, i, d.cols] = dA_n
            g.dD[d.b, d.cols] = dD
            g.ddelta_bias[d.b, d.cols] = dbias

    pl.run_scoped(body, *scratch)


def _backward_tile(tiles: _Tiles, ins, outs, terms, writes, g: _BlockGrads, j, size: int, slot, carry, *,
                   state_ref, dz: bool, z: bool):
    """Tile ``j`` of ``size`` scan steps, backwards, chunk by chunk from its last (which may be short: it is walked
    first, by its own code): (dh, dA, dD, d delta_bias) after it -> before it; its rows of du, d delta, dB and dC
    (and dz) copied out."""
    chunk = tiles.launch.chunk
    full, short = divmod(size, chunk)
    first = j * (tiles.launch.tile // chunk)  # the tile's first saved state
    run = functools.partial(_backward_chunk, tiles, ins, outs, terms, size, slot, state_ref=state_ref, dz=dz, z=z)
    if short:
        carry = run(full, short, carry, start=first + full)
    carry = jax.lax.fori_loop(0, full, lambda q, carry: run(full - 1 - q, chunk, carry, start=first + full - 1 - q),
                              carry)
    products = _Products(tiles.launch)
    rows = tiles.rows(j, size)  # dB and dC (summed over this program's channels) by channel block
    dbc = (g.dBC.at[tiles.d.b, tiles.d.block, pl.ds(rows.start * products.width, size * products.width)],
           outs["dBC"].at[slot, pl.ds(products.rows, size * products.width)])
    tiles.store(writes, j, size, slot, extra=[dbc])
    return carry


def _backward_chunk(tiles: _Tiles, ins, outs, terms, size: int, slot, c, steps: int, carry, *, state_ref, dz: bool,
                    z: bool, start):
    """Chunk ``c`` (traced; ``steps`` scan steps, static; saved state ``start``) of a tile of ``size``, backwards:
    recomputes its states from its saved start in registers (the chunk is unrolled), walks it from its end, then
    sums its dB and dC ``_Products``."""
    d, launch = tiles.d, tiles.launch
    products = _Products(launch)
    n_state = range(launch.d_state)
    first_step_row = tiles.row(c * launch.chunk, size)
    low = first_step_row - steps + 1 if d.reverse else first_step_row
    base = products.base(low, steps, d.reverse)

    def position(i):
        r = tiles.row(c * launch.chunk + i, size)
        return (r, *d.inputs(ins, slot, r))

    states = [[state_ref[d.b, start, n, d.cols] for n in n_state]]  # states[i]: before the chunk's step i
    for i in range(steps):
        _, u, _, dt, b_s = position(i)
        states.append(d.update(states[-1], dt, u, b_s)[1])

    dh, dA, dD, dbias = list(carry[0]), list(carry[1]), carry[2], carry[3]
    for i in reversed(range(steps)):
        r, u, pre, dt, b_s = position(i)
        dy = ins["dout"][slot, r].astype(_F32)
        if z:
            zt = ins["z"][slot, r].astype(_F32)
            sig = sigmoid(zt)
            if dz:
                dz_r = dy * ins["ypre"][slot, r] * sig * (1.0 + zt * (1.0 - sig))
                outs["dz"][slot, r] = dz_r.astype(outs["dz"].dtype)
            dy = dy * zt * sig
        dh = [dh_n + ins["C"][slot, r, n] * dy for n, dh_n in enumerate(dh)]
        dtu = dt * u
        row = r * products.width - base
        b_dh = ddt_a = d.zeros()
        for n in n_state:
            decay = jnp.exp(dt * d.A[n])
            terms[row + n, pl.ds(0, LANES)] = dh[n] * dtu
            terms[row + launch.d_state + n, pl.ds(0, LANES)] = states[i + 1][n] * dy
            b_dh = b_dh + dh[n] * b_s[n]
            dh_a_h = dh[n] * decay * states[i][n]  # dh of the previous position (before its output) x h
            ddt_a = ddt_a + dh_a_h * d.A[n]
            dA[n] = dA[n] + dh_a_h * dt
            dh[n] = dh[n] * decay
        outs["du"][slot, r] = (b_dh * dt + d.D * dy).astype(outs["du"].dtype)
        dpre = ddt_a + u * b_dh
        if launch.delta_softplus:
            dpre = dpre * sigmoid(pre)
        outs["ddelta"][slot, r] = dpre.astype(outs["ddelta"].dtype)
        dD, dbias = dD + dy * u, dbias + dpre

    plgpu.commit_smem()  # a barrier: the products are written before they are summed
    for m in range(products.rows // _SUM_ROWS):
        products_rows = terms.at[pl.ds(m * _SUM_ROWS, _SUM_ROWS)]
        if launch.interpret:
            products_tile = products_rows[...]
        else:  # rows spread over threads as in a WGMMA tile: a row sums in 4 threads (8-way bank conflicts)
            products_tile = load_ref(products_rows, layout=plgpu.Layout.WGMMA, optimized=False)
        total = jnp.sum(products_tile, axis=1)
        outs["dBC"][slot, pl.ds(products.rows + base + m * _SUM_ROWS, _SUM_ROWS)] = total
    plgpu.commit_smem()  # and summed before the next chunk writes them again
    return tuple(dh), tuple(dA), dD, dbias


def _launch(dirs: tuple[ScanDirection, ...], z: jax.Array | None, cfg: KernelConfig) -> _Launch:
    """The launch of ``cfg``'s block sizes; refuses sizes the kernels cannot run, in interpret mode too."""
    blocks = cfg.blocks
    if blocks.block_d != LANES or blocks.save_every != 1:
        raise ValueError(f"the Mosaic GPU scan runs {LANES} channels per program and saves every chunk start: "
                         f"block_d must be {LANES} and save_every 1, got {blocks}")
    launch = _Launch(tuple(cfg.reverses), cfg.delta_softplus, z is not None, dirs[0].u.shape[1],
                     dirs[0].A.shape[1], blocks.chunk, blocks.chunk * blocks.num_stages, cfg.interpret)
    need = _smem_bytes(_backward_scratch(launch, dirs, z, dirs[0].u.dtype)) + _SMEM_RESERVE
    if need > MAX_SMEM_BYTES:
        raise ValueError(f"the Mosaic GPU backward needs {need / 1024:.0f} KiB of shared memory at chunk "
                         f"{blocks.chunk}, {blocks.num_stages} stages and d_state {launch.d_state}, more than the "
                         f"{MAX_SMEM_BYTES // 1024} KiB a program has: lower num_stages or chunk")
    return launch


def _smem_bytes(scratch) -> int:
    """Bytes of the shared-memory arrays in a kernel's scratch types, each aligned as Mosaic GPU places it."""
    refs = jax.tree.leaves(scratch, is_leaf=lambda x: hasattr(x, "memory_space"))
    sizes = (math.prod(r.shape) * jnp.dtype(r.dtype).itemsize for r in refs if hasattr(r, "memory_space"))
    return sum(-(-size // _SMEM_ALIGN) * _SMEM_ALIGN for size in sizes)


def _bc_width(d_state: int) -> int:
    """The kernels' B and C rows: float32, d_state padded to a multiple of 32, so that a copy of any number of
    rows moves a multiple of 128 bytes (what Mosaic GPU's copies need)."""
    return d_state + -d_state % 32


def _padded(x: jax.Array, width: int) -> jax.Array:
    """``x`` with its last (channel) axis zero-padded to ``width``."""
    pad = width - x.shape[-1]
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x


def _kernel_inputs(dirs: tuple[ScanDirection, ...], width: int) -> list[jax.Array]:
    """Per direction its 7 inputs as the kernels read them: channels padded to ``width``, A as (d_state, width),
    B and C as ``_bc_width`` says."""
    args = []
    for d in dirs:
        bc = _bc_width(d.A.shape[1])
        args += [_padded(d.u, width), _padded(d.delta, width), _padded(d.A.astype(_F32).T, width),
                 _padded(d.B.astype(_F32), bc), _padded(d.C.astype(_F32), bc), _padded(d.D.astype(_F32), width),
                 _padded(d.delta_bias.astype(_F32), width)]
    return args


# Both kernels run without Pallas's automatic barriers around every load and store, under the two conditions
# Mosaic GPU's documentation gives for that. Inputs are read from tiles the copies in write, outputs are written to
# tiles the copies out read, GMEM outputs are only written, and after commit_smem no thread reads a tile that a copy
# then overwrites. The one region threads both write and read is the backward's dB/dC terms of a chunk (written per
# channel, read across threads): a barrier (commit_smem) between its writes and its reads, and one before the next
# chunk writes it again; the others are in the waits for copies. exp and log run as the GPU's approximate ex2 and
# lg2 instructions (``approx_math``): BENCHMARKS.md gives the errors and times with and without.
FORWARD_PARAMS = plgpu.CompilerParams(unsafe_no_auto_barriers=True, approx_math=True)
BACKWARD_PARAMS = plgpu.CompilerParams(unsafe_no_auto_barriers=True, approx_math=True)


def _call(body, out_type, batch: int, width: int, cfg: KernelConfig, params: plgpu.CompilerParams | None):
    return plgpu.kernel(body, out_type=out_type, grid=(batch, width // LANES), grid_names=("batch", "channels"),
                        compiler_params=None if cfg.interpret else params,
                        interpret=interpret_params() if cfg.interpret else None)


def _forward(dirs: tuple[ScanDirection, ...], z: jax.Array | None, cfg: KernelConfig, save: bool):
    """``(out, ypre, states)`` as ``pallas_common`` describes; ypre and states keep the padded channels (they go
    to ``_backward`` only)."""
    launch = _launch(dirs, z, cfg)
    batch, length, d_inner = dirs[0].u.shape
    width = d_inner + -d_inner % LANES
    seq = lambda dtype: jax.ShapeDtypeStruct((batch, length, width), dtype)
    states = jax.ShapeDtypeStruct((batch, launch.n_chunks, launch.d_state, width), _F32)
    out_type = (seq(dirs[0].u.dtype), seq(_F32), *((states,) * len(dirs) if save else ()))
    args = _kernel_inputs(dirs, width) + ([] if z is None else [_padded(z, width)])
    body = functools.partial(_forward_kernel, launch, save, _forward_scratch(launch, dirs, z, dirs[0].u.dtype))
    out, ypre, *saved = _call(body, out_type, batch, width, cfg, FORWARD_PARAMS)(*args)
    return out[..., :d_inner], (ypre if save else None), (tuple(saved) if save else None)


def _backward(dirs, z, ypre, states, dout, cfg: KernelConfig):
    launch = _launch(dirs, z, cfg)
    batch, length, d_inner = dirs[0].u.shape
    width = ypre.shape[-1]
    n_state, n_blocks, bc = launch.d_state, width // LANES, _Products(launch).width
    act = functools.partial(jax.ShapeDtypeStruct, (batch, length, width))
    per_batch = jax.ShapeDtypeStruct((batch, width), _F32)
    grad_types = _BlockGrads(act(dirs[0].u.dtype), act(dirs[0].delta.dtype),
                             jax.ShapeDtypeStruct((batch, n_state, width), _F32),
                             jax.ShapeDtypeStruct((batch, n_blocks, length * bc), _F32), per_batch, per_batch)
    out_type = ((act(z.dtype),) if z is not None else ()) + tuple(grad_types) * len(dirs)
    args = _kernel_inputs(dirs, width) + ([] if z is None else [_padded(z, width), ypre]) + [
        _padded(dout, width), *states]
    body = functools.partial(_backward_kernel, launch, _backward_scratch(launch, dirs, z, dout.dtype))
    outs = _call(body, out_type, batch, width, cfg, BACKWARD_PARAMS)(*args)
    dz, raw = (outs[0][..., :d_inner], outs[1:]) if z is not None else (None, outs)
    grads, n_out = [], len(_BlockGrads._fields)
    for k in range(len(dirs)):
        g = _BlockGrads(*raw[n_out * k:n_out * (k + 1)])
        dbc = g.dBC.sum(1).reshape(batch, length, bc)
        grads.append(DirectionGrads(g.du[..., :d_inner], g.ddelta[..., :d_inner], g.dA.sum(0)[:, :d_inner].T,
                                    dbc[..., :n_state], dbc[..., n_state:2 * n_state], g.dD.sum(0)[:d_inner],
                                    g.ddelta_bias.sum(0)[:d_inner]))
    return tuple(grads), dz


# The Mosaic GPU kernels as scan(dirs, z, cfg) -> out, with their custom_vjp (what api.py calls).
scan = make_scan(_forward, _backward, interpreter_has_effects=True)  # its interpreter's IO callbacks

"""Mamba-1 selective scan as Pallas kernels lowered through Mosaic GPU (Hopper and newer), forward and backward,
and ``scan``, their ``custom_vjp`` that ``api.py`` calls (the contract of ``pallas_common``).

One program (one warpgroup, 128 threads) owns one batch element and 128 channels of d_inner, one channel per
thread; the channel's d_state states are d_state float32 registers of that thread (d_state ``(128,)`` vectors
of the kernel). It walks the length in chunks of ``blocks.chunk`` positions (unrolled inside a chunk), once
per direction: the first direction writes its float32 output sum to ``ypre``, the second (Vim's backward
direction, reading the positions from the last to the first in place) adds into it, and the last one applies
the D skips' sum and the silu(z) gate and writes ``out``. delta_bias + softplus are fused. For training the
forward pass also stores the state at every chunk start; the backward pass walks the chunks from the end,
recomputes the states inside a chunk from its saved start, and carries dh backwards. A length that is not a
multiple of the chunk ends with a shorter chunk (its size is static: no masks). d_inner is padded to a
multiple of 128 (padded channels have u = 0, so their states stay 0 and add nothing to dB and dC).

Gradients that sum over channels (dB, dC) are summed over the warpgroup at every position and written per
channel block; those that sum over batch and length (dA, dD, d delta_bias) are written per batch element: no
atomics, so the result is deterministic. Only ``blocks.chunk`` applies here: a program always has 128
channels, and every chunk start is saved.
"""

from __future__ import annotations

import dataclasses
import functools

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
)

_F32 = jnp.float32
LANES = 128  # channels per program: one warpgroup, one channel per thread
DEFAULT_BLOCKS = BlockSizes(chunk=4, block_d=LANES, num_warps=4, num_stages=4, save_every=1)


def default_blocks(d_state: int) -> BlockSizes:
    del d_state  # the state lives in registers of the channel's thread whatever its size
    return DEFAULT_BLOCKS


def interpret_params():
    """Mosaic GPU's interpret mode (CPU tests). jax 0.10-0.11 keep its parameters outside ``plgpu``."""
    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params()


def _softplus(x: jax.Array) -> jax.Array:
    """PyTorch's softplus (identity above 20) from primitives Mosaic GPU lowers (it has no log1p)."""
    return jnp.where(x > 20.0, x, jnp.log(1.0 + jnp.exp(jnp.minimum(x, 20.0))))


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

    @property
    def n_full(self) -> int:
        return self.length // self.chunk  # full chunks, then one of ``length % chunk`` positions

    @property
    def n_chunks(self) -> int:
        return num_chunks(self.length, self.chunk)


class _Direction:
    """One direction's refs and per-program parameters; its positions' inputs as float32 registers."""

    def __init__(self, refs: ScanDirection, reverse: bool, launch: _Launch):
        self.refs, self.reverse, self.launch = refs, reverse, launch
        self.b = jax.lax.axis_index("batch")
        self.block = jax.lax.axis_index("channels")
        self.cols = pl.ds(self.block * LANES, LANES)
        self.A = [refs.A[n, self.cols] for n in range(launch.d_state)]  # A as (d_state, width)
        self.D = refs.D[self.cols]
        self.bias = refs.delta_bias[self.cols]

    def row(self, ref, t) -> jax.Array:
        return ref[self.b, t, self.cols].astype(_F32)

    def zeros(self) -> jax.Array:
        """A zero register vector in the loops' layout (a loop carry must enter in the layout it leaves in)."""
        return self.D * 0.0

    def position(self, s):
        """Scan step ``s`` -> (sequence position, u, delta + bias, dt, B scalars, C scalars)."""
        t = self.launch.length - 1 - s if self.reverse else s
        u = self.row(self.refs.u, t)
        pre = self.row(self.refs.delta, t) + self.bias
        dt = _softplus(pre) if self.launch.delta_softplus else pre
        n = range(self.launch.d_state)
        return (t, u, pre, dt, [self.refs.B[self.b, t, i].astype(_F32) for i in n],
                [self.refs.C[self.b, t, i].astype(_F32) for i in n])

    def update(self, h, dt, u, b_scalars):
        """(decays, next state) of one position from state ``h``."""
        decays = [jnp.exp(dt * a) for a in self.A]
        du = dt * u
        return decays, [decay * h_n + du * b_n for decay, h_n, b_n in zip(decays, h, b_scalars, strict=True)]


def _chunked(launch: _Launch, body, carry, backwards: bool):
    """``body(chunk_index, size, carry) -> carry`` over the chunks (a fori loop over the full ones, then the short
    last one; in the other order when ``backwards``)."""
    tail = launch.length - launch.n_full * launch.chunk
    full = lambda j, c: body(launch.n_full - 1 - j if backwards else j, launch.chunk, c)
    if backwards and tail:
        carry = body(launch.n_full, tail, carry)
    carry = jax.lax.fori_loop(0, launch.n_full, full, carry)
    if not backwards and tail:
        carry = body(launch.n_full, tail, carry)
    return carry


class _Tiles:
    """A direction's scan steps in tiles of ``launch.tile`` positions staged in shared memory: ``n_full`` full
    tiles, then one of ``tail`` positions."""

    def __init__(self, launch: _Launch, reverse: bool):
        self.launch, self.reverse = launch, reverse
        self.n_full, self.tail = divmod(launch.length, launch.tile)

    def rows(self, j, size: int) -> pl.Slice:
        """The sequence positions of tile ``j`` (``size`` scan steps from ``j * tile``)."""
        start = j * self.launch.tile
        return pl.ds(self.launch.length - start - size if self.reverse else start, size)

    def row(self, i: int, size: int) -> int:
        """The row, in its tile of ``size``, of the tile's ``i``-th scan step."""
        return size - 1 - i if self.reverse else i


def _forward_scratch(launch: _Launch, dirs: tuple[ScanDirection, ...], z: jax.Array | None, out_dtype):
    """Two slots of every tile the forward kernel stages: inputs (``ins``), outputs (``outs``), and per direction
    two barriers its input copies arrive at."""
    tile = lambda dtype, width=LANES: plgpu.SMEM((2, launch.tile, width), dtype)
    bc = _bc_width(launch.d_state)
    ins = {"u": tile(dirs[0].u.dtype), "delta": tile(dirs[0].delta.dtype), "B": tile(_F32, bc), "C": tile(_F32, bc)}
    if len(dirs) > 1:
        ins["ypre"] = tile(_F32)
    if z is not None:
        ins["z"] = tile(z.dtype)
    outs = {"ypre": tile(_F32), "out": tile(out_dtype)}
    barriers = [plgpu.Barrier(num_arrivals=4 + (k > 0) + (k == len(dirs) - 1 and z is not None), num_barriers=2)
                for k in range(len(dirs))]
    return ins, outs, barriers


def _forward_kernel(launch: _Launch, save: bool, scratch, *refs):
    """refs: per direction its 7 inputs (A as (d_state, width), B and C float32), then z (if any); outputs out,
    ypre, then per direction its chunk-start states (batch, n_chunks, d_state, width) when ``save``. ``scratch``:
    ``_forward_scratch``'s types, allocated here."""
    n_dirs = len(launch.reverses)
    n_in = 7 * n_dirs + launch.has_z
    inputs, (out_ref, ypre_ref, *state_refs) = refs[:n_in], refs[n_in:]
    z_ref = inputs[-1] if launch.has_z else None

    def body(ins, outs, barriers):
        for k, reverse in enumerate(launch.reverses):
            d = _Direction(ScanDirection(*inputs[7 * k:7 * k + 7]), reverse, launch)
            first, last = k == 0, k == n_dirs - 1
            # (GMEM ref, its tiles, channel-wide?) copied in per tile, and copied out per tile
            reads = [(d.refs.u, ins["u"], True), (d.refs.delta, ins["delta"], True), (d.refs.B, ins["B"], False),
                     (d.refs.C, ins["C"], False)]
            reads += [(ypre_ref, ins["ypre"], True)] if not first else []
            reads += [(z_ref, ins["z"], True)] if last and z_ref is not None else []
            writes = [(ypre_ref, outs["ypre"])] + ([(out_ref, outs["out"])] if last else [])
            _forward_direction(launch, d, _Tiles(launch, reverse), reads, writes, barriers[k], ins, outs,
                               first=first, last=last, z=last and z_ref is not None, out_dtype=out_ref.dtype,
                               state_ref=state_refs[k] if save else None)

    pl.run_scoped(body, *scratch)


def _forward_direction(launch: _Launch, d: _Direction, tiles: _Tiles, reads, writes, bars, ins, outs, *, first: bool,
                       last: bool, z: bool, out_dtype, state_ref):
    """One direction of the forward kernel: its tiles double-buffered (the next one's copies in flight while this
    one is computed), each tile's outputs copied out while the next is computed."""

    def gmem(ref, j, size, wide=True):
        return ref.at[d.b, tiles.rows(j, size), d.cols] if wide else ref.at[d.b, tiles.rows(j, size)]

    def fetch(j, size, slot):
        for ref, buf, wide in reads:
            plgpu.copy_gmem_to_smem(gmem(ref, j, size, wide), buf.at[slot, pl.ds(0, size)], bars.at[slot])

    def position(i, size, slot, h):
        """Scan step ``i`` of a tile of ``size`` in ``slot`` (``i`` may be traced)."""
        r = tiles.row(i, size)
        u = ins["u"][slot, r].astype(_F32)
        pre = ins["delta"][slot, r].astype(_F32) + d.bias
        dt = _softplus(pre) if launch.delta_softplus else pre
        _, h = d.update(h, dt, u, [ins["B"][slot, r, n] for n in range(launch.d_state)])
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

    def tile(j, size, slot, h):
        plgpu.barrier_wait(bars.at[slot])
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the copies out of this slot's previous tile have read it

        def step(i, h):
            if state_ref is not None:
                @pl.when(i % launch.chunk == 0)
                def _():
                    for n, h_n in enumerate(h):
                        state_ref[d.b, (j * launch.tile + i) // launch.chunk, n, d.cols] = h_n

            return position(i, size, slot, h)

        h = jax.lax.fori_loop(0, size, step, h)
        plgpu.commit_smem()  # the tile's stores are visible to the copies out, and every thread is past its reads
        for ref, buf in writes:
            plgpu.copy_smem_to_gmem(buf.at[slot, pl.ds(0, size)], gmem(ref, j, size))
        plgpu.commit_smem_to_gmem_group()
        return h

    def full_tile(j, h):
        slot = j % 2

        @pl.when(j + 1 < tiles.n_full)
        def _():
            fetch(j + 1, launch.tile, 1 - slot)

        if tiles.tail:
            @pl.when(j + 1 == tiles.n_full)
            def _():
                fetch(tiles.n_full, tiles.tail, 1 - slot)

        return tile(j, launch.tile, slot, h)

    fetch(0, launch.tile if tiles.n_full else tiles.tail, 0)
    h = jax.lax.fori_loop(0, tiles.n_full, full_tile, (d.zeros(),) * launch.d_state)
    if tiles.tail:
        tile(tiles.n_full, tiles.tail, tiles.n_full % 2, h)
    plgpu.wait_smem_to_gmem(0)  # this direction's ypre is in GMEM before the next direction copies it in


def _backward_kernel(launch: _Launch, *refs):
    """refs: per direction its 7 inputs, then z, ypre (if z), dout, per direction its saved states; outputs dz (if
    z), then per direction du, d delta (batch, length, width), dA (batch, d_state, width), dB, dC (batch, channel
    blocks, length, d_state), dD, d delta_bias (batch, width)."""
    n_dirs = len(launch.reverses)
    n_in = 7 * n_dirs + 2 * launch.has_z + 1 + n_dirs
    inputs, outputs = refs[:n_in], refs[n_in:]
    dir_refs = [ScanDirection(*inputs[7 * k:7 * k + 7]) for k in range(n_dirs)]
    rest = inputs[7 * n_dirs:]
    z_ref, ypre_ref = (rest[0], rest[1]) if launch.has_z else (None, None)
    dout_ref, state_refs = rest[2 * launch.has_z], rest[2 * launch.has_z + 1:]
    dz_ref = outputs[0] if launch.has_z else None
    grads = [DirectionGrads(*outputs[launch.has_z + 7 * k:launch.has_z + 7 * k + 7]) for k in range(n_dirs)]
    for k, (refs_k, reverse, state_ref, g) in enumerate(zip(dir_refs, launch.reverses, state_refs, grads,
                                                            strict=True)):
        d = _Direction(refs_k, reverse, launch)
        chunk = functools.partial(_backward_chunk, d=d, state_ref=state_ref, g=g, z_ref=z_ref, ypre_ref=ypre_ref,
                                  dout_ref=dout_ref, dz_ref=dz_ref if k == 0 else None)
        zero, n = d.zeros(), launch.d_state
        _, dA, dD, dbias = _chunked(launch, chunk, ((zero,) * n, (zero,) * n, zero, zero), backwards=True)
        for i, dA_n in enumerate(dA):
            g.dA[d.b, i, d.cols] = dA_n
        g.dD[d.b, d.cols] = dD
        g.ddelta_bias[d.b, d.cols] = dbias


def _backward_chunk(j, size, carry, *, d: _Direction, state_ref, g: DirectionGrads, z_ref, ypre_ref, dout_ref,
                    dz_ref):
    """Chunk ``j`` (of ``size`` scan steps), backwards: (dh, dA, dD, d delta_bias) after it -> before it.
    Writes its positions' du, d delta, dB, dC and, where ``dz_ref`` is given, dz."""
    dh, dA, dD, dbias = carry
    states = [[state_ref[d.b, j, n, d.cols] for n in range(d.launch.d_state)]]
    steps, decays = [], []
    for i in range(size):  # Recompute the chunk's states from its start.
        step = d.position(j * d.launch.chunk + i)
        _, u, _, dt, b_s, _ = step
        decay, h = d.update(states[-1], dt, u, b_s)
        steps.append(step)
        decays.append(decay)
        states.append(h)
    dA, dh = list(dA), list(dh)
    for i in reversed(range(size)):
        t, u, pre, dt, b_s, c_s = steps[i]
        dy = d.row(dout_ref, t)
        if z_ref is not None:
            zt = d.row(z_ref, t)
            sig = sigmoid(zt)
            if dz_ref is not None:
                dz_ref[d.b, t, d.cols] = dy * d.row(ypre_ref, t) * sig * (1.0 + zt * (1.0 - sig))
            dy = dy * zt * sig
        dh = [dh_n + c_n * dy for dh_n, c_n in zip(dh, c_s, strict=True)]
        dtu = dt * u
        b_dh = ddt_a = d.zeros()
        for n in range(d.launch.d_state):
            g.dC[d.b, d.block, t, n] = jnp.sum(states[i + 1][n] * dy)
            g.dB[d.b, d.block, t, n] = jnp.sum(dh[n] * dtu)
            b_dh = b_dh + dh[n] * b_s[n]
            dh_a_h = dh[n] * decays[i][n] * states[i][n]  # dh of the previous position (before its output) x h
            ddt_a = ddt_a + dh_a_h * d.A[n]
            dA[n] = dA[n] + dh_a_h * dt
            dh[n] = dh[n] * decays[i][n]
        g.du[d.b, t, d.cols] = b_dh * dt + d.D * dy
        dD = dD + dy * u
        dpre = ddt_a + u * b_dh
        if d.launch.delta_softplus:
            dpre = dpre * sigmoid(pre)
        dbias = dbias + dpre
        g.ddelta[d.b, t, d.cols] = dpre
    return tuple(dh), tuple(dA), dD, dbias


def _launch(dirs: tuple[ScanDirection, ...], z: jax.Array | None, cfg: KernelConfig) -> _Launch:
    blocks = cfg.blocks
    if blocks.block_d != LANES or blocks.save_every != 1:
        raise ValueError(f"the Mosaic GPU scan runs {LANES} channels per program and saves every chunk start: "
                         f"block_d must be {LANES} and save_every 1, got {blocks}")
    return _Launch(tuple(cfg.reverses), cfg.delta_softplus, z is not None, dirs[0].u.shape[1],
                   dirs[0].A.shape[1], blocks.chunk, blocks.chunk * blocks.num_stages)


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


# The forward kernel without Pallas's automatic barriers around every load and store: it meets the two conditions
# Mosaic GPU's documentation gives for that. No thread reads and writes the same memory (inputs are read from
# tiles the copies in write, outputs are written to tiles the copies out read), and after commit_smem no thread
# reads a tile that a copy then overwrites. The barriers it needs are in commit_smem and the waits.
FORWARD_PARAMS = plgpu.CompilerParams(unsafe_no_auto_barriers=True)
# The backward kernel's (None: Mosaic GPU's defaults, a warpgroup barrier around every load and store).
BACKWARD_PARAMS: plgpu.CompilerParams | None = None


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
    n_state, n_blocks = launch.d_state, width // LANES
    act = jax.ShapeDtypeStruct((batch, length, width), _F32)
    per_block = jax.ShapeDtypeStruct((batch, n_blocks, length, n_state), _F32)
    per_batch = jax.ShapeDtypeStruct((batch, width), _F32)
    grad_types = DirectionGrads(act, act, jax.ShapeDtypeStruct((batch, n_state, width), _F32), per_block,
                                per_block, per_batch, per_batch)
    out_type = ((act,) if z is not None else ()) + tuple(grad_types) * len(dirs)
    args = _kernel_inputs(dirs, width) + ([] if z is None else [_padded(z, width), ypre]) + [
        _padded(dout, width), *states]
    outs = _call(functools.partial(_backward_kernel, launch), out_type, batch, width, cfg, BACKWARD_PARAMS)(*args)
    dz, raw = (outs[0][..., :d_inner], outs[1:]) if z is not None else (None, outs)
    grads = []
    for k in range(len(dirs)):
        g = DirectionGrads(*raw[7 * k:7 * k + 7])
        grads.append(DirectionGrads(g.du[..., :d_inner], g.ddelta[..., :d_inner], g.dA.sum(0)[:, :d_inner].T,
                                    g.dB.sum(1), g.dC.sum(1), g.dD.sum(0)[:d_inner],
                                    g.ddelta_bias.sum(0)[:d_inner]))
    return tuple(grads), dz


# The Mosaic GPU kernels as scan(dirs, z, cfg) -> out, with their custom_vjp (what api.py calls).
scan = make_scan(_forward, _backward)

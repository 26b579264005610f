"""Mamba-1 selective scan as Pallas kernels lowered through Triton (GPU), forward and backward, and ``scan``,
their ``custom_vjp`` that ``api.py`` calls.

One program owns one batch element and ``block_d`` channels of d_inner; its state (d_state, block_d) stays
in registers, float32, while it walks the length in chunks of ``chunk`` positions (unrolled inside a
chunk). The kernels are bound by instruction issue (BENCHMARKS.md), so compiled they spell their arithmetic
in PTX: one ``ex2.approx.ftz`` and one ``fma.rn`` per state entry where Triton's lowering emits libdevice's
exp2f and separate multiplies and adds, and approximate ex2/lg2/rcp in softplus and the forward's gate where
it emits libdevice's expf, log1pf and IEEE division. delta_bias + softplus, the D skip and the silu(z) gate
are fused. Lengths and d_inner need not be multiples of the blocks: out-of-range positions get
delta = 0 (state unchanged) and stores are masked.

One launch can run two directions that share the output and z (Vim's bidirectional mixer): the second
reads its inputs from the last position to the first, in place, and adds into the first one's float32
sum. The forward pass of training also stores the state at the start of every segment (``save_every``
chunks). The backward pass walks the segments from the end: it recomputes the segment's chunk-start
states from the saved one into a per-program scratch buffer (``save_every`` states per program, so it
grows with ``save_every``; the running programs' part stays in L2), then walks the segment's chunks
backwards, recomputes the states inside a chunk from its start, and carries dh backwards.
With ``save_every`` 1 it reads every chunk-start state directly instead: fewer instructions, more memory.
Gradients that sum over channels (dB, dC) are written per channel block and summed afterwards; those
that sum over batch and length (dA, dD, d delta_bias) are written per batch element: no atomics, so the
result is deterministic.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

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
_LOG2E = 1.0 / math.log(2.0)

# JAX 0.11 deprecates Pallas's Triton backend and warns at every lowering of these kernels; ``api.gpu_kernel``'s
# log line says so once instead.
warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated", category=DeprecationWarning)

# Tuned on an H100 at the Vim-S shape (BENCHMARKS.md): short chunks keep the unrolled chunk (its states and
# the next chunk's prefetched rows) in registers. Saving every chunk start is fastest, at Vim shapes and at long
# sequences; a larger save_every trades some speed for much less memory (BENCHMARKS.md). Larger states get
# fewer channels per program.
DEFAULT_BLOCKS = BlockSizes(chunk=2, block_d=32, num_warps=1, num_stages=1, save_every=1)


def default_blocks(d_state: int) -> BlockSizes:
    if d_state <= 16:
        return DEFAULT_BLOCKS
    return dataclasses.replace(DEFAULT_BLOCKS, block_d=max(8, 32 * 16 // _next_pow2(d_state)))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class _Geometry:
    """Static sizes of one launch, and the index helpers shared by both kernels."""

    def __init__(self, u: jax.Array, d_state: int, blocks: BlockSizes):
        self.batch, self.length, self.d_inner = u.shape
        self.d_state, self.n_pad = d_state, _next_pow2(d_state)
        self.block_d, self.chunk = _next_pow2(blocks.block_d), blocks.chunk
        self.n_dblocks = -(-self.d_inner // self.block_d)
        self.n_chunks = num_chunks(self.length, self.chunk)
        # Segments of save_every chunks, evened out so that the last one is not mostly past the end.
        self.n_segments = num_chunks(self.n_chunks, blocks.save_every)
        self.save_every = num_chunks(self.n_chunks, self.n_segments)
        self.grid = (self.batch, self.n_dblocks)

    def channels(self):
        d0 = pl.program_id(1) * self.block_d
        offs = d0 + jnp.arange(self.block_d)
        return pl.ds(d0, self.block_d), offs < self.d_inner

    def position(self, step, reverse: bool):
        """Scan step -> (clamped sequence position, whether the step is inside the sequence)."""
        t = self.length - 1 - step if reverse else step
        return jnp.clip(t, 0, self.length - 1), (step >= 0) & (step < self.length)

    # BlockSpecs: the kernel sees one batch element of the activations, whole params.
    def seq_spec(self, width: int) -> pl.BlockSpec:
        return pl.BlockSpec((pl.squeezed, self.length, width), lambda b, d: (b, 0, 0))

    def full_spec(self, shape: tuple[int, ...]) -> pl.BlockSpec:
        return pl.BlockSpec(shape, lambda b, d: (0,) * len(shape))

    def dir_specs(self) -> ScanDirection:
        """One direction's inputs, A as (d_state, d_inner) (see ``_channels_last``)."""
        return ScanDirection(self.seq_spec(self.d_inner), self.seq_spec(self.d_inner),
                             self.full_spec((self.d_state, self.d_inner)), self.seq_spec(self.d_state),
                             self.seq_spec(self.d_state), self.full_spec((self.d_inner,)),
                             self.full_spec((self.d_inner,)))

    def states_spec(self) -> pl.BlockSpec:
        return pl.BlockSpec((pl.squeezed, self.n_segments, self.n_pad, self.d_inner), lambda b, d: (b, 0, 0, 0))

    def scratch(self) -> tuple[jax.ShapeDtypeStruct, pl.BlockSpec]:
        """The backward pass's per-program buffer of one segment's chunk-start states."""
        shape = (self.batch, self.n_dblocks, self.save_every, self.n_pad, self.block_d)
        return (jax.ShapeDtypeStruct(shape, _F32),
                pl.BlockSpec((pl.squeezed, pl.squeezed, *shape[2:]), lambda b, d: (b, d, 0, 0, 0)))


def _load_row(ref, t, cols, mask):
    return plgpu.load(ref.at[t, cols], mask=mask, other=0.0).astype(_F32)


def _store_row(ref, t, cols, value, mask):
    plgpu.store(ref.at[t, cols], value.astype(ref.dtype), mask=mask)


class _Step(NamedTuple):
    """One scan step's inputs (float32) and masks; dt = 0 outside the sequence (state unchanged)."""

    t: jax.Array
    mask: jax.Array  # channels in range and step inside the sequence
    nmask: jax.Array  # states in range and step inside the sequence
    u: jax.Array
    pre: jax.Array  # delta + delta_bias, before softplus
    dt: jax.Array
    b: jax.Array
    c: jax.Array


class _Direction:
    """One direction's parameters, loaded once per program, and its per-chunk loads from ``refs`` (the
    direction's input refs, A as (d_state, d_inner))."""

    def __init__(self, refs: ScanDirection, geo: _Geometry, reverse: bool, cfg: KernelConfig):
        self.refs, self.geo, self.reverse = refs, geo, reverse
        self.delta_softplus, self.asm = cfg.delta_softplus, not cfg.interpret
        self.cols, self.dmask = geo.channels()
        self.nmask = jnp.arange(geo.n_pad) < geo.d_state
        self.ncols = pl.ds(0, geo.n_pad)
        self.A = plgpu.load(refs.A.at[self.ncols, self.cols], mask=self.nmask[:, None] & self.dmask[None, :],
                            other=0.0).astype(_F32)
        self.D = plgpu.load(refs.D.at[self.cols], mask=self.dmask, other=0.0).astype(_F32)
        self.bias = plgpu.load(refs.delta_bias.at[self.cols], mask=self.dmask, other=0.0).astype(_F32)

    def load_chunk(self, c, extra_refs: tuple = ()) -> tuple[list[jax.Array], ...]:
        """All loads of chunk ``c``: per step, u, delta, B, C and a row of every (length, d_inner) ref in
        ``extra_refs`` (None entries load nothing). Masked: a chunk past either end loads nothing. (Unmasked
        loads of the clamped position were slower on the H100, the compiler then issues them later; see
        BENCHMARKS.md.)"""
        rows = []
        r = self.refs
        for t, inside in self._positions(c):
            mask, nmask = self.dmask & inside, self.nmask & inside
            rows.append((_load_row(r.u, t, self.cols, mask), _load_row(r.delta, t, self.cols, mask),
                         _load_row(r.B, t, self.ncols, nmask), _load_row(r.C, t, self.ncols, nmask),
                         *(None if r is None else _load_row(r, t, self.cols, mask) for r in extra_refs)))
        return rows

    def steps(self, c, rows) -> list[_Step]:
        """The steps of chunk ``c`` from its loaded rows."""
        out = []
        for (t, inside), (u, delta, b, c_t, *_) in zip(self._positions(c), rows, strict=True):
            mask = self.dmask & inside
            pre = delta + self.bias
            dt = jnp.where(mask, _softplus(pre, self.asm) if self.delta_softplus else pre, 0.0)
            out.append(_Step(t, mask, self.nmask & inside, u, pre, dt, b, c_t))
        return out

    def load_state(self, ref, index) -> jax.Array:
        """This program's (d_state, block_d) state tile ``index`` of a saved-states ref."""
        return plgpu.load(ref.at[index, self.ncols, self.cols], mask=self.dmask[None, :], other=0.0)

    def _positions(self, c):
        return [self.geo.position(c * self.geo.chunk + i, self.reverse) for i in range(self.geo.chunk)]

    def decay(self, s: _Step) -> jax.Array:
        return _ex2(self.A * (s.dt * _LOG2E)[None, :], self.asm)  # exp(dt * A)

    def update(self, h: jax.Array, s: _Step, decay: jax.Array | None = None) -> jax.Array:
        decay = self.decay(s) if decay is None else decay
        return _fma(decay, h, s.b[:, None] * (s.dt * s.u)[None, :], self.asm)


def _prefetched_chunk_loop(first, count: int, backwards: bool, load, body, init):
    """fori over chunks ``first .. first + count - 1`` (last to first when ``backwards``) where the next
    chunk's loads are issued before this chunk's compute, so that memory latency overlaps the sequential
    work: body(c, load(c), carry) -> carry. (The last iteration also loads the chunk past the range.)"""
    chunk_of = (lambda j: first + count - 1 - j) if backwards else (lambda j: first + j)

    def step(j, state):
        carry, rows = state
        upcoming = load(chunk_of(j + 1))
        return body(chunk_of(j), rows, carry), upcoming

    return jax.lax.fori_loop(0, count, step, (init, load(chunk_of(0))))[0]


def _ptx(instruction: str, *args: jax.Array | float) -> jax.Array:
    """One float32 PTX instruction per element, e.g. ``_ptx("ex2.approx.ftz.f32", x)``."""
    args = [jnp.asarray(a, _F32) for a in args]
    shape = jnp.broadcast_shapes(*(a.shape for a in args))
    operands = ", ".join(f"${i + 1}" for i in range(len(args)))
    return plgpu.elementwise_inline_asm(
        f"{instruction} $0, {operands};", args=[jnp.broadcast_to(a, shape) for a in args],
        constraints="=f" + ",f" * len(args), pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(shape, _F32)])[0]


# Compiled (asm), the kernels spell their arithmetic in PTX: XLA's Triton pipeline does not contract multiplies
# and adds, and lowers exp, log and division to libdevice calls with range fix-ups and slow paths that cost
# more issue slots than the scan itself. Interpreted, the same formulas run on exact jnp primitives.
def _ex2(x: jax.Array, asm: bool) -> jax.Array:
    """2**x: one ``ex2.approx.ftz`` (relative error about 2**-22)."""
    return _ptx("ex2.approx.ftz.f32", x) if asm else jnp.exp2(x)


def _lg2(x: jax.Array, asm: bool) -> jax.Array:
    """log2(x): one ``lg2.approx.ftz`` (absolute error about 2**-22 near 1)."""
    return _ptx("lg2.approx.ftz.f32", x) if asm else jnp.log2(x)


def _rcp(x: jax.Array, asm: bool) -> jax.Array:
    """1 / x: one ``rcp.approx.ftz``."""
    return _ptx("rcp.approx.ftz.f32", x) if asm else 1.0 / x


def _fma(a: jax.Array, b: jax.Array | float, c: jax.Array | float, asm: bool) -> jax.Array:
    """a * b + c: one ``fma.rn``."""
    return _ptx("fma.rn.f32", a, b, c) if asm else a * b + c


def _sigmoid(x: jax.Array, asm: bool) -> jax.Array:
    """1 / (1 + exp(-x)); 0 where exp(-x) overflows."""
    return _rcp(1.0 + _ex2(x * -_LOG2E, asm), asm)


def _softplus(x: jax.Array, asm: bool) -> jax.Array:
    """PyTorch's softplus from ``ex2`` and ``lg2`` (``softplus_from_exp_and_log``)."""
    return softplus_from_exp_and_log(x, lambda v: _ex2(v * _LOG2E, asm), lambda v: _lg2(v, asm) * math.log(2.0),
                                     functools.partial(_fma, asm=asm))


def _forward_kernel(dirs: tuple[ScanDirection, ...], z_ref, out_ref, acc_ref, state_refs, *, geo: _Geometry,
                    cfg: KernelConfig):
    """One program: the directions one after the other over one batch element and ``block_d`` channels.

    dirs: per direction, its input refs; z_ref: the gate (None: no gate); out_ref: the gated output;
    acc_ref: the float32 sum of the directions so far (None for one direction without ``save``);
    state_refs: per direction, its saved segment-start states (None without ``save``).
    """
    n_dirs = len(dirs)
    for k, (refs, reverse) in enumerate(zip(dirs, cfg.reverses, strict=True)):
        d = _Direction(refs, geo, reverse, cfg)
        first, last = k == 0, k == n_dirs - 1
        if not first and not cfg.interpret:  # (the interpreter has no threads to synchronise)
            plgpu.debug_barrier()  # the previous direction's sums in acc_ref are visible to every thread
        extra = (None if first else acc_ref, z_ref if last else None)
        body = functools.partial(_forward_chunk, d=d, acc_ref=acc_ref, out_ref=out_ref if last else None,
                                 state_ref=None if state_refs is None else state_refs[k])
        _prefetched_chunk_loop(0, geo.n_chunks, False, functools.partial(d.load_chunk, extra_refs=extra),
                               body, jnp.zeros((geo.n_pad, geo.block_d), _F32))


def _forward_chunk(c, rows, h, *, d: _Direction, acc_ref, out_ref, state_ref):
    """Chunk ``c`` of direction ``d`` from state ``h`` -> the state after it. ``rows`` are the chunk's loads, each
    with the earlier directions' sum and z where those are read. Stores the state at segment starts
    (``state_ref``), the running sum (``acc_ref``) and the gated output (``out_ref``), where those are given."""
    geo = d.geo
    if state_ref is not None:  # at segment starts only (c >= 0: lax's truncating div and rem)
        every = jnp.int32(geo.save_every)
        plgpu.store(state_ref.at[jax.lax.div(c, every), d.ncols, d.cols], h,
                    mask=d.dmask[None, :] & (jax.lax.rem(c, every) == 0))
    for s, (*_, acc, z) in zip(d.steps(c, rows), rows, strict=True):
        h = d.update(h, s)
        y = jnp.sum(h * s.c[:, None], axis=0) + d.D * s.u
        if acc is not None:
            y = y + acc
        if acc_ref is not None:
            _store_row(acc_ref, s.t, d.cols, y, s.mask)
        if out_ref is not None:
            _store_row(out_ref, s.t, d.cols, y if z is None else y * z * _sigmoid(z, d.asm), s.mask)
    return h


def _backward_kernel(dirs: tuple[ScanDirection, ...], z_ref, ypre_ref, dout_ref, state_refs, dz_ref,
                     grads: tuple[DirectionGrads, ...], scratch_ref, *, geo: _Geometry, cfg: KernelConfig):
    """One program: the directions one after the other over one batch element and ``block_d`` channels.

    dirs: per direction, its input refs; z_ref, ypre_ref: the gate and the ungated forward output, dz_ref: the
    gate's gradient (all three None without a gate); dout_ref: the output's gradient; state_refs: per
    direction, its saved segment-start states; grads: per direction, its gradients' refs (dB, dC per channel
    block, dA, dD, d delta_bias per batch element); scratch_ref: this program's ``save_every`` chunk-start
    states (None for ``save_every`` 1).
    """
    cols, dmask = geo.channels()
    for k, (refs, reverse, state_ref, g) in enumerate(zip(dirs, cfg.reverses, state_refs, grads, strict=True)):
        d = _Direction(refs, geo, reverse, cfg)
        write_dz = z_ref is not None and k == 0
        extra = (dout_ref, z_ref, ypre_ref if write_dz else None)
        chunk_body = functools.partial(_backward_chunk, d=d, grads=g, dz_ref=dz_ref if write_dz else None)
        zeros_dn = jnp.zeros((geo.n_pad, geo.block_d), _F32)
        zeros_d = jnp.zeros((geo.block_d,), _F32)
        init = (zeros_dn, zeros_dn, zeros_d, zeros_d)
        if geo.save_every == 1:  # every chunk start was saved, and is prefetched with the chunk: no scratch
            load = functools.partial(_load_chunk_and_state, d=d, state_ref=state_ref, extra=extra)
            _, dA, dD, dbias = _prefetched_chunk_loop(0, geo.n_chunks, True, load, chunk_body, init)
        else:
            segment_body = functools.partial(_backward_segment, d=d, state_ref=state_ref, scratch_ref=scratch_ref,
                                             extra=extra, chunk_body=chunk_body)
            _, dA, dD, dbias = jax.lax.fori_loop(0, geo.n_segments, segment_body, init)
        plgpu.store(g.dA.at[d.ncols, cols], dA, mask=dmask[None, :])
        plgpu.store(g.dD.at[cols], dD, mask=dmask)
        plgpu.store(g.ddelta_bias.at[cols], dbias, mask=dmask)


def _load_chunk_and_state(c, *, d: _Direction, state_ref, extra: tuple):
    """The one-level backward's loads of chunk ``c``: its rows and its saved start state."""
    return d.load_chunk(c, extra), d.load_state(state_ref, jnp.maximum(c, 0))


def _backward_segment(j, carry, *, d: _Direction, state_ref, scratch_ref, extra: tuple, chunk_body):
    """The two-level backward's ``j``-th segment from the end: recompute its chunk-start states from the saved
    one into ``scratch_ref``, then walk its chunks backwards with ``chunk_body``."""
    geo = d.geo
    segment = geo.n_segments - 1 - j
    first = segment * geo.save_every
    h = d.load_state(state_ref, segment)
    _barrier(d.asm)  # the previous segment's reads of the scratch are done
    h = _prefetched_chunk_loop(first, geo.save_every - 1, False, d.load_chunk,
                               functools.partial(_recompute_chunk, d=d, scratch_ref=scratch_ref, first=first), h)
    scratch_ref[geo.save_every - 1] = h  # (the state after the last chunk is not needed)
    _barrier(d.asm)
    return _prefetched_chunk_loop(first, geo.save_every, True, lambda c: (d.load_chunk(c, extra), None),
                                  functools.partial(chunk_body, start_state=lambda c: scratch_ref[c - first]),
                                  carry)


def _barrier(asm: bool) -> None:
    """Compiled, a barrier of the program's threads (the scratch is written and read by different ones)."""
    if asm:
        plgpu.debug_barrier()


def _recompute_chunk(c, rows, h, *, d: _Direction, scratch_ref, first):
    """Stores chunk ``c``'s start state ``h`` in the segment's scratch (its chunk ``first`` at index 0) and
    returns the state after the chunk."""
    scratch_ref[c - first] = h
    for s in d.steps(c, rows):
        h = d.update(h, s)
    return h


def _backward_chunk(c, loaded, carry, *, d: _Direction, grads: DirectionGrads, dz_ref, start_state=None):
    """Chunk ``c`` of direction ``d`` backwards: (dh, dA, dD, d delta_bias) after it -> before it. Writes the
    chunk's du, d delta, dB, dC rows into ``grads`` and, where ``dz_ref`` is given, dz. ``loaded`` is (rows,
    the chunk's start state where it was prefetched with them (one level), else None); ``start_state(c)``
    gives it otherwise. (The two-level path reads its scratch here instead: prefetching that was slower on
    the H100, see BENCHMARKS.md.)"""
    geo = d.geo
    rows, saved = loaded
    dh, dA, dD, dbias = carry
    steps = d.steps(c, rows)
    states = [saved if start_state is None else start_state(c)]
    decays = [d.decay(s) for s in steps]  # one exp per state entry, reused by both sweeps
    for s, a in zip(steps, decays, strict=True):  # Recompute the chunk's states from its start.
        states.append(d.update(states[-1], s, a))
    for i in reversed(range(geo.chunk)):
        s, (*_, dy, z, ypre) = steps[i], rows[i]
        if z is not None:
            sig = sigmoid(z)  # (IEEE here: the approximate one was slower in this kernel, see BENCHMARKS.md)
            if dz_ref is not None:
                _store_row(dz_ref, s.t, d.cols, dy * ypre * sig * (1.0 + z * (1.0 - sig)), s.mask)
            dy = dy * z * sig
        dh = _fma(s.c[:, None], dy[None, :], dh, d.asm)
        _store_row(grads.dC, s.t, d.ncols, jnp.sum(states[i + 1] * dy[None, :], axis=1), s.nmask)
        dh_a = dh * decays[i]  # dh of the previous position, before its output's term
        dh_a_hprev = dh_a * states[i]
        b_dh = jnp.sum(dh * s.b[:, None], axis=0)  # shared by du and d delta
        ddt = jnp.sum(dh_a_hprev * d.A, axis=0) + s.u * b_dh
        dA = _fma(dh_a_hprev, s.dt[None, :], dA, d.asm)
        _store_row(grads.dB, s.t, d.ncols, jnp.sum(dh * (s.dt * s.u)[None, :], axis=1), s.nmask)
        _store_row(grads.du, s.t, d.cols, b_dh * s.dt + d.D * dy, s.mask)
        dD = dD + dy * s.u
        dpre = ddt * sigmoid(s.pre) if d.delta_softplus else ddt
        dpre = jnp.where(s.mask, dpre, 0.0)
        dbias = dbias + dpre
        _store_row(grads.ddelta, s.t, d.cols, dpre, s.mask)
        dh = dh_a
    return dh, dA, dD, dbias


def _channels_last(dirs: tuple[ScanDirection, ...]) -> tuple[ScanDirection, ...]:
    """A as (d_state, d_inner), like the kernels' state tiles (whose saved copies are then contiguous in
    channels)."""
    return tuple(d._replace(A=d.A.T) for d in dirs)


def _compiler_params(blocks: BlockSizes) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _forward(dirs: tuple[ScanDirection, ...], z: jax.Array | None, cfg: KernelConfig, save: bool):
    u = dirs[0].u
    geo = _Geometry(u, dirs[0].A.shape[1], cfg.blocks)
    seq = geo.seq_spec(geo.d_inner)
    keep_acc = save or len(dirs) > 1
    states = jax.ShapeDtypeStruct((geo.batch, geo.n_segments, geo.n_pad, geo.d_inner), _F32)
    out, acc, states = pl.pallas_call(
        functools.partial(_forward_kernel, geo=geo, cfg=cfg),
        grid=geo.grid,
        in_specs=((geo.dir_specs(),) * len(dirs), None if z is None else seq),
        out_specs=(seq, seq if keep_acc else None, (geo.states_spec(),) * len(dirs) if save else None),
        out_shape=(jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct(u.shape, _F32) if keep_acc else None,
                   (states,) * len(dirs) if save else None),
        compiler_params=_compiler_params(cfg.blocks), interpret=cfg.interpret, name="selective_scan_fwd",
    )(_channels_last(dirs), z)
    if not save:
        return out, None, None
    return out, acc, states


def _backward(dirs, z, ypre, states, dout, cfg: KernelConfig):
    u = dirs[0].u
    geo = _Geometry(u, dirs[0].A.shape[1], cfg.blocks)
    b, length, d_inner, n_pad, n_db = geo.batch, geo.length, geo.d_inner, geo.n_pad, geo.n_dblocks
    # du, d delta and dz in their inputs' dtypes: each position's is written once, rounded as a cast after would.
    act = functools.partial(jax.ShapeDtypeStruct, u.shape)
    per_dblock = jax.ShapeDtypeStruct((b, n_db, length, n_pad), _F32)
    per_dblock_spec = pl.BlockSpec((pl.squeezed, pl.squeezed, length, n_pad), lambda i, j: (i, j, 0, 0))
    per_batch_dn = jax.ShapeDtypeStruct((b, n_pad, d_inner), _F32)
    per_batch_d = jax.ShapeDtypeStruct((b, d_inner), _F32)
    batch_dn_spec = pl.BlockSpec((pl.squeezed, n_pad, d_inner), lambda i, j: (i, 0, 0))
    batch_d_spec = pl.BlockSpec((pl.squeezed, d_inner), lambda i, j: (i, 0))
    grad_shapes = tuple(DirectionGrads(act(d.u.dtype), act(d.delta.dtype), per_batch_dn, per_dblock, per_dblock,
                                       per_batch_d, per_batch_d) for d in dirs)
    seq = geo.seq_spec(d_inner)
    grad_specs = DirectionGrads(seq, seq, batch_dn_spec, per_dblock_spec, per_dblock_spec, batch_d_spec,
                                batch_d_spec)
    has_z = z is not None
    scratch, scratch_spec = geo.scratch() if geo.save_every > 1 else (None, None)
    dz, raw, _ = pl.pallas_call(
        functools.partial(_backward_kernel, geo=geo, cfg=cfg),
        grid=geo.grid,
        in_specs=((geo.dir_specs(),) * len(dirs), seq if has_z else None, seq if has_z else None, seq,
                  (geo.states_spec(),) * len(dirs)),
        out_specs=(seq if has_z else None, (grad_specs,) * len(dirs), scratch_spec),
        out_shape=(act(z.dtype) if has_z else None, grad_shapes, scratch),
        compiler_params=_compiler_params(cfg.blocks), interpret=cfg.interpret, name="selective_scan_bwd",
    )(_channels_last(dirs), z, ypre if has_z else None, dout, states)
    n = geo.d_state
    grads = tuple(DirectionGrads(g.du, g.ddelta, g.dA.sum(0)[:n].T, g.dB.sum(1)[..., :n], g.dC.sum(1)[..., :n],
                                 g.dD.sum(0), g.ddelta_bias.sum(0)) for g in raw)
    return grads, dz


# The Triton kernels as scan(dirs, z, cfg) -> out, with their custom_vjp (what api.py calls).
scan = make_scan(_forward, _backward)

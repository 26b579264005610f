"""Mamba-1 selective scan forward as a Pallas kernel lowered through Mosaic GPU (Hopper and newer).

The first piece of the Mosaic GPU backend: the forward pass without saved states (inference, and the
forward-only benchmark beside the Triton kernel). It has no backward pass yet, so ``api.py`` does not offer it.

One program (one warpgroup, 128 threads) owns one batch element and 128 channels of d_inner, one channel per
thread; the channel's d_state states are d_state float32 registers of that thread (d_state ``(128,)`` vectors
of the kernel). It walks the length once per direction: the first direction writes its float32 output sum to
``ypre``, the second (Vim's backward direction, reading the positions from the last to the first in place)
adds into it, and the last one applies the D skips' sum and the silu(z) gate and writes ``out``.
delta_bias + softplus are fused. d_inner is padded to a multiple of 128 (padded channels have delta 0 and
stay 0); any length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from cab_jax.kernels.selective_scan.pallas_common import ScanDirection, with_defaults

_F32 = jnp.float32
LANES = 128  # channels per program: one warpgroup, one channel per thread


def interpret_params():
    """Mosaic GPU's interpret mode (CPU tests). jax 0.10-0.11 keep its parameters outside ``plgpu``."""
    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params()


def _softplus(x: jax.Array) -> jax.Array:
    """PyTorch's softplus (identity above 20) from primitives Mosaic GPU lowers (it has no log1p)."""
    return jnp.where(x > 20.0, x, jnp.log(1.0 + jnp.exp(jnp.minimum(x, 20.0))))


def _forward_kernel(num_dirs: int, reverses: tuple[bool, ...], delta_softplus: bool, has_z: bool, length: int,
                    d_state: int, *refs):
    """refs: per direction (u, delta, A^T, B, C, D, delta_bias), then z (if any); outputs out, ypre."""
    inputs, (out_ref, ypre_ref) = refs[:-2], refs[-2:]
    dir_refs = [inputs[7 * i:7 * i + 7] for i in range(num_dirs)]
    z_ref = inputs[7 * num_dirs] if has_z else None
    b = jax.lax.axis_index("batch")
    cols = pl.ds(jax.lax.axis_index("channels") * LANES, LANES)
    for i, (u_ref, delta_ref, at_ref, b_ref, c_ref, d_ref, bias_ref) in enumerate(dir_refs):
        a = [at_ref[n, cols] for n in range(d_state)]
        bias = bias_ref[cols]
        first, last = i == 0, i == num_dirs - 1

        def step(s, h, u_ref=u_ref, delta_ref=delta_ref, b_ref=b_ref, c_ref=c_ref, d_ref=d_ref, a=a, bias=bias,
                 first=first, last=last, reverse=reverses[i]):
            t = length - 1 - s if reverse else s
            u = u_ref[b, t, cols].astype(_F32)
            dt = delta_ref[b, t, cols].astype(_F32) + bias
            if delta_softplus:
                dt = _softplus(dt)
            du = dt * u
            y = d_ref[cols] * u
            new = []
            for n in range(d_state):
                h_n = jnp.exp(dt * a[n]) * h[n] + du * b_ref[b, t, n].astype(_F32)
                y = y + c_ref[b, t, n].astype(_F32) * h_n
                new.append(h_n)
            if not first:
                y = y + ypre_ref[b, t, cols]
            ypre_ref[b, t, cols] = y
            if last:
                if has_z:
                    zt = z_ref[b, t, cols].astype(_F32)
                    y = y * zt / (1.0 + jnp.exp(-zt))
                out_ref[b, t, cols] = y.astype(out_ref.dtype)
            return tuple(new)

        zeros = u_ref[b, 0, cols].astype(_F32) * 0.0  # a register vector in the loop's layout
        jax.lax.fori_loop(0, length, step, (zeros,) * d_state)


def forward(dirs: tuple[ScanDirection, ...], z: jax.Array | None, reverses: tuple[bool, ...],
            delta_softplus: bool, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """``(out, ypre)``: out (batch, length, d_inner) in u.dtype = (sum over dirs of scan + D*u) * silu(z), ypre
    float32, the ungated sum. Shapes as ``reference.py``; D and delta_bias may be None."""
    dirs = tuple(with_defaults(d) for d in dirs)
    batch, length, d_inner = dirs[0].u.shape
    d_state = dirs[0].A.shape[-1]
    pad = -d_inner % LANES

    def channels_padded(x: jax.Array) -> jax.Array:
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x

    args = []
    for d in dirs:
        args += [channels_padded(d.u), channels_padded(d.delta), channels_padded(d.A.astype(_F32).T),
                 d.B, d.C, channels_padded(d.D.astype(_F32)), channels_padded(d.delta_bias.astype(_F32))]
    if z is not None:
        args.append(channels_padded(z))
    width = d_inner + pad
    kernel = plgpu.kernel(
        functools.partial(_forward_kernel, len(dirs), tuple(reverses), delta_softplus, z is not None, length,
                          d_state),
        out_type=(jax.ShapeDtypeStruct((batch, length, width), dirs[0].u.dtype),
                  jax.ShapeDtypeStruct((batch, length, width), _F32)),
        grid=(batch, width // LANES), grid_names=("batch", "channels"),
        interpret=interpret_params() if interpret else None)
    out, ypre = kernel(*args)
    return out[..., :d_inner], ypre[..., :d_inner]

"""Mamba-1 selective-SSM mixer, unidirectional or bidirectional ("bimamba v2" as in Vim).

The mixer returns its output and the selective projections B and C (the x_proj outputs, per token,
before discretisation) that the attention bridge maps onto the teacher's keys and queries. Under a device
mesh, a Pallas scan kernel runs once per device on its batch / d_inner shard.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from cab_jax import sharding
from cab_jax.kernels.selective_scan import (
    BlockSizes,
    ScanDirection,
    resolve_impl,
    selective_scan,
    selective_scan_bidirectional,
)
from cab_jax.kernels.selective_scan.implicit_attention import implicit_attention
from cab_jax.models.layers import Dtype, dense, torch_uniform

A_INITS = ("s4d", "cab")
CAB_A_LOG = -20.0  # CAB's constant A_log init: A = -exp(-20) ~ 0, i.e. no decay.


class SSMProjections(NamedTuple):
    """B and C of the forward scan and, for the bidirectional mixer, of the backward scan.

    Each is (batch, length, d_state) in token order: position t belongs to token t in both directions
    (the backward scan reads the sequence from the last position to the first).
    """

    B: jax.Array
    C: jax.Array
    B_b: jax.Array | None = None
    C_b: jax.Array | None = None


def _dt_bias_init(key: jax.Array, d_inner: int, dt_min: float = 1e-3, dt_max: float = 1e-1,
                  floor: float = 1e-4) -> jax.Array:
    """softplus^-1 of dt drawn log-uniformly in [dt_min, dt_max] (floored), so softplus(bias) = dt."""
    u = jax.random.uniform(key, (d_inner,))
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, floor)
    return dt + jnp.log(-jnp.expm1(-dt))


def _a_log_init(a_init: str, d_inner: int, d_state: int) -> jax.Array:
    if a_init == "s4d":  # S4D-real: A_n = -n.
        return jnp.log(jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32), (d_inner, d_state)))
    if a_init == "cab":
        return jnp.full((d_inner, d_state), CAB_A_LOG, jnp.float32)
    raise ValueError(f"unknown A init {a_init!r}; expected one of {A_INITS}")


class SSMDirection(nnx.Module):
    """The per-direction parameters of a Mamba mixer: causal depthwise conv, x_proj, dt_proj, A_log, D."""

    def __init__(self, d_inner: int, d_state: int, dt_rank: int, d_conv: int, a_init: str, *,
                 rngs: nnx.Rngs, dtype: Dtype):
        conv_init = torch_uniform(d_conv)  # depthwise Conv1d: fan_in = kernel size
        self.conv_kernel = nnx.Param(conv_init(rngs.params(), (d_conv, d_inner)), logical_axes=(None, "inner"))
        self.conv_bias = nnx.Param(conv_init(rngs.params(), (d_inner,)), logical_axes=("inner",))
        self.x_proj = dense(d_inner, dt_rank + 2 * d_state, ("inner", None), rngs=rngs, use_bias=False,
                            kernel_init=torch_uniform(d_inner), dtype=dtype)
        dt_std = dt_rank**-0.5
        self.dt_proj = dense(
            dt_rank, d_inner, (None, "inner"), rngs=rngs, dtype=dtype,
            kernel_init=lambda k, s, d: jax.random.uniform(k, s, d, -dt_std, dt_std))
        self.dt_proj.bias.set_value(_dt_bias_init(rngs.params(), d_inner))
        self.A_log = nnx.Param(_a_log_init(a_init, d_inner, d_state), logical_axes=("inner", None))
        self.D = nnx.Param(jnp.ones((d_inner,), jnp.float32), logical_axes=("inner",))
        self.dt_rank, self.d_state = dt_rank, d_state

    def scan_inputs(self, x: jax.Array, reverse: bool = False) -> ScanDirection:
        """x: (batch, length, d_inner) in token order -> this direction's scan inputs, in token order.

        ``reverse``: the direction reads the sequence from the last token to the first, so its convolution
        looks at the following tokens instead of the preceding ones.
        """
        with jax.named_scope("conv1d"):
            x = jax.nn.silu(causal_depthwise_conv(x, self.conv_kernel[...], self.conv_bias[...], reverse=reverse))
        with jax.named_scope("x_proj"):
            dt, B, C = jnp.split(self.x_proj(x), [self.dt_rank, self.dt_rank + self.d_state], axis=-1)
            delta = dt @ self.dt_proj.kernel[...].astype(dt.dtype)
        return ScanDirection(x, delta, -jnp.exp(self.A_log[...]), B, C, self.D[...], self.dt_proj.bias[...])


def causal_depthwise_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, reverse: bool = False,
                          prefix: jax.Array | None = None) -> jax.Array:
    """Depthwise 1-D convolution over length: output t sees inputs t-d_conv+1..t (``reverse``: t+d_conv-1..t).

    x: (batch, length, channels); kernel: (d_conv, channels), tap d_conv-1 multiplies the current token and
    tap i the token d_conv-1-i steps before it (after it when ``reverse``), so ``reverse`` equals the causal
    convolution of the flipped sequence, flipped back. ``prefix`` (batch, d_conv-1, channels): the inputs
    before x (zeros when None; causal direction only), as a decoding cache holds them.
    """
    d_conv, length = kernel.shape[0], x.shape[1]
    if prefix is not None:
        padded = jnp.concatenate([prefix.astype(x.dtype), x], axis=1)
    else:
        pad = (0, d_conv - 1) if reverse else (d_conv - 1, 0)
        padded = jnp.pad(x, ((0, 0), pad, (0, 0)))
    kernel = kernel.astype(x.dtype)
    taps = [padded[:, i : i + length] * kernel[d_conv - 1 - i if reverse else i] for i in range(d_conv)]
    return sum(taps) + bias.astype(x.dtype)


class Mamba(nnx.Module):
    """Mamba-1 mixer. ``bidirectional=True`` is Vim's "v2": a second SSM on the reversed sequence whose
    output is re-reversed, summed with the forward one and halved before out_proj."""

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        bidirectional: bool = True,
        a_init: str = "s4d",
        scan_impl: str = "auto",
        scan_blocks: BlockSizes | None = None,
        name_scan_residuals: bool = False,
        num_layers_for_init: int = 1,
        dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        d_inner = expand * d_model
        dt_rank = dt_rank or math.ceil(d_model / 16)
        self.d_inner, self.bidirectional, self.scan_impl = d_inner, bidirectional, scan_impl
        self.scan_blocks, self.name_scan_residuals = scan_blocks, name_scan_residuals
        self.in_proj = dense(d_model, 2 * d_inner, ("embed", "inner"), rngs=rngs, use_bias=False,
                             kernel_init=torch_uniform(d_model), dtype=dtype)
        self.fwd = SSMDirection(d_inner, d_state, dt_rank, d_conv, a_init, rngs=rngs, dtype=dtype)
        self.bwd = (SSMDirection(d_inner, d_state, dt_rank, d_conv, a_init, rngs=rngs, dtype=dtype)
                    if bidirectional else None)
        # Vim rescales out_proj by 1/sqrt(n_layer) (GPT-2 style prenorm-residual init).
        out_scale = 1.0 / math.sqrt(num_layers_for_init)
        base = torch_uniform(d_inner)
        self.out_proj = dense(d_inner, d_model, ("inner", "embed"), rngs=rngs, use_bias=False,
                              kernel_init=lambda k, s, d: base(k, s, d) * out_scale, dtype=dtype)

    def __call__(self, hidden: jax.Array) -> tuple[jax.Array, SSMProjections]:
        """hidden: (batch, length, d_model) -> output (batch, length, d_model) and the B/C projections."""
        with jax.named_scope("in_proj"):
            x, z = self._in_proj(hidden)
        fwd = self.fwd.scan_inputs(x)
        if self.bwd is None:
            projections, dirs = SSMProjections(fwd.B, fwd.C), (fwd,)
        else:  # both directions in token order; the backward one is scanned last-to-first (no flipped copies)
            bwd = self.bwd.scan_inputs(x, reverse=True)
            projections, dirs = SSMProjections(fwd.B, fwd.C, bwd.B, bwd.C), (fwd, bwd)
        y = self._scan(dirs, z)
        with jax.named_scope("out_proj"):
            return self.out_proj(y if self.bwd is None else y * 0.5), projections

    def implicit_attention(self, hidden: jax.Array) -> jax.Array:
        """hidden: (batch, length, d_model) -> (batch, length t, length s) float32: the weight the scan puts on
        input s in output t, averaged over channels and summed over the directions (before their halving, the D
        skip and the gate)."""
        x, _ = self._in_proj(hidden)
        dirs = [(self.fwd.scan_inputs(x), False)] + ([(self.bwd.scan_inputs(x, reverse=True), True)]
                                                     if self.bwd is not None else [])
        return sum(implicit_attention(d.delta, d.A, d.B, d.C, reverse=reverse, delta_bias=d.delta_bias,
                                      delta_softplus=True) for d, reverse in dirs)

    def _in_proj(self, hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x and z, (batch, length, d_inner) each: ``hidden`` times each half of in_proj's kernel. Two matmuls, so
        that neither pass slices the (batch, length, 2 d_inner) product nor concatenates its gradient."""
        hidden, kernel = nnx.nn.dtypes.promote_dtype((hidden, self.in_proj.kernel[...]), dtype=self.in_proj.dtype)
        return hidden @ kernel[:, :self.d_inner], hidden @ kernel[:, self.d_inner:]

    def _scan(self, dirs: tuple[ScanDirection, ...], z: jax.Array) -> jax.Array:
        """The gated scan of one direction, or of Vim's two (the second read last-to-first). A Pallas kernel is a
        custom call the SPMD partitioner cannot split, so under a mesh it runs once per device on its shard:
        batch over the data-parallel axes, d_inner over the axis of the "inner" logical rule."""

        def scan(dirs, z):
            if len(dirs) == 2:
                return selective_scan_bidirectional(*dirs, z, delta_softplus=True, impl=self.scan_impl,
                                                    blocks=self.scan_blocks, name_residuals=self.name_scan_residuals)
            d = dirs[0]
            return selective_scan(d.u, d.delta, d.A, d.B, d.C, D=d.D, z=z, delta_bias=d.delta_bias,
                                  delta_softplus=True, impl=self.scan_impl, blocks=self.scan_blocks,
                                  name_residuals=self.name_scan_residuals)

        with jax.named_scope("selective_scan"):
            return self._scan_per_device(scan, dirs, z)

    def _scan_per_device(self, scan: Callable, dirs: tuple[ScanDirection, ...], z: jax.Array) -> jax.Array:
        batch, _, d_inner = z.shape
        rows = sharding.split_axes(batch, sharding.BATCH_AXES)
        channels = sharding.split_axes(d_inner, (sharding.LOGICAL_RULES["inner"],))
        if not resolve_impl(self.scan_impl).startswith("pallas") or (rows is None and channels is None):
            return scan(dirs, z)
        act, seq, per_channel = P(rows, None, channels), P(rows, None, None), P(channels)
        direction = ScanDirection(act, act, P(channels, None), seq, seq, per_channel, per_channel)
        return sharding.call_per_device(scan, (dirs, z), ((direction,) * len(dirs), act), act)

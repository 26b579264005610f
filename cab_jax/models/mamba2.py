"""Discrete Mamba-2 mixer of Phi-Mamba (the MOHAWK / CAB language student).

One input projection gives, per token, ``xBC`` (the SSM input x, then B and C), the gate ``z`` and one
scalar ``a`` per value head. ``xBC`` goes through a depthwise causal convolution (identity activation by
default); x is split into ``n_v_heads`` heads, B and C into ``n_qk_heads`` heads of ``d_state``, and the scan
is h_t = exp(-softplus(a_t)) h_{t-1} + outer(x_t, B_t), y_t = h_t C_t + D x_t (value head h reads B, C head
h // (n_v_heads // n_qk_heads)). The output is out_proj(y * silu(z + z_bias)).

B and C (after the convolution) are returned for the attention bridge, which maps them onto the teacher's
keys and queries.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cab_jax.kernels.ssd import SSD_IMPLS, ssd, ssd_step
from cab_jax.kernels.ssd.implicit_attention import implicit_attention
from cab_jax.models.layers import Dtype, dense, torch_uniform
from cab_jax.models.mamba import causal_depthwise_conv

CONV_ACTIVATIONS = ("identity", "silu")


class Mamba2Cache(NamedTuple):
    """What decoding keeps per layer; its size does not grow with the context."""

    conv: jax.Array  # (batch, d_conv - 1, conv_dim): the last d_conv - 1 convolution inputs (xBC).
    ssm: jax.Array  # (batch, n_v_heads, head_dim, d_state) float32: the SSM state after the last token.


def torch_linear(in_features: int, out_features: int, axes: tuple[str | None, str | None], *, rngs: nnx.Rngs,
                 use_bias: bool = True, dtype: Dtype = jnp.float32) -> nnx.Linear:
    """``dense`` with PyTorch's default nn.Linear init for the kernel and the bias."""
    layer = dense(in_features, out_features, axes, rngs=rngs, use_bias=use_bias,
                  kernel_init=torch_uniform(in_features), dtype=dtype)
    if use_bias:
        layer.bias.set_value(torch_uniform(in_features)(rngs.params(), (out_features,)))
    return layer


def log_decay(a: jax.Array) -> jax.Array:
    """float32 per-token, per-head log decay -softplus(a): dt = softplus(a) with A = -1 (a is "A_log")."""
    return -jax.nn.softplus(a.astype(jnp.float32))


class DiscreteMamba2(nnx.Module):
    """Phi-Mamba's mixer (no biases in in_proj/out_proj, conv with bias, ``z_bias``, D per value head)."""

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 64,
        n_qk_heads: int = 32,
        n_v_heads: int = 32,
        expand: int = 1,
        d_conv: int = 4,
        conv_activation: str = "identity",
        ssd_impl: str = "auto",
        chunk_size: int = 128,
        dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        d_inner = expand * d_model
        if d_inner % n_v_heads:
            raise ValueError(f"d_inner = expand * d_model = {expand} * {d_model} = {d_inner} is not divisible by "
                             f"n_v_heads {n_v_heads}")
        if n_v_heads % n_qk_heads:
            raise ValueError(f"n_v_heads {n_v_heads} is not a multiple of n_qk_heads {n_qk_heads}")
        if conv_activation not in CONV_ACTIVATIONS:
            raise ValueError(f"unknown conv_activation {conv_activation!r}; expected one of {CONV_ACTIVATIONS}")
        if ssd_impl not in SSD_IMPLS:
            raise ValueError(f"unknown ssd_impl {ssd_impl!r}; expected one of {SSD_IMPLS}")
        if d_conv < 1 or chunk_size < 1:
            raise ValueError(f"d_conv ({d_conv}) and chunk_size ({chunk_size}) must be positive")
        self.d_inner, self.d_state, self.d_conv = d_inner, d_state, d_conv
        self.n_qk_heads, self.n_v_heads, self.head_dim = n_qk_heads, n_v_heads, d_inner // n_v_heads
        self.conv_dim = d_inner + 2 * n_qk_heads * d_state
        self.conv_activation, self.ssd_impl, self.chunk_size, self.dtype = conv_activation, ssd_impl, chunk_size, dtype
        # Columns: [x (d_inner) | B (n_qk_heads * d_state) | C (same) | z (d_inner) | a (n_v_heads)].
        self.in_proj = torch_linear(d_model, self.conv_dim + d_inner + n_v_heads, ("embed", "inner"), rngs=rngs,
                                    use_bias=False, dtype=dtype)
        self.z_bias = nnx.Param(jnp.zeros((d_inner,), jnp.float32), logical_axes=("inner",))
        conv_init = torch_uniform(d_conv)  # Depthwise Conv1d: fan_in = kernel size.
        self.conv_kernel = nnx.Param(conv_init(rngs.params(), (d_conv, self.conv_dim)), logical_axes=(None, "inner"))
        self.conv_bias = nnx.Param(conv_init(rngs.params(), (self.conv_dim,)), logical_axes=("inner",))
        self.D = nnx.Param(jnp.ones((n_v_heads,), jnp.float32), logical_axes=(None,))
        self.out_proj = torch_linear(d_inner, d_model, ("inner", "embed"), rngs=rngs, use_bias=False, dtype=dtype)

    def init_cache(self, batch: int, dtype: Dtype | None = None) -> Mamba2Cache:
        """Empty cache: zero convolution inputs (in ``dtype``, default the compute dtype), zero float32 state."""
        return Mamba2Cache(
            jnp.zeros((batch, self.d_conv - 1, self.conv_dim), dtype or self.dtype),
            jnp.zeros((batch, self.n_v_heads, self.head_dim, self.d_state), jnp.float32),
        )

    def _project(self, hidden: jax.Array, conv_prefix: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
        """(x, B, C, z, log_decay, the conv inputs xBC) for hidden (batch, length, d_model)."""
        batch, length, _ = hidden.shape
        xbc, z, a = jnp.split(self.in_proj(hidden.astype(self.dtype)), [self.conv_dim, self.conv_dim + self.d_inner],
                              axis=-1)
        conv = causal_depthwise_conv(xbc, self.conv_kernel[...], self.conv_bias[...], prefix=conv_prefix)
        if self.conv_activation == "silu":
            conv = jax.nn.silu(conv)
        qk = self.n_qk_heads * self.d_state
        x, B, C = jnp.split(conv, [self.d_inner, self.d_inner + qk], axis=-1)
        x = x.reshape(batch, length, self.n_v_heads, self.head_dim)
        B = B.reshape(batch, length, self.n_qk_heads, self.d_state)
        C = C.reshape(batch, length, self.n_qk_heads, self.d_state)
        return x, B, C, z, log_decay(a), xbc

    def _output(self, y: jax.Array, z: jax.Array) -> jax.Array:
        y = y.reshape(*y.shape[:2], self.d_inner).astype(self.dtype)
        return self.out_proj(y * jax.nn.silu(z + self.z_bias[...].astype(z.dtype)))

    def implicit_attention(self, hidden: jax.Array) -> jax.Array:
        """hidden (batch, length, d_model) -> (batch, length t, length s) float32: the weight the scan puts on
        input s in output t, averaged over heads (before the D skip and the gate)."""
        prefix = jnp.zeros((hidden.shape[0], self.d_conv - 1, self.conv_dim), self.dtype)
        _, B, C, _, decay, _ = self._project(hidden, prefix)
        return implicit_attention(decay, B, C)

    def __call__(self, hidden: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """hidden (batch, length, d_model) -> output (batch, length, d_model) and B, C, each
        (batch, length, n_qk_heads, d_state), taken after the convolution."""
        prefix = jnp.zeros((hidden.shape[0], self.d_conv - 1, self.conv_dim), self.dtype)
        x, B, C, z, decay, _ = self._project(hidden, prefix)
        y = ssd(x, decay, B, C, self.D[...], chunk_size=self.chunk_size, impl=self.ssd_impl)
        return self._output(y, z), B, C

    def decode(self, hidden: jax.Array, cache: Mamba2Cache) -> tuple[jax.Array, Mamba2Cache]:
        """hidden (batch, n, d_model): n >= 1 tokens continuing the cached context -> output and new cache.

        n == 1 takes one recurrence step; longer inputs (prefill) run the chunked scan from the cached state.
        """
        x, B, C, z, decay, xbc = self._project(hidden, cache.conv)
        conv_inputs = jnp.concatenate([cache.conv.astype(xbc.dtype), xbc], axis=1)
        conv_state = conv_inputs[:, conv_inputs.shape[1] - (self.d_conv - 1):].astype(cache.conv.dtype)
        if hidden.shape[1] == 1:
            y, state = ssd_step(cache.ssm, x[:, 0], decay[:, 0], B[:, 0], C[:, 0], self.D[...])
            y = y[:, None]
        else:
            y, state = ssd(x, decay, B, C, self.D[...], initial_state=cache.ssm, return_final_state=True,
                           chunk_size=self.chunk_size, impl=self.ssd_impl)
        return self._output(y, z), Mamba2Cache(conv_state, state.astype(jnp.float32))

"""Phi-1.5 language teacher (Hugging Face ``PhiForCausalLM`` layout, layers stacked and scanned): logits, per-layer
(q, k), KV-cache decoding.

One LayerNorm per block feeds attention and MLP in parallel: ``x + attn(ln(x)) + mlp(ln(x))``. Rotary position
embedding (rotate-half form) on the first ``partial_rotary_factor * head_dim`` dimensions of each head's q and k;
tanh-approximated GELU ("gelu_new"); biases everywhere; separate (untied) embedding and LM head.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cab_jax.models.layers import Dtype, build_stacked, check_tokens, dense, layer_norm, scan_layers

normal_02 = nnx.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class PhiSize:
    vocab_size: int
    hidden_size: int
    depth: int
    num_heads: int
    intermediate_size: int
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5


PHI_SIZES = {"phi_1_5": PhiSize(51200, 2048, 24, 32, 8192)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys (after rotary) and values of every layer, each (depth, batch, heads, max_length, head_dim), and the
    number of positions filled so far (an int32 scalar); positions >= ``length`` hold garbage and are never
    attended."""

    keys: jax.Array
    values: jax.Array
    length: jax.Array

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]


def rotary(x: jax.Array, positions: jax.Array, rotary_dim: int, theta: float) -> jax.Array:
    """Rotate-half RoPE on the first ``rotary_dim`` features of ``x`` (..., length, head_dim) at ``positions``
    (length,); the remaining features pass through. Angles and products in float32."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq  # (length, rotary_dim / 2)
    angles = jnp.concatenate([angles, angles], axis=-1)
    rot, rest = x[..., :rotary_dim].astype(jnp.float32), x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    rot = rot * jnp.cos(angles) + rotated * jnp.sin(angles)
    return jnp.concatenate([rot.astype(x.dtype), rest], axis=-1)


class PhiAttention(nnx.Module):
    """Causal multi-head attention with partial rotary embedding; softmax in float32."""

    def __init__(self, dim: int, num_heads: int, rotary_dim: int, rope_theta: float, *, rngs: nnx.Rngs,
                 dtype: Dtype):
        self.num_heads, self.rotary_dim, self.rope_theta = num_heads, rotary_dim, rope_theta
        self.q = dense(dim, dim, ("embed", "heads"), rngs=rngs, dtype=dtype, kernel_init=normal_02)
        self.k = dense(dim, dim, ("embed", "heads"), rngs=rngs, dtype=dtype, kernel_init=normal_02)
        self.v = dense(dim, dim, ("embed", "heads"), rngs=rngs, dtype=dtype, kernel_init=normal_02)
        self.dense = dense(dim, dim, ("heads", "embed"), rngs=rngs, dtype=dtype, kernel_init=normal_02)

    def __call__(self, x: jax.Array, positions: jax.Array, kv: tuple[jax.Array, jax.Array] | None = None,
                 start: jax.Array | int = 0
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
        """``x`` (batch, n, dim) at ``positions`` (n,). Without ``kv`` attends causally within ``x``; with ``kv``
        (cached keys, values) writes this step's keys/values at ``start`` and attends to the cache.
        Returns the output, (q, k) of this step after rotary, and the keys/values attended to."""
        batch, n, dim = x.shape
        head_dim = dim // self.num_heads

        def heads(t: jax.Array) -> jax.Array:  # (batch, n, dim) -> (batch, heads, n, head_dim)
            return t.reshape(batch, n, self.num_heads, head_dim).transpose(0, 2, 1, 3)

        q = rotary(heads(self.q(x)), positions, self.rotary_dim, self.rope_theta)
        k = rotary(heads(self.k(x)), positions, self.rotary_dim, self.rope_theta)
        v = heads(self.v(x))
        if kv is None:
            keys, values, key_positions = k, v, positions
        else:
            index = (0, 0, start, 0)
            keys = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), index)
            values = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), index)
            key_positions = jnp.arange(keys.shape[2])
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, keys.astype(q.dtype), preferred_element_type=jnp.float32)
        logits = logits * head_dim**-0.5
        causal = key_positions[None, :] <= positions[:, None]
        logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bhkd->bhqd", weights, values.astype(v.dtype))
        return self.dense(out.transpose(0, 2, 1, 3).reshape(batch, n, dim)), (q, k), (keys, values)


def normal_02_linear(in_features: int, out_features: int, axes: tuple[str | None, str | None], *, rngs: nnx.Rngs,
                     dtype: Dtype) -> nnx.Linear:
    return dense(in_features, out_features, axes, rngs=rngs, dtype=dtype, kernel_init=normal_02)


class PhiMlp(nnx.Module):
    """fc2(gelu_tanh(fc1(x))), both with bias (Phi's "gelu_new" MLP). ``linear`` makes each layer (its init)."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: Dtype, linear=normal_02_linear):
        self.fc1 = linear(dim, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = linear(hidden, dim, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class PhiBlock(nnx.Module):
    """Parallel block: one LayerNorm feeding both attention and MLP, both added to the residual."""

    def __init__(self, dim: int, num_heads: int, intermediate: int, rotary_dim: int, rope_theta: float, eps: float,
                 *, rngs: nnx.Rngs, dtype: Dtype):
        self.input_layernorm = layer_norm(dim, eps, rngs=rngs, dtype=dtype)
        self.attn = PhiAttention(dim, num_heads, rotary_dim, rope_theta, rngs=rngs, dtype=dtype)
        self.mlp = PhiMlp(dim, intermediate, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, positions: jax.Array, kv: tuple[jax.Array, jax.Array] | None = None,
                 start: jax.Array | int = 0):
        h = self.input_layernorm(x)
        y, qk, kv = self.attn(h, positions, kv, start)
        return x + y + self.mlp(h), qk, kv


class Phi(nnx.Module):
    """Phi causal language model (``PhiForCausalLM``): token embedding, parallel blocks, final LayerNorm, LM head."""

    def __init__(
        self,
        *,
        vocab_size: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        intermediate_size: int,
        partial_rotary_factor: float = 0.5,
        rope_theta: float = 10000.0,
        layer_norm_eps: float = 1e-5,
        remat: bool = False,
        dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        """``remat``: recompute each block in the backward pass (training the teacher; a frozen teacher's forward
        keeps nothing for a backward pass anyway)."""
        if depth < 1:
            raise ValueError(f"depth must be positive, got {depth}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        head_dim = hidden_size // num_heads
        rotary_dim = int(head_dim * partial_rotary_factor)  # as Hugging Face rounds it
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"partial_rotary_factor {partial_rotary_factor} of head_dim {head_dim} gives "
                             f"{rotary_dim} rotary dimensions; expected an even number in (0, head_dim]")
        self.size = PhiSize(vocab_size, hidden_size, depth, num_heads, intermediate_size, partial_rotary_factor,
                            rope_theta, layer_norm_eps)
        self.embed = nnx.Embed(vocab_size, hidden_size, dtype=dtype, embedding_init=normal_02, rngs=rngs,
                               embedding_metadata={"logical_axes": ("vocab", "embed")})
        self.layers = build_stacked(
            lambda r: PhiBlock(hidden_size, num_heads, intermediate_size, rotary_dim, rope_theta, layer_norm_eps,
                               rngs=r, dtype=dtype),
            depth, rngs)
        self.final_layernorm = layer_norm(hidden_size, layer_norm_eps, rngs=rngs, dtype=dtype)
        self.lm_head = dense(hidden_size, vocab_size, ("embed", "vocab"), rngs=rngs, dtype=dtype,
                             kernel_init=normal_02)
        self.dtype, self.remat = dtype, remat

    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """tokens (batch, length) int -> float32 logits (batch, length, vocab) and every layer's (q, k), each
        stacked over layers: (depth, batch, heads, length, head_dim) in the compute dtype.

        q and k are what CAB's ``output_QK`` exposes: after the partial rotary embedding, before the
        1/sqrt(head_dim) scale and the softmax."""
        check_tokens(tokens)
        positions = jnp.arange(tokens.shape[1])
        step = lambda block, x, _: block(x, positions)[:2]
        x, qk = scan_layers(self.layers, step, self.embed(tokens), remat=self.remat)
        return self._logits(x), qk

    def init_cache(self, batch: int, max_length: int, dtype: Dtype | None = None) -> KVCache:
        """An empty cache for ``batch`` sequences of up to ``max_length`` tokens (default dtype: compute dtype)."""
        s = self.size
        zeros = jnp.zeros((s.depth, batch, s.num_heads, max_length, s.hidden_size // s.num_heads), dtype or self.dtype)
        return KVCache(zeros, jnp.zeros_like(zeros), jnp.zeros((), jnp.int32))

    def decode(self, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Run (batch, n) new tokens at positions cache.length .. cache.length + n - 1 (n >= 1: a prefill or one
        step), attending to everything cached; returns float32 logits (batch, n, vocab) and the updated cache.

        The cache arrays keep their size, so a jitted step has static shapes. Running past ``max_length`` raises
        when the length is known at trace time (eager calls); under ``jit`` the logits of such a call are NaN."""
        check_tokens(tokens)
        n = tokens.shape[1]
        if n > cache.max_length:
            raise ValueError(f"{n} tokens do not fit a KV cache of max_length {cache.max_length}")
        try:
            start = int(cache.length)
        except jax.errors.ConcretizationTypeError:  # traced under jit: checked through NaN logits below
            start = None
        if start is not None and start + n > cache.max_length:
            raise ValueError(f"positions {start}..{start + n - 1} are beyond the KV cache's max_length "
                             f"{cache.max_length}")
        positions = cache.length + jnp.arange(n)

        def step(block, x, kv):
            x, _, kv = block(x, positions, kv, cache.length)
            return x, kv

        x, (keys, values) = scan_layers(self.layers, step, self.embed(tokens), (cache.keys, cache.values))
        logits = jnp.where(cache.length + n > cache.max_length, jnp.nan, self._logits(x))
        return logits, KVCache(keys, values, cache.length + n)

    def _logits(self, x: jax.Array) -> jax.Array:
        return self.lm_head(self.final_layernorm(x)).astype(jnp.float32)

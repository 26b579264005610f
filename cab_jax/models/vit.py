"""DeiT / ViT teacher (timm layout, blocks stacked and scanned): returns logits and every block's attention
queries and keys."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cab_jax.models.layers import (
    Dtype,
    attention_weights,
    build_stacked,
    dense,
    drop_path,
    drop_path_rates,
    embed_tokens,
    layer_norm,
    scan_layers,
    split_key,
    token_params,
)

LN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class ViTSize:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


VIT_SIZES = {
    "tiny": ViTSize(192, 12, 3),
    "small": ViTSize(384, 12, 6),
    "base": ViTSize(768, 12, 12),
}


class Attention(nnx.Module):
    """Multi-head self-attention with separate q, k, v projections (timm's fused qkv is split on import)."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype: Dtype):
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = dense(dim, dim, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.k = dense(dim, dim, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.v = dense(dim, dim, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.proj = dense(dim, dim, ("heads", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads

        def heads(t: jax.Array) -> jax.Array:  # (batch, tokens, dim) -> (batch, heads, tokens, head_dim)
            return t.reshape(batch, tokens, self.num_heads, head_dim).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        weights = attention_weights(q, k).astype(v.dtype)
        out = jnp.einsum("bhqk,bhkd->bhqd", weights, v).transpose(0, 2, 1, 3).reshape(batch, tokens, dim)
        return self.proj(out), (q, k)


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: Dtype):
        self.fc1 = dense(dim, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = dense(hidden, dim, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
    """Pre-LN transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, rngs: nnx.Rngs, dtype: Dtype):
        self.norm1 = layer_norm(dim, LN_EPS, rngs=rngs, dtype=dtype)
        self.attn = Attention(dim, num_heads, rngs=rngs, dtype=dtype)
        self.norm2 = layer_norm(dim, LN_EPS, rngs=rngs, dtype=dtype)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, drop_rate: jax.Array, key: jax.Array | None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        key_attn, key_mlp = split_key(key, 2)
        y, qk = self.attn(self.norm1(x))
        x = x + drop_path(y, drop_rate, key_attn)
        x = x + drop_path(self.mlp(self.norm2(x)), drop_rate, key_mlp)
        return x, qk


class ViT(nnx.Module):
    """DeiT/ViT classifier: patch 16 (configurable), cls token first, learned position embedding."""

    def __init__(
        self,
        *,
        num_classes: int,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        _, self.patch_embed, self.cls_token, self.pos_embed = token_params(
            img_size, patch_size, in_chans, embed_dim, rngs=rngs, dtype=dtype)
        self.num_heads, self.depth = num_heads, depth
        self.drop_path_rates = drop_path_rates(drop_path_rate, depth)  # block i's rate
        self.blocks = build_stacked(lambda r: Block(embed_dim, num_heads, mlp_ratio, rngs=r, dtype=dtype), depth, rngs)
        self.norm = layer_norm(embed_dim, LN_EPS, rngs=rngs, dtype=dtype)
        self.head = dense(embed_dim, num_classes, ("embed", "classes"), rngs=rngs, dtype=dtype)
        self.dtype = dtype

    def __call__(self, images: jax.Array, *, key: jax.Array | None = None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Returns float32 logits (batch, classes) and every block's (q, k), each stacked over blocks:
        (depth, batch, heads, tokens, head_dim), taken before the 1/sqrt(head_dim) scale and the softmax.
        ``key`` draws the stochastic-depth masks (None: no drop path)."""
        x = embed_tokens(images, self.patch_embed, self.cls_token, self.pos_embed, 0, self.dtype)
        keys = None if key is None else jax.random.split(key, self.depth)
        step = lambda block, x, inputs: block(x, *inputs)
        x, qk = scan_layers(self.blocks, step, x, (jnp.asarray(self.drop_path_rates), keys))
        return self.head(self.norm(x)[:, 0]).astype(jnp.float32), qk

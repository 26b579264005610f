"""Small building blocks shared by the teacher and student models.

Parameters carry a ``logical_axes`` metadata tuple (one name per dimension); ``cab_jax.sharding`` maps
those names onto mesh axes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any
trunc_normal_02 = nnx.initializers.truncated_normal(stddev=0.02)


def dense(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    *,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    kernel_init=trunc_normal_02,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> nnx.Linear:
    """An ``nnx.Linear`` whose kernel and bias are tagged with logical axis names."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        kernel_init=kernel_init,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_metadata={"logical_axes": axes},
        bias_metadata={"logical_axes": (axes[1],)},
        rngs=rngs,
    )


def torch_uniform(fan_in: int):
    """PyTorch's default Linear/Conv1d init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kernel and bias alike)."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def param(init, rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype=jnp.float32):
    """A float parameter made by ``init(key, shape, dtype)`` and tagged with logical axes."""
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


def drop_path(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Stochastic depth: zero whole samples with probability ``rate`` (identity when ``key`` is None)."""
    if key is None or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def split_key(key: jax.Array | None, num: int) -> list[jax.Array | None]:
    """``jax.random.split`` that passes ``None`` (deterministic mode) through."""
    if key is None:
        return [None] * num
    return list(jax.random.split(key, num))


class PatchEmbed(nnx.Module):
    """Non-overlapping patches via a strided convolution; NHWC in, (batch, patches, dim) out."""

    def __init__(self, patch_size: int, in_chans: int, dim: int, *, rngs: nnx.Rngs, dtype: Dtype,
                 param_dtype: Dtype = jnp.float32):
        self.patch_size = patch_size
        self.proj = nnx.Conv(
            in_chans, dim, kernel_size=(patch_size, patch_size), strides=(patch_size, patch_size),
            padding="VALID", dtype=dtype, param_dtype=param_dtype, kernel_init=trunc_normal_02,
            kernel_metadata={"logical_axes": (None, None, None, "embed")},
            bias_metadata={"logical_axes": ("embed",)}, rngs=rngs,
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        if images.ndim != 4 or images.shape[1] % self.patch_size or images.shape[2] % self.patch_size:
            raise ValueError(
                f"expected images (batch, H, W, C) with H, W multiples of {self.patch_size}, got {images.shape}"
            )
        x = self.proj(images)
        return x.reshape(x.shape[0], -1, x.shape[-1])


def token_params(img_size: int, patch_size: int, in_chans: int, dim: int, *, rngs: nnx.Rngs, dtype: Dtype
                 ) -> tuple[int, PatchEmbed, nnx.Param, nnx.Param]:
    """(num_patches, patch embedding, cls token, position embedding over patches + cls) of a ViT-style model."""
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    num_patches = (img_size // patch_size) ** 2
    return (num_patches, PatchEmbed(patch_size, in_chans, dim, rngs=rngs, dtype=dtype),
            param(trunc_normal_02, rngs, (1, 1, dim), (None, None, "embed")),
            param(trunc_normal_02, rngs, (1, num_patches + 1, dim), (None, None, "embed")))


def embed_tokens(images: jax.Array, patch_embed: PatchEmbed, cls_token: nnx.Param, pos_embed: nnx.Param,
                 cls_position: int, dtype: Dtype) -> jax.Array:
    """Patch tokens with the cls token inserted at ``cls_position``, plus the position embedding."""
    x = patch_embed(images.astype(dtype))
    cls = jnp.broadcast_to(cls_token[...], (x.shape[0], 1, x.shape[-1])).astype(x.dtype)
    x = jnp.concatenate([x[:, :cls_position], cls, x[:, cls_position:]], axis=1)
    return x + pos_embed[...].astype(x.dtype)

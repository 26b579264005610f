"""Vision Mamba (Vim) student: patch embedding, middle cls token, bidirectional Mamba blocks, head."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cab_jax.kernels.selective_scan import BlockSizes
from cab_jax.models.layers import Dtype, dense, drop_path, embed_tokens, split_key, token_params
from cab_jax.models.mamba import Mamba, SSMProjections


@dataclasses.dataclass(frozen=True)
class VimSize:
    embed_dim: int
    depth: int = 24


VIM_SIZES = {"tiny": VimSize(192), "small": VimSize(384), "base": VimSize(768)}


def rms_norm(dim: int, *, rngs: nnx.Rngs) -> nnx.RMSNorm:
    """RMSNorm in float32 (Vim keeps the residual stream and its norms in float32)."""
    return nnx.RMSNorm(dim, epsilon=1e-5, dtype=jnp.float32, rngs=rngs,
                       scale_metadata={"logical_axes": ("embed",)})


class VimBlock(nnx.Module):
    """Vim's block ordering: residual += drop_path(hidden); hidden = mixer(norm(residual))."""

    def __init__(self, dim: int, mixer: Mamba, drop_path_rate: float, *, rngs: nnx.Rngs):
        self.norm = rms_norm(dim, rngs=rngs)
        self.mixer = mixer
        self.drop_path = drop_path_rate

    def __call__(self, hidden: jax.Array, residual: jax.Array | None, key: jax.Array | None
                 ) -> tuple[jax.Array, jax.Array, SSMProjections]:
        if residual is None:
            residual = hidden.astype(jnp.float32)
        else:
            residual = residual + drop_path(hidden, self.drop_path, key).astype(jnp.float32)
        hidden, proj = self.mixer(self.norm(residual).astype(hidden.dtype))
        return hidden, residual, proj


class Vim(nnx.Module):
    """Vim with the cls token inserted at index num_patches // 2 and the head reading that token."""

    def __init__(
        self,
        *,
        num_classes: int,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        bidirectional: bool = True,
        a_init: str = "s4d",
        scan_impl: str = "auto",
        scan_blocks: BlockSizes | None = None,
        drop_path_rate: float = 0.0,
        remat: bool = False,
        dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        num_patches, self.patch_embed, self.cls_token, self.pos_embed = token_params(
            img_size, patch_size, in_chans, embed_dim, rngs=rngs, dtype=dtype)
        self.cls_position = num_patches // 2
        self.dtype, self.remat = dtype, remat
        # As in Vim: block i gets ([0] + linspace(0, rate, depth))[i]; the first block has no residual input.
        # NumPy, not jnp: the rates are Python floats even when the model is built under a trace (eval_shape, jit).
        rates = [0.0, *[float(r) for r in np.linspace(0.0, drop_path_rate, depth, dtype=np.float32)][:depth - 1]]
        self.layers = nnx.List([
            VimBlock(
                embed_dim,
                Mamba(embed_dim, d_state=d_state, d_conv=d_conv, expand=expand, bidirectional=bidirectional,
                      a_init=a_init, scan_impl=scan_impl, scan_blocks=scan_blocks, num_layers_for_init=depth,
                      dtype=dtype, rngs=rngs),
                rate, rngs=rngs)
            for rate in rates
        ])
        self.norm_f = rms_norm(embed_dim, rngs=rngs)
        self.head = dense(embed_dim, num_classes, ("embed", "classes"), rngs=rngs, dtype=dtype)

    def embed(self, images: jax.Array) -> jax.Array:
        """Patches with the cls token inserted in the middle, plus the position embedding."""
        return embed_tokens(images, self.patch_embed, self.cls_token, self.pos_embed, self.cls_position, self.dtype)

    def __call__(self, images: jax.Array, *, key: jax.Array | None = None
                 ) -> tuple[jax.Array, list[SSMProjections]]:
        """Returns float32 logits (batch, classes) and each layer's SSM projections (B, C, B_b, C_b)."""
        hidden, residual = self.embed(images), None
        apply = lambda blk, h, r, k: blk(h, r, k)
        if self.remat:
            apply = nnx.remat(apply)
        projections = []
        for layer, layer_key in zip(self.layers, split_key(key, len(self.layers)), strict=True):
            hidden, residual, proj = apply(layer, hidden, residual, layer_key)
            projections.append(proj)
        features = self.norm_f(residual + hidden.astype(jnp.float32))
        return self.head(features[:, self.cls_position].astype(self.dtype)).astype(jnp.float32), projections


def vim(size: str, **kwargs) -> Vim:
    """Named Vim size ("tiny", "small", "base"); keyword arguments override the size's fields."""
    if size not in VIM_SIZES:
        raise ValueError(f"unknown Vim size {size!r}; expected one of {sorted(VIM_SIZES)}")
    return Vim(**{**dataclasses.asdict(VIM_SIZES[size]), **kwargs})

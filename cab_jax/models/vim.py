"""Vision Mamba (Vim) student: patch embedding, middle cls token, bidirectional Mamba blocks (stacked and
scanned), head."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cab_jax.kernels.selective_scan import SCAN_RESIDUALS, BlockSizes
from cab_jax.models.layers import (
    Dtype,
    build_stacked,
    dense,
    drop_path,
    drop_path_rates,
    embed_tokens,
    scan_layers,
    token_params,
)
from cab_jax.models.mamba import Mamba, SSMProjections


@dataclasses.dataclass(frozen=True)
class VimSize:
    embed_dim: int
    depth: int = 24


VIM_SIZES = {"tiny": VimSize(192), "small": VimSize(384), "base": VimSize(768)}
# What remat keeps of a layer's forward pass, by policy: nothing ("full": the backward pass runs the whole layer
# again, the scan kernel's forward included), or the scan kernel's output and saved states ("save_scan": the
# backward pass recomputes the projections, the convolution and the norm, not the scan).
REMAT_POLICIES = {"full": (), "save_scan": (SCAN_RESIDUALS,)}


def rms_norm(dim: int, *, rngs: nnx.Rngs) -> nnx.RMSNorm:
    """RMSNorm in float32 (Vim keeps the residual stream and its norms in float32)."""
    return nnx.RMSNorm(dim, epsilon=1e-5, dtype=jnp.float32, rngs=rngs,
                       scale_metadata={"logical_axes": ("embed",)})


class VimBlock(nnx.Module):
    """Vim's block ordering: residual += drop_path(hidden); hidden = mixer(norm(residual)). The first block
    gets a zero residual (Vim's "no residual yet": the sum is the embedding itself)."""

    def __init__(self, dim: int, mixer: Mamba, *, rngs: nnx.Rngs):
        self.norm = rms_norm(dim, rngs=rngs)
        self.mixer = mixer

    def __call__(self, hidden: jax.Array, residual: jax.Array, drop_rate: jax.Array, key: jax.Array | None
                 ) -> tuple[jax.Array, jax.Array, SSMProjections]:
        normed, residual = self.mixer_input(hidden, residual, drop_rate, key)
        hidden, proj = self.mixer(normed)
        return hidden, residual, proj

    def mixer_input(self, hidden: jax.Array, residual: jax.Array, drop_rate: jax.Array, key: jax.Array | None
                    ) -> tuple[jax.Array, jax.Array]:
        """(the mixer's input, the new residual)."""
        with jax.named_scope("norm_residual"):
            residual = residual + drop_path(hidden, drop_rate, key).astype(jnp.float32)
            return self.norm(residual).astype(hidden.dtype), residual


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
        remat_policy: str = "full",
        dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        num_patches, self.patch_embed, self.cls_token, self.pos_embed = token_params(
            img_size, patch_size, in_chans, embed_dim, rngs=rngs, dtype=dtype)
        self.cls_position = num_patches // 2
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat_policy!r}; expected one of {tuple(REMAT_POLICIES)}")
        self.dtype, self.remat, self.depth = dtype, remat, depth
        self.remat_saved = REMAT_POLICIES[remat_policy]
        # As in Vim: block i gets ([0] + linspace(0, rate, depth))[i]; the first block has no residual input.
        self.drop_path_rates = (0.0, *drop_path_rates(drop_path_rate, depth)[:depth - 1])
        self.layers = build_stacked(
            lambda r: VimBlock(
                embed_dim,
                Mamba(embed_dim, d_state=d_state, d_conv=d_conv, expand=expand, bidirectional=bidirectional,
                      a_init=a_init, scan_impl=scan_impl, scan_blocks=scan_blocks,
                      name_scan_residuals=SCAN_RESIDUALS in self.remat_saved, num_layers_for_init=depth,
                      dtype=dtype, rngs=r),
                rngs=r),
            depth, rngs)
        self.norm_f = rms_norm(embed_dim, rngs=rngs)
        self.head = dense(embed_dim, num_classes, ("embed", "classes"), rngs=rngs, dtype=dtype)

    def embed(self, images: jax.Array) -> jax.Array:
        """Patches with the cls token inserted in the middle, plus the position embedding."""
        return embed_tokens(images, self.patch_embed, self.cls_token, self.pos_embed, self.cls_position, self.dtype)

    def __call__(self, images: jax.Array, *, key: jax.Array | None = None) -> tuple[jax.Array, SSMProjections]:
        """Returns float32 logits (batch, classes) and every layer's SSM projections (B, C, B_b, C_b), each
        stacked over layers: (depth, batch, tokens, d_state). ``key`` draws the stochastic-depth masks."""
        with jax.named_scope("patch_embed"):
            hidden = self.embed(images)
        keys = None if key is None else jax.random.split(key, self.depth)

        def step(block, carry, inputs):
            hidden, residual, proj = block(*carry, *inputs)
            return (hidden, residual), proj

        carry = (hidden, jnp.zeros(hidden.shape, jnp.float32))
        (hidden, residual), projections = scan_layers(
            self.layers, step, carry, (jnp.asarray(self.drop_path_rates), keys), remat=self.remat,
            saved=self.remat_saved)
        with jax.named_scope("head"):
            features = self.norm_f(residual + hidden.astype(jnp.float32))
            return self.head(features[:, self.cls_position].astype(self.dtype)).astype(jnp.float32), projections

    def implicit_attention(self, images: jax.Array) -> jax.Array:
        """(depth, batch, tokens t, tokens s) float32: each layer's ``Mamba.implicit_attention`` (tokens in the
        student's order, the cls token in the middle), without stochastic depth. Each layer is recomputed in the
        backward pass whatever ``remat`` says: kept, its factors ((batch, tokens, channel block, d_state) floats per
        block of inputs and of channels) are several GiB per layer at Vim-S's batch 128."""
        hidden = self.embed(images)

        def step(block, carry, rate):
            normed, residual = block.mixer_input(*carry, rate, None)
            hidden, _ = block.mixer(normed)
            return (hidden, residual), block.mixer.implicit_attention(normed)

        carry = (hidden, jnp.zeros(hidden.shape, jnp.float32))
        return scan_layers(self.layers, step, carry, jnp.zeros((self.depth,)), remat=True)[1]

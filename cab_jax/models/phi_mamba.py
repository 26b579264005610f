"""Phi-Mamba: Phi-1.5's architecture with each attention replaced by a discrete Mamba-2 mixer (layers stacked and
scanned), and its initialisation from a Phi teacher's attention.

Token embedding, ``depth`` parallel Phi blocks (x + mixer(LN(x)) + mlp(LN(x))), final LayerNorm and an LM
head with bias. The residual stream is kept in float32. ``init_from_attention`` starts the student from a
Phi teacher (MOHAWK / CAB): V, K, Q projections into the mixer's x, B, C input columns, the attention output
projection into out_proj, and the MLPs, norms, embedding and LM head copied.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cab_jax.models.layers import Dtype, build_stacked, check_tokens, layer_norm, scan_layers
from cab_jax.models.mamba2 import DiscreteMamba2, Mamba2Cache, torch_linear
from cab_jax.models.phi import Phi, PhiMlp


@dataclasses.dataclass(frozen=True)
class PhiMambaSize:
    vocab_size: int
    d_model: int
    depth: int
    d_state: int = 64
    n_qk_heads: int = 32
    n_v_heads: int = 32
    expand: int = 1
    d_conv: int = 4
    intermediate_size: int | None = None  # None: 4 * d_model.


# The paper's student (goombalab/phi-mamba and CAB assets/sample_config.json).
PHI_MAMBA_SIZES = {"phi_mamba_1_5": PhiMambaSize(51200, 2048, 24)}


class PhiMambaBlock(nnx.Module):
    """Phi's parallel block: x + mixer(LN(x)) + mlp(LN(x)), one shared LayerNorm."""

    def __init__(self, d_model: int, intermediate_size: int, eps: float, mixer: DiscreteMamba2, *, rngs: nnx.Rngs,
                 dtype: Dtype):
        self.input_layernorm = layer_norm(d_model, eps, rngs=rngs, dtype=dtype)
        self.mixer = mixer
        self.mlp = PhiMlp(d_model, intermediate_size, rngs=rngs, dtype=dtype, linear=torch_linear)  # PyTorch init

    def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        h = self.input_layernorm(x)
        y, B, C = self.mixer(h)
        return x + y.astype(x.dtype) + self.mlp(h).astype(x.dtype), (B, C)

    def decode(self, x: jax.Array, cache: Mamba2Cache) -> tuple[jax.Array, Mamba2Cache]:
        h = self.input_layernorm(x)
        y, cache = self.mixer.decode(h, cache)
        return x + y.astype(x.dtype) + self.mlp(h).astype(x.dtype), cache


class PhiMamba(nnx.Module):
    """Phi-Mamba language model; ``__call__`` for training, ``init_cache``/``decode`` for generation."""

    def __init__(
        self,
        *,
        vocab_size: int,
        d_model: int,
        depth: int,
        d_state: int = 64,
        n_qk_heads: int = 32,
        n_v_heads: int = 32,
        expand: int = 1,
        d_conv: int = 4,
        intermediate_size: int | None = None,
        conv_activation: str = "identity",
        ssd_impl: str = "auto",
        chunk_size: int = 128,
        remat: bool = False,
        layer_norm_eps: float = 1e-5,
        dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        intermediate_size = intermediate_size or 4 * d_model
        self.dtype, self.remat, self.depth = dtype, remat, depth
        # PyTorch's nn.Embedding default: N(0, 1). Looked up in float32: the residual stream is float32.
        self.embed = nnx.Embed(vocab_size, d_model, dtype=jnp.float32, embedding_init=nnx.initializers.normal(1.0),
                               embedding_metadata={"logical_axes": ("vocab", "embed")}, rngs=rngs)
        self.layers = build_stacked(
            lambda r: PhiMambaBlock(
                d_model, intermediate_size, layer_norm_eps,
                DiscreteMamba2(d_model, d_state=d_state, n_qk_heads=n_qk_heads, n_v_heads=n_v_heads, expand=expand,
                               d_conv=d_conv, conv_activation=conv_activation, ssd_impl=ssd_impl,
                               chunk_size=chunk_size, dtype=dtype, rngs=r),
                rngs=r, dtype=dtype),
            depth, rngs)
        self.final_layernorm = layer_norm(d_model, layer_norm_eps, rngs=rngs, dtype=dtype)
        self.lm_head = torch_linear(d_model, vocab_size, ("embed", "vocab"), rngs=rngs, dtype=dtype)

    def _logits(self, x: jax.Array) -> jax.Array:
        return self.lm_head(self.final_layernorm(x).astype(self.dtype)).astype(jnp.float32)

    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """tokens (batch, length) int -> float32 logits (batch, length, vocab) and every layer's (B, C), each
        stacked over layers: (depth, batch, length, n_qk_heads, d_state)."""
        check_tokens(tokens)
        step = lambda block, x, _: block(x)
        x, projections = scan_layers(self.layers, step, self.embed(tokens), remat=self.remat)
        return self._logits(x), projections

    def implicit_attention(self, tokens: jax.Array) -> jax.Array:
        """(depth, batch, length t, length s) float32: each layer's ``DiscreteMamba2.implicit_attention``; each
        layer is recomputed in the backward pass whatever ``remat`` says (its residuals are length^2 per head)."""
        check_tokens(tokens)

        def step(block, x, _):
            return block(x)[0], block.mixer.implicit_attention(block.input_layernorm(x))

        return scan_layers(self.layers, step, self.embed(tokens), remat=True)[1]

    def init_cache(self, batch: int, max_length: int | None = None, dtype: Dtype | None = None) -> Mamba2Cache:
        """Every layer's last d_conv - 1 convolution inputs and float32 SSM state, stacked over layers (leading
        axis depth); ``max_length`` is unused (the cache does not grow) and kept for the teacher's signature."""
        del max_length
        layer = self.layers.mixer.init_cache(batch, dtype)
        return jax.tree.map(lambda z: jnp.zeros((self.depth, *z.shape), z.dtype), layer)

    def decode(self, tokens: jax.Array, cache: Mamba2Cache) -> tuple[jax.Array, Mamba2Cache]:
        """tokens (batch, n), n >= 1 new tokens after the cached context -> float32 logits (batch, n, vocab)
        and the updated cache."""
        if cache.ssm.shape[0] != self.depth:
            raise ValueError(f"cache has {cache.ssm.shape[0]} layers, the model {self.depth}")
        check_tokens(tokens)
        x, cache = scan_layers(self.layers, lambda block, x, c: block.decode(x, c), self.embed(tokens), cache)
        return self._logits(x), cache


_NORM, _LINEAR = ("scale", "bias"), ("kernel", "bias")


def _copy_params(student: nnx.Module, teacher: nnx.Module, names: tuple[str, ...]) -> None:
    """student.name <- a fresh copy of teacher.name (never a shared buffer: the student's arrays may be donated)."""
    for name in names:
        target = getattr(student, name)
        target.set_value(jnp.array(getattr(teacher, name)[...], dtype=target[...].dtype, copy=True))


def _check_fits(student: PhiMamba, teacher: Phi) -> None:
    mixer = student.layers.mixer
    t = teacher.size
    head_dim = t.hidden_size // t.num_heads
    pairs = {
        "vocab_size": (student.embed.num_embeddings, t.vocab_size),
        "d_model / hidden_size": (student.embed.features, t.hidden_size),
        "d_inner = expand * d_model / hidden_size": (mixer.d_inner, t.hidden_size),
        "depth": (student.depth, t.depth),
        "intermediate_size": (student.layers.mlp.fc1.out_features, t.intermediate_size),
        "n_qk_heads / num_heads": (mixer.n_qk_heads, t.num_heads),
        "n_v_heads / num_heads": (mixer.n_v_heads, t.num_heads),
        "d_state / teacher head_dim": (mixer.d_state, head_dim),
    }
    if errors := [f"{name}: student {s}, teacher {te}" for name, (s, te) in pairs.items() if s != te]:
        raise ValueError("init_from_attention: the student does not fit the teacher: " + "; ".join(errors))


def init_from_attention(student: PhiMamba, teacher: Phi, *, embeddings: bool = True) -> None:
    """Start the student from a Phi teacher, in place (MOHAWK's / CAB's "initkl" initialisation).

    In every layer (stacked: each copy covers all layers at once), the input LayerNorm and the MLP (fc1, fc2 with
    biases) are copied; the mixer's in_proj columns for x, B and C get the teacher's V, K and Q kernels (head h
    of V, K, Q lands in value head h and B/C head h); out_proj gets the attention output kernel. The teacher's
    q/k/v/dense biases are dropped (the student has none) and rotary embedding has no counterpart. The in_proj
    columns for z and the decay input ``a``, z_bias, the convolution and D keep their initialisation.
    ``embeddings``: also copy the token embedding, the final LayerNorm and the LM head (CAB's initkl leaves them
    at their random init: ``embeddings=False``). Requires equal depth, widths and heads: d_model = d_inner =
    hidden_size, n_qk_heads = n_v_heads = num_heads, d_state = head_dim (ValueError naming every mismatch
    otherwise).
    """
    _check_fits(student, teacher)
    s, t = student.layers, teacher.layers
    _copy_params(s.input_layernorm, t.input_layernorm, _NORM)
    _copy_params(s.mlp.fc1, t.mlp.fc1, _LINEAR)
    _copy_params(s.mlp.fc2, t.mlp.fc2, _LINEAR)
    mixer, attn = s.mixer, t.attn
    d_inner, qk = mixer.d_inner, mixer.n_qk_heads * mixer.d_state
    kernel = mixer.in_proj.kernel[...]  # (depth, d_model, columns)
    kernel = kernel.at[..., :d_inner].set(attn.v.kernel[...].astype(kernel.dtype))
    kernel = kernel.at[..., d_inner : d_inner + qk].set(attn.k.kernel[...].astype(kernel.dtype))
    kernel = kernel.at[..., d_inner + qk : d_inner + 2 * qk].set(attn.q.kernel[...].astype(kernel.dtype))
    mixer.in_proj.kernel.set_value(kernel)
    _copy_params(mixer.out_proj, attn.dense, ("kernel",))
    if embeddings:
        _copy_params(student.embed, teacher.embed, ("embedding",))
        _copy_params(student.final_layernorm, teacher.final_layernorm, _NORM)
        _copy_params(student.lm_head, teacher.lm_head, _LINEAR)

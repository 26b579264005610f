"""Building blocks shared by the teacher and student models: tagged dense layers and norms, patch and token
embeddings, drop path, and stacked layers applied with one ``lax.scan``.

Parameters carry a ``logical_axes`` metadata tuple (one name per dimension); ``cab_jax.sharding`` maps
those names onto mesh axes. Stacked layers add a leading ``"layers"`` axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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


def layer_norm(dim: int, eps: float, *, rngs: nnx.Rngs, dtype: Dtype) -> nnx.LayerNorm:
    """LayerNorm over the last axis with scale and bias tagged ``("embed",)``."""
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, rngs=rngs,
                         scale_metadata={"logical_axes": ("embed",)}, bias_metadata={"logical_axes": ("embed",)})


def check_tokens(tokens: jax.Array) -> None:
    """ValueError unless ``tokens`` is an integer (batch, length >= 1) array."""
    if tokens.ndim != 2 or tokens.shape[1] == 0 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"expected integer tokens (batch, length >= 1), got {tokens.dtype} {tokens.shape}")


def drop_path(x: jax.Array, rate: jax.Array | float, key: jax.Array | None) -> jax.Array:
    """Stochastic depth: zero whole samples with probability ``rate`` (identity when ``key`` is None).
    ``rate`` may be traced (one per layer of a scan)."""
    if key is None:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def split_key(key: jax.Array | None, num: int) -> jax.Array | list[None]:
    """``jax.random.split`` that passes ``None`` (deterministic mode) through as ``num`` Nones."""
    return [None] * num if key is None else jax.random.split(key, num)


def drop_path_rates(rate: float, depth: int) -> tuple[float, ...]:
    """Per-layer stochastic-depth rates rising linearly from 0 to ``rate`` (float32 values, as timm computes
    them; NumPy, so they are Python floats even when a model is built under a trace)."""
    return tuple(float(r) for r in np.linspace(0.0, rate, depth, dtype=np.float32))


def build_stacked(make: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
    """``count`` layers ``make(rngs)`` in one module, every parameter stacked on a new leading axis tagged
    ``"layers"``, each layer's values those of building the layers one by one from ``rngs`` (an unrolled model's,
    bit for bit), and ``rngs`` advanced past them as that would.

    ``make`` is traced once, vectorised over the layers' positions in each random stream, not ``count`` times: a
    deep model's initialisation then compiles in seconds, not minutes (every draw is a threefry computation of its
    own in XLA). ``make`` must draw the same number of keys from each stream for every layer.
    """
    if count < 1:
        raise ValueError(f"build_stacked: no layers to stack (count {count}: a depth of 0?)")
    streams = list(rngs)
    keys = {name: rngs[name].key[...] for name in streams}
    draws = _draws_per_call(make, keys)
    graphdef = None

    def one_layer(starts: dict[str, jax.Array]) -> nnx.State:
        nonlocal graphdef
        layer_rngs = nnx.Rngs(**keys)
        for name in streams:
            layer_rngs[name].count[...] = starts[name]
        graphdef, state = nnx.split(make(layer_rngs))
        return state

    index = jnp.arange(count, dtype=jnp.uint32)
    states = jax.vmap(one_layer)({name: rngs[name].count[...] + draws[name] * index for name in streams})
    for name in streams:
        rngs[name].count[...] += draws[name] * count
    stacked = nnx.merge(graphdef, states)
    for _, variable in nnx.iter_graph(stacked):
        if isinstance(variable, nnx.Variable):
            axes = variable.get_metadata().get("logical_axes")
            variable.set_metadata("logical_axes", None if axes is None else ("layers", *axes))
    return stacked


def _draws_per_call(make: Callable[[nnx.Rngs], nnx.Module], keys: dict[str, jax.Array]) -> dict[str, int]:
    """How many keys ``make`` draws from each stream: counted on a throwaway build whose counters stay concrete (its
    random draws are only traced, never computed; constant initialisers, ones or an ``arange``, do run)."""
    counts = {}

    def probe(keys):
        with jax.ensure_compile_time_eval():
            probe_rngs = nnx.Rngs(**keys)
            make(probe_rngs)
            counts.update({name: int(probe_rngs[name].count[...]) for name in keys})

    jax.eval_shape(probe, keys)
    return counts


def attention_weights(q: jax.Array, k: jax.Array, causal: bool = False) -> jax.Array:
    """Softmax attention, float32: q, k (..., tokens, head_dim) before the 1/sqrt(head_dim) scale -> (..., query
    tokens, key tokens); ``causal``: query t sees keys up to t."""
    logits = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    if causal:
        tokens = q.shape[-2]
        logits = jnp.where(jnp.arange(tokens)[None, :] <= jnp.arange(tokens)[:, None], logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1)


def scan_layers(layers: nnx.Module, fn: Callable, carry: Any, xs: Any = None, *, remat: bool = False,
                saved: tuple[str, ...] = ()) -> tuple[Any, Any]:
    """Apply stacked ``layers`` in order with one ``lax.scan`` (compiled once, whatever the depth):
    ``fn(layer, carry, x) -> (carry, y)`` with layer i and ``x = xs[i]``; returns the last carry and the ys
    stacked on a leading layer axis. ``remat`` recomputes each layer in the backward pass, except the values
    named (``checkpoint_name``) one of ``saved``, which are kept from the forward pass."""
    graphdef, state = nnx.split(layers)

    def body(carry, inputs):
        layer_state, x = inputs
        return fn(nnx.merge(graphdef, layer_state), carry, x)

    if remat:
        policy = jax.checkpoint_policies.save_only_these_names(*saved) if saved else None
        body = jax.checkpoint(body, prevent_cse=False, policy=policy)
    return jax.lax.scan(body, carry, (state, xs))


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

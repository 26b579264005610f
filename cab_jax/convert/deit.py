"""Pretrained DeiT / ViT teachers from PyTorch: timm (DeiT authors) and Hugging Face transformers layouts.

``import_teacher(state_dict, fmt, target)`` maps the checkpoint onto our ``cab_jax.models.vit.ViT`` parameter
tree (``nnx.state(model).to_pure_dict()`` layout): timm's fused ``qkv`` is split into our q, k, v; Linear
weights are transposed; the patch convolution goes from (out, in, h, w) to (h, w, in, out).

* Sizes are checked before the key table, so a DeiT-S checkpoint offered to a DeiT-T config fails with both
  sizes named rather than with a list of shape mismatches.
* Another patch grid (other image size) is handled by resampling the position embedding bicubically.
* Distilled DeiT (a distillation token after the cls token, a second ``head_dist`` / ``distillation_classifier``
  head): our ViT has no distillation token, so it is dropped together with its position-embedding row and its
  head, and the cls head is kept, with a logged warning. The distillation token takes part in every attention
  layer of the original network, so the converted teacher is close to, not identical with, the distilled model
  (its cls-head logits; accuracy can drop a little). Convert a non-distilled DeiT when exactness matters.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np
from absl import logging

from cab_jax.convert.mapping import (
    ConversionError,
    Rule,
    expand,
    import_params,
    patch_conv,
    patch_conv_back,
    take_third,
    unstack_shapes,
)
from cab_jax.convert.mapping import dense_rules as _dense
from cab_jax.convert.mapping import norm_rules as _norm
from cab_jax.convert.pos_embed import grid_size, resize_pos_embed
from cab_jax.models.vit import LN_EPS

FORMATS = ("timm", "hf")
STACKED = ("blocks",)  # our ViT stacks its blocks


def _common(p: str) -> list[Rule]:
    """Embedding rules shared by the Hugging Face layouts (``p``: the model prefix, e.g. "vit.")."""
    return [Rule("cls_token", f"{p}embeddings.cls_token"),
            Rule("pos_embed", f"{p}embeddings.position_embeddings"),
            Rule("patch_embed.proj.kernel", f"{p}embeddings.patch_embeddings.projection.weight", patch_conv,
                 patch_conv_back),
            Rule("patch_embed.proj.bias", f"{p}embeddings.patch_embeddings.projection.bias"),
            *_norm("norm", f"{p}layernorm")]


# timm / DeiT authors: fused qkv (3 * d, d) with q, k, v stacked in that order along the output axis.
TIMM_RULES = [
    Rule("cls_token", "cls_token"),
    Rule("pos_embed", "pos_embed"),
    Rule("patch_embed.proj.kernel", "patch_embed.proj.weight", patch_conv, patch_conv_back),
    Rule("patch_embed.proj.bias", "patch_embed.proj.bias"),
    *_norm("blocks.{i}.norm1", "blocks.{i}.norm1"),
    *[Rule(f"blocks.{{i}}.attn.{name}.{ours}", f"blocks.{{i}}.attn.qkv.{theirs}", take_third(j), None)
      for j, name in enumerate("qkv") for ours, theirs in (("kernel", "weight"), ("bias", "bias"))],
    *_dense("blocks.{i}.attn.proj", "blocks.{i}.attn.proj"),
    *_norm("blocks.{i}.norm2", "blocks.{i}.norm2"),
    *_dense("blocks.{i}.mlp.fc1", "blocks.{i}.mlp.fc1"),
    *_dense("blocks.{i}.mlp.fc2", "blocks.{i}.mlp.fc2"),
    *_norm("norm", "norm"),
    *_dense("head", "head"),
]
TIMM_DIST_TOKEN = "dist_token"
TIMM_DIST_HEAD = r"head_dist\..*"


def hf_rules(p: str, head: str) -> list[Rule]:
    """Hugging Face checkpoint files (``save_pretrained``, the Hub): ``{p}encoder.layer.{i}...``."""
    layer = p + "encoder.layer.{i}"
    return [*_common(p),
            *_norm("blocks.{i}.norm1", f"{layer}.layernorm_before"),
            *_dense("blocks.{i}.attn.q", f"{layer}.attention.attention.query"),
            *_dense("blocks.{i}.attn.k", f"{layer}.attention.attention.key"),
            *_dense("blocks.{i}.attn.v", f"{layer}.attention.attention.value"),
            *_dense("blocks.{i}.attn.proj", f"{layer}.attention.output.dense"),
            *_norm("blocks.{i}.norm2", f"{layer}.layernorm_after"),
            *_dense("blocks.{i}.mlp.fc1", f"{layer}.intermediate.dense"),
            *_dense("blocks.{i}.mlp.fc2", f"{layer}.output.dense"),
            *_dense("head", head)]


def hf_module_rules(p: str, head: str) -> list[Rule]:
    """transformers >= 5 module names (``model.state_dict()`` in memory): ``{p}layers.{i}.attention.q_proj``."""
    layer = p + "layers.{i}"
    return [*_common(p),
            *_norm("blocks.{i}.norm1", f"{layer}.layernorm_before"),
            *[rule for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("proj", "o_proj"))
              for rule in _dense(f"blocks.{{i}}.attn.{ours}", f"{layer}.attention.{theirs}")],
            *_norm("blocks.{i}.norm2", f"{layer}.layernorm_after"),
            *_dense("blocks.{i}.mlp.fc1", f"{layer}.mlp.fc1"),
            *_dense("blocks.{i}.mlp.fc2", f"{layer}.mlp.fc2"),
            *_dense("head", head)]


@dataclasses.dataclass(frozen=True)
class _Layout:
    rules: list[Rule]  # unexpanded, {i} for the block index
    dist_token: str  # name of the distillation token when the checkpoint is a distilled DeiT
    drop: tuple[str, ...]  # regexes of tensors we do not use: the distillation head (when distilled)
    ignore: tuple[str, ...] = ()  # regexes of tensors that may be present and are not needed


def _layout(source: Mapping[str, np.ndarray], fmt: str) -> _Layout:
    hf_like = any(k.endswith("embeddings.cls_token") for k in source)
    if fmt == "timm":
        if hf_like:
            raise ConversionError("timm DeiT/ViT teacher: these are Hugging Face names (*embeddings.cls_token); "
                                  "convert with fmt='hf'")
        return _Layout(TIMM_RULES, TIMM_DIST_TOKEN, (TIMM_DIST_HEAD,))
    if fmt != "hf":
        raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")
    if not hf_like:
        hint = "; these look like timm names, convert with fmt='timm'" if "cls_token" in source else ""
        raise ConversionError(f"hf DeiT/ViT teacher: not a Hugging Face ViT/DeiT checkpoint, no "
                              f"'*embeddings.cls_token' among {len(source)} tensors "
                              f"(first: {sorted(source)[:5]}){hint}")
    cls_keys = sorted(k for k in source if k.endswith("embeddings.cls_token"))
    p = cls_keys[0][: -len("embeddings.cls_token")]  # "vit.", "deit." or "" (a bare ViTModel)
    head = "cls_classifier" if "cls_classifier.weight" in source else "classifier"
    module_names = any(k.startswith(f"{p}layers.") for k in source)
    rules = (hf_module_rules if module_names else hf_rules)(p, head)
    return _Layout(rules, f"{p}embeddings.distillation_token", (r"distillation_classifier\..*",),
                   ignore=(re.escape(p) + r"pooler\..*",))


def _theirs(rules: list[Rule], ours: str) -> str:
    return next(r.theirs for r in rules if r.ours == ours)


def _depth(names, pattern: str) -> int:
    """Number of layers: 1 + the largest index ``{i}`` takes in ``names`` matching ``pattern``."""
    rx = re.compile(r"(\d+)".join(map(re.escape, pattern.split("{i}"))))
    found = {int(m.group(1)) for name in names if (m := rx.fullmatch(name))}
    return max(found) + 1 if found else 0


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The architecture a set of weights implies; ``None`` where it cannot be read."""

    embed_dim: int | None
    depth: int | None
    patch_size: int | None
    mlp_hidden: int | None
    num_classes: int | None
    num_heads: int | None = None

    def describe(self) -> str:
        parts = ", ".join(f"{f.name} {getattr(self, f.name)}" for f in dataclasses.fields(self)
                          if getattr(self, f.name) is not None)
        name = _SIZE_NAMES.get((self.embed_dim, self.depth))
        return f"{parts} ({name})" if name else parts


_SIZE_NAMES = {(192, 12): "DeiT-T", (384, 12): "DeiT-S", (768, 12): "DeiT-B", (1024, 24): "ViT-L"}


def _dim(shapes: Mapping[str, tuple[int, ...]], name: str, axis: int) -> int | None:
    shape = tuple(shapes.get(name) or ())
    return int(shape[axis]) if len(shape) >= 2 else None  # weights and tokens have >= 2 dimensions


def checkpoint_sizes(source: Mapping[str, np.ndarray], rules: list[Rule], num_heads: int | None) -> Sizes:
    shapes = {k: tuple(v.shape) for k, v in source.items()}

    def t(ours: str) -> str:  # the checkpoint name of our parameter ``ours`` (first layer for per-layer ones)
        return _theirs(rules, ours).replace("{i}", "0")

    return Sizes(embed_dim=_dim(shapes, t("cls_token"), -1),
                 depth=_depth(shapes, _theirs(rules, "blocks.{i}.norm1.scale")) or None,
                 patch_size=_dim(shapes, t("patch_embed.proj.kernel"), -1),  # torch (out, in, h, w)
                 mlp_hidden=_dim(shapes, t("blocks.{i}.mlp.fc1.kernel"), 0),  # torch (out, in)
                 num_classes=_dim(shapes, t("head.kernel"), 0),
                 num_heads=num_heads)


def target_sizes(target: Mapping[str, tuple[int, ...]], num_heads: int | None) -> Sizes:
    return Sizes(embed_dim=_dim(target, "cls_token", -1),
                 depth=_depth(target, "blocks.{i}.norm1.scale") or None,
                 patch_size=_dim(target, "patch_embed.proj.kernel", 0),
                 mlp_hidden=_dim(target, "blocks.0.mlp.fc1.kernel", -1),
                 num_classes=_dim(target, "head.kernel", -1),
                 num_heads=num_heads)


def _check_sizes(have: Sizes, want: Sizes, what: str) -> None:
    differ = [f.name for f in dataclasses.fields(Sizes)
              if None not in (getattr(have, f.name), getattr(want, f.name))
              and getattr(have, f.name) != getattr(want, f.name)]
    if differ:
        raise ConversionError(f"{what}: checkpoint has {have.describe()}; the config expects {want.describe()} "
                              f"(differs in {', '.join(differ)})")


def _check_hf_config(hf_cfg: Mapping, what: str) -> None:
    act = hf_cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise ConversionError(f"{what}: hidden_act {act!r}; our ViT uses exact GELU ('gelu')")
    eps = hf_cfg.get("layer_norm_eps")
    if eps is not None and eps != LN_EPS:
        logging.info("%s: checkpoint LayerNorm eps %g, ours %g (negligible for trained activations)", what, eps,
                     LN_EPS)


def import_teacher(state_dict: Mapping[str, np.ndarray], fmt: str, target: Mapping[str, tuple[int, ...]],
                   hf_cfg: Mapping | None = None, *, num_heads: int | None = None) -> dict:
    """Our ViT parameter tree (nested pure dict of float32 arrays) from a PyTorch DeiT / ViT state dict.

    ``fmt``: "timm" (timm / DeiT authors' names) or "hf" (Hugging Face ``ViTForImageClassification``,
    ``DeiTForImageClassification[WithTeacher]``, as saved on disk or as ``model.state_dict()``).
    ``target``: our dotted parameter name -> shape for the configured model (its stacked blocks as they are:
    ``flatten(nnx.state(model).to_pure_dict())`` shapes).
    ``hf_cfg``: the Hugging Face ``config.json`` (its head count and activation are checked).
    ``num_heads``: the configured head count, compared with ``hf_cfg``'s (timm files do not record it).
    Raises ``ConversionError`` when the checkpoint does not fit.
    """
    what = f"{fmt} DeiT/ViT teacher"
    target = unstack_shapes(target, STACKED)
    layout = _layout(state_dict, fmt)
    rules = layout.rules
    if hf_cfg is not None:
        _check_hf_config(hf_cfg, what)
    have_heads = hf_cfg.get("num_attention_heads") if hf_cfg is not None else None
    _check_sizes(checkpoint_sizes(state_dict, rules, have_heads), target_sizes(target, num_heads), what)
    if hf_cfg is None and num_heads is not None and target_sizes(target, None).embed_dim is not None:
        dim = target_sizes(target, None).embed_dim
        if dim % 64 == 0 and num_heads != dim // 64:
            logging.info("%s: the checkpoint does not record its head count; DeiT uses %d heads of 64 at "
                         "embed_dim %d, the config %d", what, dim // 64, dim, num_heads)

    source = dict(state_dict)
    pos_key = _theirs(rules, "pos_embed")
    n_prefix = 1
    if layout.dist_token in source:
        dropped = [layout.dist_token, *(k for k in source if any(re.fullmatch(p, k) for p in layout.drop))]
        logging.warning("%s: distilled DeiT; our ViT has no distillation token, so %s and its position-embedding "
                        "row are dropped and the cls head is kept. The distillation token attends in every "
                        "layer of the original model, so the converted teacher approximates it.", what, dropped)
        for key in dropped:
            del source[key]
        n_prefix = 2
    if pos_key in source and "pos_embed" in target:
        pos = np.asarray(source[pos_key], np.float32)
        if pos.ndim != 3 or pos.shape[1] <= n_prefix:
            raise ConversionError(f"{what}: {pos_key} has shape {pos.shape}; expected (1, {n_prefix} + grid**2, d)")
        pos = np.concatenate([pos[:, :1], pos[:, n_prefix:]], axis=1)  # cls row and patch rows
        try:
            have_grid = grid_size(pos.shape[1] - 1, f"{what}: {pos_key}")
            want_grid = grid_size(target["pos_embed"][1] - 1, "the config's position embedding")
        except ValueError as e:
            raise ConversionError(str(e)) from e
        if have_grid != want_grid:
            logging.info("%s: position embedding resized bicubically from a %dx%d to a %dx%d patch grid", what,
                         have_grid, have_grid, want_grid, want_grid)
            pos = resize_pos_embed(pos, want_grid, n_prefix=1)
        source[pos_key] = pos

    depth = target_sizes(target, None).depth or 0
    return import_params(source, expand(rules, {"blocks": depth}), target, what, ignore=layout.ignore,
                         stacked=STACKED)

"""Phi teachers from Hugging Face ``PhiForCausalLM`` weights (e.g. microsoft/phi-1_5), and back.

``import_phi(state_dict, target, hf_cfg, size=...)`` maps the checkpoint onto our ``cab_jax.models.phi.Phi``
parameter tree: Linear weights are transposed, LayerNorm ``weight`` becomes ``scale``; everything else is copied.
The architecture is read from ``config.json`` (head count, rotary fraction and base, LayerNorm eps) and from the
tensor shapes (vocabulary, width, depth, MLP width) and compared with the target model before the key table, so a
checkpoint of another size fails with both sizes named. Variants our model does not implement (qk LayerNorm,
grouped-query attention, RoPE scaling, another activation) are refused.

``export_phi`` / ``save_hf_dir`` write the Hugging Face names back (bitwise round trip; the directory form
with a ``config.json`` that ``transformers.PhiForCausalLM.from_pretrained`` reads).
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Mapping

import numpy as np

from cab_jax.convert import io
from cab_jax.convert.mapping import (
    ConversionError,
    Rule,
    expand,
    export_params,
    flatten,
    import_params,
    unstack_shapes,
)
from cab_jax.convert.mapping import dense_rules as _dense
from cab_jax.convert.mapping import norm_rules as _norm
from cab_jax.models.phi import PhiSize

WHAT = "hf Phi teacher"
STACKED = ("layers",)  # our Phi stacks its layers
_ACTIVATION = "gelu_new"  # cab_jax.models.phi.PhiMlp: tanh-approximated GELU
_CONFIG_FIELDS = ("num_heads", "partial_rotary_factor", "rope_theta", "layer_norm_eps")


_LAYER = "model.layers.{i}"
RULES = [
    Rule("embed.embedding", "model.embed_tokens.weight"),
    *_norm("layers.{i}.input_layernorm", f"{_LAYER}.input_layernorm"),
    *_dense("layers.{i}.attn.q", f"{_LAYER}.self_attn.q_proj"),
    *_dense("layers.{i}.attn.k", f"{_LAYER}.self_attn.k_proj"),
    *_dense("layers.{i}.attn.v", f"{_LAYER}.self_attn.v_proj"),
    *_dense("layers.{i}.attn.dense", f"{_LAYER}.self_attn.dense"),
    *_dense("layers.{i}.mlp.fc1", f"{_LAYER}.mlp.fc1"),
    *_dense("layers.{i}.mlp.fc2", f"{_LAYER}.mlp.fc2"),
    *_norm("final_layernorm", "model.final_layernorm"),
    *_dense("lm_head", "lm_head"),
]
IGNORE = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)  # a buffer older transformers saved
# The pre-2024 remote-code ("MixFormer") layout of microsoft/phi-1_5: layers.0.wte, layers.{i}.mixer.Wqkv, ...
_LEGACY = re.compile(r"(transformer\.)?(layers\.\d+\.mixer\.Wqkv|layers\.0\.wte|embd\.wte)\..*")


def is_phi_config(hf_cfg: Mapping | None) -> bool:
    return hf_cfg is not None and hf_cfg.get("model_type") == "phi"


def _rope(hf_cfg: Mapping, name: str, default: float) -> float:
    """A RoPE setting from ``rope_parameters`` (transformers >= 5) or the top level (older configs)."""
    params = hf_cfg.get("rope_parameters") or {}
    return float(params.get(name, hf_cfg.get(name, default)))


def config_fields(hf_cfg: Mapping) -> dict[str, float]:
    """The architecture fields a Phi ``config.json`` records that tensor shapes do not; refuses variants our
    model does not implement."""
    problems = []
    if hf_cfg.get("model_type", "phi") != "phi":
        problems.append(f"model_type {hf_cfg.get('model_type')!r}, expected 'phi'")
    if hf_cfg.get("hidden_act", _ACTIVATION) != _ACTIVATION:
        problems.append(f"hidden_act {hf_cfg['hidden_act']!r}, our Phi uses {_ACTIVATION!r}")
    if hf_cfg.get("qk_layernorm", False):
        problems.append("qk_layernorm=True (LayerNorm on q and k), our Phi has none (as phi-1.5)")
    heads = hf_cfg.get("num_attention_heads")
    kv_heads = hf_cfg.get("num_key_value_heads")
    if kv_heads is not None and kv_heads != heads:
        problems.append(f"num_key_value_heads {kv_heads} != num_attention_heads {heads} (grouped-query attention)")
    rope_type = (hf_cfg.get("rope_parameters") or {}).get("rope_type", "default")
    if hf_cfg.get("rope_scaling") or rope_type != "default":
        problems.append(f"RoPE scaling ({hf_cfg.get('rope_scaling') or rope_type}), our Phi uses plain RoPE")
    if problems:
        raise ConversionError(f"{WHAT}: unsupported variant: {'; '.join(problems)}")
    return {"num_heads": heads, "partial_rotary_factor": _rope(hf_cfg, "partial_rotary_factor", 0.5),
            "rope_theta": _rope(hf_cfg, "rope_theta", 10000.0), "layer_norm_eps": hf_cfg.get("layer_norm_eps", 1e-5)}


def size_from_hf_config(hf_cfg: Mapping) -> PhiSize:
    """Our ``PhiSize`` for a Hugging Face Phi ``config.json``."""
    return PhiSize(vocab_size=hf_cfg["vocab_size"], hidden_size=hf_cfg["hidden_size"],
                   depth=hf_cfg["num_hidden_layers"], intermediate_size=hf_cfg["intermediate_size"],
                   **config_fields(hf_cfg))


def hf_config(size: PhiSize) -> dict:
    """A ``config.json`` for ``size`` that ``transformers.PhiForCausalLM`` reads."""
    return {"architectures": ["PhiForCausalLM"], "model_type": "phi", "vocab_size": size.vocab_size,
            "hidden_size": size.hidden_size, "intermediate_size": size.intermediate_size,
            "num_hidden_layers": size.depth, "num_attention_heads": size.num_heads,
            "num_key_value_heads": size.num_heads, "hidden_act": _ACTIVATION, "layer_norm_eps": size.layer_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": size.rope_theta,
                                "partial_rotary_factor": size.partial_rotary_factor},
            "qk_layernorm": False, "tie_word_embeddings": False, "torch_dtype": "float32"}


def _shape_fields(shapes: Mapping[str, tuple[int, ...]], embed: str, fc1: str, layer_pattern: str,
                  fc1_out_axis: int) -> dict[str, int | None]:
    """Vocabulary, width, depth and MLP width implied by parameter shapes (None where a name is absent)."""
    rx = re.compile(layer_pattern)
    depth = 1 + max((int(m.group(1)) for k in shapes if (m := rx.match(k))), default=-1)
    emb, fc = tuple(shapes.get(embed) or ()), tuple(shapes.get(fc1) or ())
    return {"vocab_size": emb[0] if len(emb) == 2 else None, "hidden_size": emb[1] if len(emb) == 2 else None,
            "depth": depth or None, "intermediate_size": fc[fc1_out_axis] if len(fc) == 2 else None}


def _describe(fields: Mapping[str, object]) -> str:
    return ", ".join(f"{k} {v}" for k, v in fields.items() if v is not None)


def _check_sizes(have: Mapping[str, object], want: Mapping[str, object]) -> None:
    differ = [k for k in want if None not in (have.get(k), want[k]) and have.get(k) != want[k]]
    if differ:
        raise ConversionError(f"{WHAT}: checkpoint has {_describe(have)}; the model expects {_describe(want)} "
                              f"(differs in {', '.join(differ)})")


def import_phi(state_dict: Mapping[str, np.ndarray], target: Mapping[str, tuple[int, ...]],
               hf_cfg: Mapping | None = None, *, size: PhiSize | None = None) -> dict:
    """Our Phi parameter tree (nested pure dict of float32 arrays) from a ``PhiForCausalLM`` state dict.

    ``target``: our dotted parameter name -> shape for the model to fill (its layers stacked). ``hf_cfg``: the
    checkpoint's ``config.json`` (its variant is checked; its head count, rotary settings and eps are compared with
    ``size``, the target model's full architecture, when given). Raises ``ConversionError`` when the checkpoint
    does not fit.
    """
    if any(_LEGACY.fullmatch(k) for k in state_dict):
        raise ConversionError(f"{WHAT}: this is the old remote-code (MixFormer) layout of Phi (layers.*.mixer.Wqkv); "
                              f"use a checkpoint in the transformers PhiForCausalLM layout "
                              f"(model.layers.*.self_attn.q_proj), e.g. the current microsoft/phi-1_5 revision")
    target = unstack_shapes(target, STACKED)
    have = _shape_fields({k: tuple(v.shape) for k, v in state_dict.items()}, "model.embed_tokens.weight",
                         "model.layers.0.mlp.fc1.weight", r"model\.layers\.(\d+)\.", 0)
    want = _shape_fields(target, "embed.embedding", "layers.0.mlp.fc1.kernel", r"layers\.(\d+)\.", 1)
    have.update(config_fields(hf_cfg) if hf_cfg is not None else dict.fromkeys(_CONFIG_FIELDS))
    want.update({k: getattr(size, k) for k in _CONFIG_FIELDS} if size is not None else
                dict.fromkeys(_CONFIG_FIELDS))
    if size is not None:
        want.update({k: getattr(size, k) for k in ("vocab_size", "hidden_size", "depth", "intermediate_size")})
    _check_sizes(have, want)

    source = dict(state_dict)
    tied = hf_cfg is not None and hf_cfg.get("tie_word_embeddings", False)
    if tied and "lm_head.weight" not in source and "model.embed_tokens.weight" in source:
        source["lm_head.weight"] = source["model.embed_tokens.weight"]  # tied: the head is the embedding
    return import_params(source, expand(RULES, {"layers": want["depth"] or 0}), target, WHAT, ignore=IGNORE,
                         stacked=STACKED)


def export_phi(params: Mapping) -> dict[str, np.ndarray]:
    """``PhiForCausalLM`` tensors (Hugging Face names) from our Phi parameter tree."""
    scale = flatten(params).get("layers.input_layernorm.scale")  # (depth, hidden): the layers are stacked
    if np.ndim(scale) != 2 or not np.shape(scale)[0]:
        raise ConversionError(f"{WHAT}: not a Phi parameter tree: expected stacked layers, "
                              f"layers.input_layernorm.scale of shape (depth, hidden_size), got "
                              f"{None if scale is None else np.shape(scale)}")
    return export_params(params, expand(RULES, {"layers": np.shape(scale)[0]}), WHAT, stacked=STACKED)


def save_hf_dir(params: Mapping, size: PhiSize, path: str | pathlib.Path) -> None:
    """A Hugging Face model directory (``config.json`` + ``model.safetensors``) from our parameters."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    io.save_state_dict(export_phi(params), path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(hf_config(size), indent=2) + "\n")

"""Vim students in the original PyTorch layout of hustvl/Vim ``vim/models_mamba.py`` (``VisionMamba`` with
``bimamba_type="v2"``, as the CAB repository trains them), imported and exported losslessly.

Original names -> ours:

* ``patch_embed.proj.weight`` (d, 3, p, p) -> ``patch_embed.proj.kernel`` (p, p, 3, d); ``cls_token`` (1, 1, d)
  and ``pos_embed`` (1, num_patches + 1, d) unchanged (the cls token sits at num_patches // 2 in both).
* ``layers.{i}.norm.weight`` / ``norm_f.weight`` (RMSNorm) -> ``...norm.scale`` / ``norm_f.scale``.
* ``layers.{i}.mixer.in_proj.weight`` (2 d_inner, d) and ``out_proj.weight`` -> transposed kernels (no biases).
* Forward direction ``conv1d.weight`` (d_inner, 1, d_conv) -> ``fwd.conv_kernel`` (d_conv, d_inner), tap j being
  ``weight[:, 0, j]``; ``conv1d.bias``, ``x_proj.weight``, ``dt_proj.weight/bias``, ``A_log``, ``D``.
* Backward direction: the same with ``conv1d_b``, ``x_proj_b``, ``dt_proj_b``, ``A_b_log``, ``D_b`` -> ``bwd.*``.
  The original flips the sequence, runs the causal ``conv1d_b`` and the scan on it and flips the output back;
  ours reads the sequence last-to-first with the mirrored (anti-causal) convolution, which uses the same taps,
  so the weights carry over unchanged.
* ``head.weight/bias`` -> ``head.kernel/bias``.

Unidirectional students (original ``bimamba_type="none"``: no ``*_b`` tensors) map onto ours with ``bwd=None``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from cab_jax.convert.mapping import (
    ConversionError,
    Rule,
    expand,
    export_params,
    flatten,
    import_params,
    linear,
    patch_conv,
    patch_conv_back,
    unstack_shapes,
)

WHAT = "Vim (original hustvl/Vim layout)"
STACKED = ("layers",)  # our Vim stacks its layers
# The rotary-embedding buffers of ``if_rope=True`` models: their forward differs from ours (no RoPE), so such a
# checkpoint is refused rather than converted into a different network. The default Vim models carry none.
_ROPE_KEYS = ("rope.freqs_cos", "rope.freqs_sin")
_DOUBLE_CLS_KEYS = ("cls_token_head", "cls_token_tail")  # Vim with use_double_cls_token=True
_BACKWARD_KEY = re.compile(r"layers\.\d+\.mixer\.(conv1d_b|x_proj_b|dt_proj_b)\.\w+|layers\.\d+\.mixer\.(A_b_log|D_b)")
_LAYER_KEY = re.compile(r"layers\.(\d+)\.")


def conv1d(x: np.ndarray) -> np.ndarray:
    """torch depthwise Conv1d weight (d_inner, 1, d_conv) -> our conv kernel (d_conv, d_inner)."""
    return x[:, 0, :].T


def conv1d_back(x: np.ndarray) -> np.ndarray:
    """our conv kernel (d_conv, d_inner) -> torch depthwise Conv1d weight (d_inner, 1, d_conv)."""
    return x.T[:, None, :]


TOP_RULES = [
    Rule("patch_embed.proj.kernel", "patch_embed.proj.weight", patch_conv, patch_conv_back),
    Rule("patch_embed.proj.bias", "patch_embed.proj.bias"),
    Rule("cls_token", "cls_token"),
    Rule("pos_embed", "pos_embed"),
    Rule("norm_f.scale", "norm_f.weight"),
    Rule("head.kernel", "head.weight", linear, linear),
    Rule("head.bias", "head.bias"),
]
LAYER_RULES = [
    Rule("layers.{i}.norm.scale", "layers.{i}.norm.weight"),
    Rule("layers.{i}.mixer.in_proj.kernel", "layers.{i}.mixer.in_proj.weight", linear, linear),
    Rule("layers.{i}.mixer.out_proj.kernel", "layers.{i}.mixer.out_proj.weight", linear, linear),
]


def _direction_rules(ours: str, suffix: str, a_log: str, d: str) -> list[Rule]:
    """One SSM direction: ours ``layers.{i}.mixer.<ours>.*`` <- theirs with module ``suffix`` ("" or "_b")."""
    o, t = f"layers.{{i}}.mixer.{ours}", "layers.{i}.mixer"
    return [
        Rule(f"{o}.conv_kernel", f"{t}.conv1d{suffix}.weight", conv1d, conv1d_back),
        Rule(f"{o}.conv_bias", f"{t}.conv1d{suffix}.bias"),
        Rule(f"{o}.x_proj.kernel", f"{t}.x_proj{suffix}.weight", linear, linear),
        Rule(f"{o}.dt_proj.kernel", f"{t}.dt_proj{suffix}.weight", linear, linear),
        Rule(f"{o}.dt_proj.bias", f"{t}.dt_proj{suffix}.bias"),
        Rule(f"{o}.A_log", f"{t}.{a_log}"),
        Rule(f"{o}.D", f"{t}.{d}"),
    ]


FORWARD_RULES = _direction_rules("fwd", "", "A_log", "D")
BACKWARD_RULES = _direction_rules("bwd", "_b", "A_b_log", "D_b")


def rules(depth: int, bidirectional: bool) -> list[Rule]:
    """The expanded rule table of a Vim with ``depth`` layers."""
    table = LAYER_RULES + FORWARD_RULES + (BACKWARD_RULES if bidirectional else [])
    return TOP_RULES + expand(table, {"layers": depth})


def _depth(names) -> int:
    indices = {int(m.group(1)) for m in map(_LAYER_KEY.match, names) if m}
    return max(indices) + 1 if indices else 0


def _shape(source: Mapping, name: str, axis: int) -> int | None:
    x = source.get(name)
    return None if x is None or len(x) <= axis else int(x[axis])


def checkpoint_sizes(state_dict: Mapping[str, np.ndarray]) -> dict[str, object]:
    """The model sizes an original-layout checkpoint implies (a size is absent where its tensor is)."""
    shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
    sizes = {
        "embed_dim": _shape(shapes, "patch_embed.proj.weight", 0) or _shape(shapes, "cls_token", 2),
        "in_chans": _shape(shapes, "patch_embed.proj.weight", 1),
        "patch_size": shapes["patch_embed.proj.weight"][2:] if "patch_embed.proj.weight" in shapes else None,
        "num_patches": shapes["pos_embed"][1] - 1 if len(shapes.get("pos_embed", ())) > 1 else None,
        "depth": _depth(shapes),
        "d_inner": _shape(shapes, "layers.0.mixer.conv1d.weight", 0),
        "d_conv": _shape(shapes, "layers.0.mixer.conv1d.weight", 2),
        "d_state": _shape(shapes, "layers.0.mixer.A_log", 1),
        "dt_rank": _shape(shapes, "layers.0.mixer.dt_proj.weight", 1),
        "num_classes": _shape(shapes, "head.weight", 0),
        "bidirectional": any(_BACKWARD_KEY.fullmatch(k) for k in shapes),
    }
    return {k: v for k, v in sizes.items() if v is not None}


def model_sizes(target: Mapping[str, tuple[int, ...]]) -> dict[str, object]:
    """The same sizes read from our parameter shapes (per-layer dotted name -> shape, see ``_target_shapes``)."""
    f = "layers.0.mixer.fwd."
    sizes = {
        "embed_dim": _shape(target, "patch_embed.proj.kernel", 3) or _shape(target, "cls_token", 2),
        "in_chans": _shape(target, "patch_embed.proj.kernel", 2),
        "patch_size": tuple(target["patch_embed.proj.kernel"][:2]) if "patch_embed.proj.kernel" in target else None,
        "num_patches": target["pos_embed"][1] - 1 if len(target.get("pos_embed", ())) > 1 else None,
        "depth": _depth(target),
        "d_inner": _shape(target, f + "conv_kernel", 1),
        "d_conv": _shape(target, f + "conv_kernel", 0),
        "d_state": _shape(target, f + "A_log", 1),
        "dt_rank": _shape(target, f + "dt_proj.kernel", 0),
        "num_classes": _shape(target, "head.kernel", 1),
        "bidirectional": any(k.startswith("layers.") and ".mixer.bwd." in k for k in target),
    }
    return {k: v for k, v in sizes.items() if v is not None}


def _target_shapes(target: Mapping) -> dict[str, tuple[int, ...]]:
    """Per-layer dotted name -> shape from our (stacked) parameter tree or its dotted name -> shape table."""
    if all(isinstance(v, tuple) for v in target.values()):
        shapes = {k: tuple(v) for k, v in target.items()}
    else:
        shapes = {k: tuple(np.shape(v)) for k, v in flatten(target).items()}
    return unstack_shapes(shapes, STACKED)


def check_sizes(state_dict: Mapping[str, np.ndarray], target: Mapping[str, tuple[int, ...]]) -> None:
    """``ConversionError`` naming every size where the checkpoint and the model differ."""
    seen, expected = checkpoint_sizes(state_dict), model_sizes(target)
    diffs = [f"{k}: {seen[k]} in the checkpoint, {expected[k]} in the model"
             + (" (another image size, or a patch stride other than the patch size, as in Vim's stride-8 models)"
                if k == "num_patches" else "")
             for k in expected if k in seen and seen[k] != expected[k]]
    if diffs:
        raise ConversionError(f"{WHAT}: the checkpoint's sizes differ from the model's; " + "; ".join(diffs))


def import_vim(state_dict: Mapping[str, np.ndarray], target: Mapping) -> dict:
    """Our Vim parameter tree (pure dict of float32 arrays) from an original-layout ``state_dict``.

    ``target``: our (stacked) parameter tree, or its dotted name -> shape table, e.g. from
    ``flatten(nnx.state(model).to_pure_dict())``; it fixes depth and direction(s).
    """
    shapes = _target_shapes(target)
    if any(k in state_dict for k in _ROPE_KEYS):
        raise ConversionError(f"{WHAT}: the checkpoint is an if_rope=True Vim (it has {list(_ROPE_KEYS)}); our Vim "
                              "has no rotary position embedding, so it cannot reproduce that model")
    if any(k in state_dict for k in _DOUBLE_CLS_KEYS):
        raise ConversionError(f"{WHAT}: the checkpoint is a use_double_cls_token=True Vim (it has "
                              f"{list(_DOUBLE_CLS_KEYS)}); our Vim has one cls token, in the middle of the sequence, "
                              "so it cannot reproduce that model")
    check_sizes(state_dict, shapes)
    sizes = model_sizes(shapes)
    return import_params(state_dict, rules(sizes["depth"], sizes["bidirectional"]), shapes, WHAT, stacked=STACKED)


def export_vim(params: Mapping) -> dict[str, np.ndarray]:
    """Original-layout float32 tensors (names and shapes of hustvl/Vim's ``state_dict``) from our parameters."""
    sizes = model_sizes(_target_shapes(params))
    if not sizes["depth"]:
        raise ConversionError(f"{WHAT}: not a Vim parameter tree: expected stacked layers (layers.*, leading axis "
                              f"depth), got {sorted(flatten(params))[:8]}")
    return export_params(params, rules(sizes["depth"], sizes["bidirectional"]), WHAT, stacked=STACKED)

"""Model weights from a path, whatever it holds: PyTorch weights (converted on the fly into the given model's
layout) or a checkpoint written by this project.

This is what ``teacher.init_from`` / ``student.init_from`` and ``python -m cab_jax.convert`` use. The model says
what the weights are for (its class and sizes); nothing here knows configs or the trainer.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
from flax import nnx

from cab_jax import checkpoint
from cab_jax.convert import deit, io, mapping, phi, vim
from cab_jax.errors import ConfigError
from cab_jax.models.phi import Phi
from cab_jax.models.vim import Vim
from cab_jax.models.vit import ViT

_PYTORCH_SUFFIXES = (*io.TORCH_SUFFIXES, ".safetensors")


def formats(model: nnx.Module) -> tuple[str, ...]:
    """The PyTorch layouts that convert into ``model``: timm/hf for a ViT, vim for a Vim, hf for a Phi."""
    for cls, names in ((ViT, deit.FORMATS), (Vim, ("vim",)), (Phi, ("hf",))):
        if isinstance(model, cls):
            return names
    raise mapping.ConversionError(f"no PyTorch weights convert into a {type(model).__name__}; PyTorch imports "
                                  "exist for ViT (timm, hf), Vim (vim) and Phi (hf)")


def is_pytorch_source(path: str | pathlib.Path) -> bool:
    """A ``.pth``/``.pt``/``.bin``/``.safetensors`` file or a Hugging Face model directory."""
    return pathlib.Path(path).suffix in _PYTORCH_SUFFIXES or io.is_hf_dir(path)


def check_source(path: str | pathlib.Path) -> None:
    """``PathError`` / ``FileFormatError`` unless ``path`` holds weights ``load_model_weights`` can read: PyTorch
    weights (their headers are checked) or a checkpoint of ours with a step. Cheap: nothing is loaded."""
    if is_pytorch_source(path):
        io.check_readable(path)
    else:
        checkpoint.model_params_dir(path)


def import_pytorch(path: str | pathlib.Path, model: nnx.Module, fmt: str | None = None) -> dict:
    """PyTorch weights at ``path`` as ``model``'s parameter tree (float32 NumPy arrays); ``model`` may be abstract
    (``nnx.eval_shape``). ``fmt``: one of ``formats(model)``; by default "hf" for a Hugging Face directory,
    else the model's first format."""
    hf_cfg = io.hf_config(path) if io.is_hf_dir(path) else None
    if phi.is_phi_config(hf_cfg) and not isinstance(model, Phi):
        raise mapping.ConversionError(f"{path} holds a Phi language model (config.json model_type 'phi'), but the "
                                      f"configured teacher is a {type(model).__name__}")
    allowed = formats(model)
    fmt = fmt or ("hf" if hf_cfg is not None and "hf" in allowed else allowed[0])
    if fmt not in allowed:
        kind = "a Phi teacher: Phi checkpoints are Hugging Face ('hf')" if isinstance(model, Phi) else \
            f"a {type(model).__name__}"
        raise ConfigError(f"format {fmt!r} does not fit {kind}; expected one of {allowed}")
    state_dict = _select_model(io.load_state_dict(path), "student" if isinstance(model, Vim) else "teacher")
    target = {k: tuple(v.shape) for k, v in mapping.flatten(nnx.state(model).to_pure_dict()).items()}
    if isinstance(model, Vim):
        return vim.import_vim(state_dict, target)
    if isinstance(model, Phi):
        return phi.import_phi(state_dict, target, hf_cfg, size=model.size)
    return deit.import_teacher(state_dict, fmt, target, hf_cfg if fmt == "hf" else None, num_heads=model.num_heads)


def _select_model(state_dict: io.StateDict, prefix: str) -> io.StateDict:
    """A CAB training checkpoint holds the whole distillation model (``student.*``, ``teacher.*``, ``aligner.*``):
    keep the tensors under ``prefix`` ("student" or "teacher"), without it. Other checkpoints pass through."""
    prefix += "."
    if not any(k.startswith(prefix) for k in state_dict):
        return state_dict
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_model_weights(path: str | pathlib.Path, model: nnx.Module, like: dict) -> dict:
    """Parameters of ``model`` shaped like ``like`` (a tree of arrays or ShapeDtypeStructs, possibly sharded)
    from ``path``: PyTorch weights converted on the fly, else a checkpoint written by this project (a run
    workdir or ``python -m cab_jax.convert`` output)."""
    if is_pytorch_source(path):
        params = import_pytorch(path, model)
        return jax.tree.map(lambda x, ref: np.asarray(x, ref.dtype), params, like)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                          like)
    return checkpoint.load_model_params(path, target)

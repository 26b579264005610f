"""Model weights from a path, whatever it holds: PyTorch weights (converted on the fly) or our own checkpoint.

This is what ``teacher.init_from`` / ``student.init_from`` and ``python -m cab_jax.convert`` use.
"""

from __future__ import annotations

import pathlib

import jax
import ml_collections
import numpy as np
from flax import nnx

from cab_jax.convert import io, mapping, phi
from cab_jax.models.phi import Phi, size_of

FORMATS = {"teacher": ("timm", "hf"), "student": ("vim",)}
_PYTORCH_SUFFIXES = (*io.TORCH_SUFFIXES, ".safetensors")


def is_pytorch_source(path: str | pathlib.Path) -> bool:
    """A ``.pth``/``.pt``/``.bin``/``.safetensors`` file or a Hugging Face model directory."""
    return pathlib.Path(path).suffix in _PYTORCH_SUFFIXES or io.is_hf_dir(path)


def default_format(path: str | pathlib.Path, role: str) -> str:
    if role == "student":
        return "vim"
    return "hf" if io.is_hf_dir(path) else "timm"


def build_model(c: ml_collections.ConfigDict, role: str) -> nnx.Module:
    from cab_jax import train  # the model builders; imported here to keep this module light

    return (train.build_teacher if role == "teacher" else train.build_student)(c, nnx.Rngs(0))


def abstract_model(c: ml_collections.ConfigDict, role: str) -> nnx.Module:
    """``c``'s ``role`` model with ShapeDtypeStructs for parameters (nothing allocated)."""
    return nnx.eval_shape(lambda: build_model(c, role))


def abstract_params(c: ml_collections.ConfigDict, role: str) -> dict:
    """Our parameter tree for ``c``'s ``role`` model as ShapeDtypeStructs (nothing allocated)."""
    return nnx.state(abstract_model(c, role)).to_pure_dict()


def import_pytorch(path: str | pathlib.Path, c: ml_collections.ConfigDict, role: str,
                   fmt: str | None = None) -> dict:
    """PyTorch weights at ``path`` as our ``role`` model's parameter tree (float32 numpy arrays)."""
    requested, fmt = fmt, fmt or default_format(path, role)
    if fmt not in FORMATS[role]:
        raise ValueError(f"format {fmt!r} does not fit a {role}; expected one of {FORMATS[role]}")
    state_dict = _select_role(io.load_state_dict(path), role)
    model = abstract_model(c, role)
    target = {k: tuple(v.shape) for k, v in mapping.flatten(nnx.state(model).to_pure_dict()).items()}
    if role == "student":
        from cab_jax.convert import vim

        return vim.import_vim(state_dict, target)
    hf_cfg = io.hf_config(path) if io.is_hf_dir(path) else None
    if isinstance(model, Phi) or phi.is_phi_config(hf_cfg):
        return _import_phi(path, state_dict, requested, model, target, hf_cfg)
    from cab_jax.convert import deit

    return deit.import_teacher(state_dict, fmt, target, io.hf_config(path) if fmt == "hf" else None,
                               num_heads=c.teacher.num_heads)


def _import_phi(path: str | pathlib.Path, state_dict: io.StateDict, fmt: str | None, model: nnx.Module,
                target: dict[str, tuple[int, ...]], hf_cfg: dict | None) -> dict:
    """A Hugging Face ``PhiForCausalLM`` checkpoint (directory or weights file; ``fmt`` "hf" or unset) as the
    configured Phi teacher's parameters."""
    if not isinstance(model, Phi):
        raise mapping.ConversionError(f"{path} holds a Phi language model (config.json model_type 'phi'), but the "
                                      f"configured teacher is a {type(model).__name__}")
    if fmt not in (None, "hf"):
        raise ValueError(f"format {fmt!r} does not fit a Phi teacher; Phi checkpoints are Hugging Face ('hf')")
    return phi.import_phi(state_dict, target, hf_cfg, size=size_of(model))


def _select_role(state_dict: io.StateDict, role: str) -> io.StateDict:
    """A CAB training checkpoint holds the whole distillation model (``student.*``, ``teacher.*``, ``aligner.*``):
    keep the ``role``'s tensors, without the prefix. Other checkpoints pass through unchanged."""
    prefix = f"{role}."
    if not any(k.startswith(prefix) for k in state_dict):
        return state_dict
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_model_weights(path: str | pathlib.Path, c: ml_collections.ConfigDict, role: str, like: dict) -> dict:
    """Parameters for ``like`` (a tree of arrays or ShapeDtypeStructs, possibly sharded) from ``path``:
    PyTorch weights converted on the fly, else a checkpoint written by this project (a run workdir or
    ``python -m cab_jax.convert`` output)."""
    if is_pytorch_source(path):
        params = import_pytorch(path, c, role)
        return jax.tree.map(lambda x, ref: np.asarray(x, ref.dtype), params, like)
    from cab_jax import checkpoint

    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                          like)
    return checkpoint.load_model_params(path, target)

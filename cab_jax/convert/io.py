"""Reading and writing PyTorch weights as flat ``{name: numpy array}`` dicts, never executing pickled code.

Sources: ``.safetensors`` (read without torch), ``.pth`` / ``.pt`` / ``.bin`` (``torch.load(weights_only=True)``,
unwrapped from a ``model`` / ``state_dict`` / ``module`` key when the file holds a training checkpoint), and
Hugging Face model directories (``config.json`` beside ``model.safetensors`` or ``pytorch_model.bin``, sharded
or not).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping

import ml_dtypes
import numpy as np

StateDict = dict[str, np.ndarray]
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_WRAPPER_KEYS = ("model", "state_dict", "module", "model_state_dict")


def load_state_dict(path: str | pathlib.Path) -> StateDict:
    """The tensors of a ``.safetensors`` / ``.pth`` file or a Hugging Face directory, as float numpy arrays."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no weights at {path}")
    if path.is_dir():
        return _load_hf_dir(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return _load_torch(path)
    raise ValueError(f"{path}: unknown weights format {path.suffix!r}; expected .safetensors, "
                     f"{', '.join(TORCH_SUFFIXES)} or a Hugging Face model directory")


def hf_config(path: str | pathlib.Path) -> dict:
    """``config.json`` of a Hugging Face model directory."""
    config = pathlib.Path(path) / "config.json"
    if not config.exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory: no config.json")
    return json.loads(config.read_text())


def is_hf_dir(path: str | pathlib.Path) -> bool:
    return pathlib.Path(path).is_dir() and (pathlib.Path(path) / "config.json").exists()


def save_state_dict(tensors: Mapping[str, np.ndarray], path: str | pathlib.Path) -> None:
    """Writes ``.safetensors`` (no torch needed) or ``.pth`` (a plain dict of tensors) by the suffix."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(arrays, str(path))
    elif path.suffix in TORCH_SUFFIXES:
        import torch

        torch.save({k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, str(path))
    else:
        raise ValueError(f"{path}: cannot write {path.suffix!r}; use .safetensors or .pth")


def _load_safetensors(path: pathlib.Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return {k: _float(v) for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError) as e:  # truncated or not a safetensors file
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def _load_torch(path: pathlib.Path) -> StateDict:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs PyTorch (pip install torch); .safetensors files do not") from e
    import pickle

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused to load; the file holds more than tensors (pickled code or objects), "
                         f"and only weights_only loading is allowed. Convert it to .safetensors where you trust "
                         f"it. ({str(e).splitlines()[0]})") from e
    except (RuntimeError, EOFError, OSError) as e:  # truncated / corrupt archive
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0]})") from e
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: _float(v.detach().cpu().float().numpy() if v.is_floating_point() else v.numpy())
            for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _load_hf_dir(path: pathlib.Path) -> StateDict:
    hf_config(path)  # a clear error when config.json is missing
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = path / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            out: StateDict = {}
            for shard in shards:
                out.update(load_state_dict(path / shard))
            return out
        if (path / single).exists():
            return load_state_dict(path / single)
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin (or their sharded index)")


def _float(x: np.ndarray) -> np.ndarray:
    """Floating tensors (bfloat16 included, which NumPy does not count as floating) as float32."""
    floating = np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16
    return x.astype(np.float32) if floating else x

"""Reading and writing PyTorch weights as flat ``{name: numpy array}`` dicts, never executing pickled code.

Sources: ``.safetensors`` (read without torch), ``.pth`` / ``.pt`` / ``.bin`` (``torch.load(weights_only=True)``,
unwrapped from a ``model`` / ``state_dict`` / ``module`` key when the file holds a training checkpoint), and
Hugging Face model directories (``config.json`` beside ``model.safetensors`` or ``pytorch_model.bin``, sharded
or not).
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from cab_jax.errors import FileFormatError, PathError

StateDict = dict[str, np.ndarray]
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_WRAPPER_KEYS = ("model", "state_dict", "module", "model_state_dict")


def load_state_dict(path: str | pathlib.Path) -> StateDict:
    """The tensors of a ``.safetensors`` / ``.pth`` file or a Hugging Face directory, as float numpy arrays."""
    path = pathlib.Path(path)
    if not path.exists():
        raise PathError(f"no weights at {path}")
    if path.is_dir():
        return _load_hf_dir(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return _load_torch(path)
    raise FileFormatError(f"{path}: unknown weights format {path.suffix!r}; expected .safetensors, "
                     f"{', '.join(TORCH_SUFFIXES)} or a Hugging Face model directory")


def hf_config(path: str | pathlib.Path) -> dict:
    """``config.json`` of a Hugging Face model directory."""
    config = pathlib.Path(path) / "config.json"
    if not config.exists():
        raise PathError(f"{path} is not a Hugging Face model directory: no config.json")
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
        raise FileFormatError(f"{path}: cannot write {path.suffix!r}; use .safetensors or .pth")


def _load_safetensors(path: pathlib.Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return {k: _float(v) for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError) as e:  # truncated or not a safetensors file
        raise FileFormatError(f"{path}: not a readable safetensors file ({e})") from e


def check_readable(path: str | pathlib.Path) -> None:
    """``PathError`` / ``FileFormatError`` unless ``path`` looks like weights ``load_state_dict`` can read (the
    file's header, not its tensors: cheap, for checks before a run starts)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise PathError(f"no weights at {path}")
    if path.is_dir():
        _weight_files(path)
    elif path.suffix == ".safetensors":
        _check_safetensors_header(path)
    elif path.suffix in TORCH_SUFFIXES:
        _check_torch_header(path)
    else:
        raise FileFormatError(f"{path}: unknown weights format {path.suffix!r}; expected .safetensors, "
                              f"{', '.join(TORCH_SUFFIXES)} or a Hugging Face model directory")


def _check_safetensors_header(path: pathlib.Path) -> None:
    """A safetensors file starts with the length of its JSON header (8 bytes, little endian), then the header."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        try:
            if not 0 < size <= path.stat().st_size - 8:
                raise ValueError("bad header length")
            json.loads(f.read(size))
        except ValueError as e:
            raise FileFormatError(f"{path}: not a safetensors file (its header is not readable)") from e


def _check_torch_header(path: pathlib.Path) -> None:
    """``torch.save`` writes a zip archive (PyTorch >= 1.6) or, in the legacy format, a pickle (protocol 2-5)."""
    with path.open("rb") as f:
        head = f.read(4)
    is_zip = head == b"PK\x03\x04"
    is_pickle = len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5
    if not (is_zip or is_pickle):
        raise FileFormatError(f"{path}: not a PyTorch checkpoint: neither a zip archive nor a pickle")


def _load_torch(path: pathlib.Path) -> StateDict:
    _check_torch_header(path)
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs PyTorch (pip install torch); .safetensors files do not") from e
    import pickle

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"objects other than tensors ({found.group(1)})" if found else "a pickle the safe loader cannot read"
        raise FileFormatError(f"{path}: refused to load: the file holds {what}. Only tensors are read from PyTorch "
                              "files, never code or objects; convert it to .safetensors where you trust it") from None
    except (RuntimeError, EOFError, OSError) as e:  # truncated / corrupt archive
        raise FileFormatError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0]})") from e
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise FileFormatError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: _float(v.detach().cpu().float().numpy() if v.is_floating_point() else v.numpy())
            for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _weight_files(path: pathlib.Path) -> list[pathlib.Path]:
    """The weight files of a Hugging Face model directory (its shards when it has an index)."""
    hf_config(path)  # a clear error when config.json is missing
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = path / index_name
        if index.exists():
            return [path / shard for shard in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        if (path / single).exists():
            return [path / single]
    raise PathError(f"{path}: no model.safetensors or pytorch_model.bin (or their sharded index)")


def _load_hf_dir(path: pathlib.Path) -> StateDict:
    out: StateDict = {}
    for file in _weight_files(path):
        out.update(load_state_dict(file))
    return out


def _float(x: np.ndarray) -> np.ndarray:
    """Floating tensors (bfloat16 included, which NumPy does not count as floating) as float32."""
    floating = np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16
    return x.astype(np.float32) if floating else x

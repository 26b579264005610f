"""The one way to build a model: a name ("vit", "vim", "phi", "phi_mamba") and a named size or explicit fields.

    model = registry.build("vim", "small", num_classes=1000, rngs=nnx.Rngs(0))
    model = registry.build("vit", num_classes=10, embed_dim=64, depth=4, num_heads=2, rngs=nnx.Rngs(0))

Domains (from config fields), conversion, generation, benchmarks and tests all build through here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flax import nnx

from cab_jax.models.phi import PHI_SIZES, Phi
from cab_jax.models.phi_mamba import PHI_MAMBA_SIZES, PhiMamba
from cab_jax.models.vim import VIM_SIZES, Vim
from cab_jax.models.vit import VIT_SIZES, ViT


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    module: type[nnx.Module]
    sizes: Mapping[str, Any]  # size name -> a frozen dataclass of the architecture's fields


MODELS: Mapping[str, ModelSpec] = {
    "vit": ModelSpec(ViT, VIT_SIZES),
    "vim": ModelSpec(Vim, VIM_SIZES),
    "phi": ModelSpec(Phi, PHI_SIZES),
    "phi_mamba": ModelSpec(PhiMamba, PHI_MAMBA_SIZES),
}


def spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name]


def size_fields(name: str, size: str) -> dict[str, Any]:
    """The architecture fields of model ``name`` at named size ``size`` (e.g. "vim", "small")."""
    sizes = spec(name).sizes
    if size not in sizes:
        raise ValueError(f"unknown {name} size {size!r}; expected one of {sorted(sizes)}")
    return dataclasses.asdict(sizes[size])


def build(name: str, size: str | None = None, *, rngs: nnx.Rngs, **fields: Any) -> nnx.Module:
    """Model ``name`` with the fields of named ``size`` (if given), each overridden by ``fields``."""
    module = spec(name).module
    return module(**{**(size_fields(name, size) if size else {}), **fields}, rngs=rngs)


def abstract(name: str, size: str | None = None, **fields: Any) -> nnx.Module:
    """``build`` with ShapeDtypeStructs for parameters (nothing allocated, nothing computed)."""
    return nnx.eval_shape(lambda: build(name, size, rngs=nnx.Rngs(0), **fields))

"""The device mesh and what lives on it: the mesh from config, the logical-axis rules, the shardings of
parameters and batches, and per-device calls of code the SPMD partitioner cannot split (Pallas kernels).

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with parameters sharded over it) and
``tensor`` (model parallel). Parameters carry logical axis names (``logical_axes`` metadata); the rules
below map each logical name to a mesh axis. A dimension that the mesh axis does not divide stays
replicated, so odd sizes (10 classes, 197 tokens) never fail. Stacked layers' leading ``layers`` axis is
never split.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cab_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
LOGICAL_RULES: Mapping[str, str | None] = {
    "layers": None,
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "inner": "tensor",
    "classes": None,
    "vocab": "tensor",
}


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    """Mesh of shape (data, fsdp, tensor); one size may be -1 to take the remaining devices."""
    devices = jax.devices() if devices is None else devices
    sizes = [mesh_cfg[a] for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ConfigError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes, strict=True))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"config.mesh: {len(devices)} devices are not divisible by the fixed axes' "
                             f"product {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(f"config.mesh: {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, "
                         f"but {len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_axes(module: nnx.Module) -> dict:
    """Pure-dict tree (matching ``nnx.state(module).to_pure_dict()``) of each parameter's logical axes."""
    state = nnx.state(module)
    axes = jax.tree.map(lambda v: v.get_metadata().get("logical_axes"), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return axes.to_pure_dict()


def spec_for(shape: tuple[int, ...], axes: tuple[str | None, ...] | None, mesh: Mesh,
             rules: Mapping[str, str | None] = LOGICAL_RULES) -> PartitionSpec:
    """PartitionSpec for one array: each named dim goes to its rule's mesh axis when that axis divides it."""
    if axes is None:
        return PartitionSpec()
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match parameter shape {shape}")
    used, spec = set(), []
    for dim, name in zip(shape, axes, strict=True):
        mesh_axis = rules.get(name) if name is not None else None
        if mesh_axis is not None and mesh_axis not in used and dim % mesh.shape[mesh_axis] == 0:
            spec.append(mesh_axis)
            used.add(mesh_axis)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def param_shardings(params: dict, axes: dict, mesh: Mesh) -> dict:
    """NamedShardings for a pure-dict parameter tree, from its logical-axes tree."""
    flat_axes = traverse_util.flatten_dict(axes)
    return traverse_util.unflatten_dict({
        path: NamedSharding(mesh, spec_for(np.shape(leaf), flat_axes.get(path), mesh))
        for path, leaf in traverse_util.flatten_dict(params).items()})


def module_shardings(module: nnx.Module, mesh: Mesh) -> dict:
    """NamedShardings of a module's parameters (a pure-dict tree; the module may be abstract), from their logical
    axes."""
    return param_shardings(nnx.state(module).to_pure_dict(), logical_axes(module), mesh)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's local batch shard into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def split_axes(size: int, axes: Sequence[str | None]) -> tuple[str, ...] | None:
    """The axes among ``axes`` that the mesh being traced (``jax.sharding.use_abstract_mesh``) splits into more
    than one part, when together they divide a dimension of ``size``; None without a mesh or such axes."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    used = tuple(a for a in axes if a is not None and sizes.get(a, 1) > 1)
    if not used or size % math.prod(sizes[a] for a in used):
        return None
    return used


def call_per_device(fn: Callable, args: Sequence[Any], in_specs: Sequence[Any], out_specs: Any) -> Any:
    """``fn(*args)`` run once per device on its shard of the mesh being traced (``jax.shard_map``); None
    arguments pass through. For code the SPMD partitioner cannot split, such as Pallas kernels (custom calls),
    which would otherwise run on the whole batch on every device. Gradients of arguments replicated over a
    mesh axis are summed over it by ``shard_map``'s transpose."""
    present = [i for i, a in enumerate(args) if a is not None]

    def local(*xs):
        full = list(args)
        for i, x in zip(present, xs, strict=True):
            full[i] = x
        return fn(*full)

    return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(), in_specs=tuple(in_specs[i] for i in present),
                         out_specs=out_specs, check_vma=False)(*[args[i] for i in present])

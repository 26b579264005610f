"""Per-chip memory of a config's train step on TPU slices, estimated from shapes alone (nothing is allocated).

Per device: the train state's shards (parameters, AdamW moments, EMA) and the frozen teacher's, one more copy of the
parameter shards for the gradients, the device's rows of the batch and of the teacher's outputs, and the
activations the forward pass keeps for the backward pass (JAX's saved residuals of the loss at the device's batch,
the scan kernels' saved states included); with remat, also one layer's own residuals while its backward pass runs.
Activations are counted per device batch; tensor parallelism's split of them is not (an overestimate there).
``plan`` turns the estimate into the table README shows: per-chip need at the config's batch on slices of 8, 32
and 256 chips, and the largest per-chip batch that fits each TPU generation's HBM.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import ml_collections
import numpy as np

from cab_jax import sharding, train

# HBM per chip (GiB) of the TPU generations users have, and the slice sizes of the table.
HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}
SLICES = (8, 32, 256)
USABLE = 0.9  # of HBM: XLA's runtime, program and fragmentation take the rest


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Bytes per device of one train step (see the module docstring), at ``per_device_batch`` examples."""

    per_device_batch: int
    state: int
    teacher: int
    gradients: int
    inputs: int  # the device's batch rows and teacher outputs
    residuals: int
    layer_recompute: int

    @property
    def total(self) -> int:
        return self.state + self.teacher + self.gradients + self.inputs + self.residuals + self.layer_recompute


def shard_bytes(tree, shardings) -> int:
    """Bytes one device holds of ``tree`` (shapes and dtypes) placed by ``shardings`` (the matching tree)."""
    leaves, shard_leaves = jax.tree.leaves(tree), jax.tree.leaves(shardings)
    return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x, s in zip(leaves, shard_leaves, strict=True))


def _bytes(tree) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def activation_bytes(trainer: train.Trainer, state: dict, teacher: dict | None, batch: int) -> tuple[int, int]:
    """(residuals saved by the loss's forward pass, the device inputs: its batch and teacher outputs) at ``batch``
    examples, for a trainer built by ``train.abstract_setup``."""
    from jax._src.ad_checkpoint import saved_residuals  # what jax.ad_checkpoint.print_saved_residuals prints

    spec = trainer.domain.train_batch_spec(batch)
    inputs, targets = jax.eval_shape(lambda b: trainer.domain.prepare(jax.random.key(0), b, trainer.job.train), spec)
    teacher_out = None
    if trainer.teacher is not None:
        teacher_out = jax.eval_shape(lambda p, x: trainer.teacher.module(p)(x), teacher, inputs)

    def loss(params, inputs, targets, teacher_out):
        return train.loss_fn(trainer, params, inputs, targets, teacher_out, None)[0]

    residuals = saved_residuals(loss, state["params"], inputs, targets, teacher_out)
    kept = sum(math.prod(aval.shape) * aval.dtype.itemsize for aval, source in residuals
               if not source.startswith("from the argument"))
    return kept, _bytes((spec, teacher_out))


@dataclasses.dataclass(frozen=True)
class Activations:
    """Per-device activation bytes as a line in the batch b: ``fixed + b * per_example`` of each part."""

    fixed: tuple[int, int, int]  # inputs, residuals, layer recompute
    per_example: tuple[int, int, int]

    def at(self, batch: int) -> tuple[int, int, int]:
        return tuple(f + batch * p for f, p in zip(self.fixed, self.per_example, strict=True))


def activations(c: ml_collections.ConfigDict, device) -> Activations:
    """``c``'s activation line, from its residuals at batch 1 and 2 on one ``device`` (and, with remat, those of
    the same model without remat: one layer's share is what its backward pass holds)."""
    single = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), [device])
    built = train.abstract_setup(c, single)
    points = {b: activation_bytes(*built, b) for b in (1, 2)}
    recompute = {1: 0, 2: 0}
    if c.student.remat:
        flat = ml_collections.ConfigDict(c.to_dict())
        flat.student.remat = False
        flat_built = train.abstract_setup(flat, single)
        recompute = {b: activation_bytes(*flat_built, b)[0] // c.student.depth for b in (1, 2)}
    at = {b: (points[b][1], points[b][0], recompute[b]) for b in (1, 2)}
    per_example = tuple(two - one for one, two in zip(at[1], at[2], strict=True))
    return Activations(tuple(one - p for one, p in zip(at[1], per_example, strict=True)), per_example)


def estimate(c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, acts: Activations,
             per_device_batch: int | None = None) -> Estimate:
    """The per-device estimate of ``c``'s train step on ``mesh`` (``c`` as ``lower.lowering_config`` leaves it),
    at the config's batch unless ``per_device_batch`` is given; ``acts``: ``activations(c, ...)``."""
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = per_device_batch or -(-c.train.batch_size // data_parallel)  # at least one example per device
    trainer, state, teacher = train.abstract_setup(c, mesh)
    grads = shard_bytes(state["params"], trainer.state_shardings["params"])
    return Estimate(batch, shard_bytes(state, trainer.state_shardings),
                    shard_bytes(teacher, trainer.teacher_shardings) if teacher is not None else 0, grads,
                    *acts.at(batch))


def largest_batch(e: Estimate, acts: Activations, hbm_bytes: float) -> int:
    """The largest per-device batch whose estimate (``e``'s at another batch) fits ``USABLE`` of ``hbm_bytes``
    (0 if none)."""
    fixed = e.state + e.teacher + e.gradients + sum(acts.fixed)
    per_example = sum(acts.per_example)
    return max(int((USABLE * hbm_bytes - fixed) // per_example), 0) if per_example > 0 else 0


def plan(c: ml_collections.ConfigDict, devices: list) -> list[dict]:
    """Rows of the per-chip table for ``c`` (its mesh with -1 filled per slice) on slices of ``SLICES`` chips,
    taken from ``devices`` (at least ``max(SLICES)`` fake devices). A slice with more data-parallel chips than the
    config's batch has examples gets one per chip (the global batch column says so)."""
    acts = activations(c, devices[0])
    rows = []
    for chips in SLICES:
        mesh = sharding.make_mesh(c.mesh, devices[:chips])
        e = estimate(c, mesh, acts)
        row = {"chips": chips, "mesh": " x ".join(f"{k} {v}" for k, v in mesh.shape.items() if v > 1) or "1",
               "global batch": e.per_device_batch * mesh.shape["data"] * mesh.shape["fsdp"],
               "batch / chip": e.per_device_batch, "GiB / chip": round(e.total / 2**30, 2),
               "state, teacher, grads": round((e.state + e.teacher + e.gradients) / 2**30, 2),
               "activations": round((e.inputs + e.residuals + e.layer_recompute) / 2**30, 2)}
        for generation, gib in HBM_GIB.items():
            row[f"max batch / chip {generation}"] = largest_batch(e, acts, gib * 2**30)
        rows.append(row)
    return rows

"""What a config will do, as ``python -m cab_jax.main --print_config`` shows it: the resolved fields, then the
values derived from them for the devices present (steps, warmup, learning rate, epochs, batches, mesh, parameter
counts), without training."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from cab_jax import config as config_lib
from cab_jax import domains, sharding
from cab_jax.errors import UserError


def parameter_count(build: domains.ModelFactory) -> int:
    """Parameters of the model ``build`` makes, counted on its abstract shapes (nothing is allocated)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: build(nnx.Rngs(0))))))


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"


def describe_job(c: ml_collections.ConfigDict, mesh_shape: dict[str, int]) -> list[str]:
    """Lines describing the run ``c.task`` asks for (``distill`` or ``train_teacher``) on a mesh of this shape."""
    domain = domains.for_config(c)
    job = domain.job()
    t = job.train
    w = job.weights
    terms = ", ".join(f"{name} x {getattr(w, name):g}" for name in ("ce", "kl", "bridge") if getattr(w, name))
    lines = [f"trains: the {job.trains} ({c[job.trains].model}); loss: {terms}"]
    try:
        train_size = domain.data.train_size(job.data)
    except UserError as e:
        train_size = None
        lines.append(f"train examples: unknown ({e})")
    else:
        fraction = job.data.get("subset_fraction", 1.0)
        subset = f", {100 * fraction:g} % of each class" if fraction < 1 and not job.data.synthetic else ""
        source = "random (data.synthetic)" if job.data.synthetic else f"{job.data.name} {job.data.train_split}"
        lines.append(f"train examples: {train_size:,} ({source}{subset})")
    data_parallel = mesh_shape["data"] * mesh_shape["fsdp"]
    eval_batch = config_lib.eval_batch_size(t)
    lines.append(f"batch: {t.batch_size} global, {t.batch_size // data_parallel} per device; eval batch "
                 f"{eval_batch} global, {eval_batch // data_parallel} per device")
    peak = t.base_lr * t.batch_size / t.lr_reference_batch
    lines.append(f"peak lr: {peak:.4g} (= {t.base_lr:g} x {t.batch_size} / {t.lr_reference_batch}), {t.lr_decay} decay "
                 f"to {t.min_lr:g}")
    if train_size is None and t.steps is None:
        fraction = job.data.get("subset_fraction", 1.0)
        epochs = t.epochs if t.epochs is not None else config_lib.EPOCHS_BY_FRACTION.get(fraction)
        lines.append(f"epochs: {epochs:g} (steps follow from the training-set size)")
    if train_size is not None:
        sched = config_lib.schedule(t, train_size, job.data.get("subset_fraction", 1.0))
        epochs = sched.total_steps / sched.steps_per_epoch
        source = "train.steps" if t.steps is not None else "train.epochs" if t.epochs is not None else \
            "the recipe's epochs for the subset"
        lines.append(f"steps: {sched.total_steps:,} ({epochs:.4g} epochs of {sched.steps_per_epoch:,} steps, from "
                     f"{source}); warmup {sched.warmup_steps:,} steps")
    counts = [f"{job.trains} {_millions(parameter_count(job.model))}"]
    if job.bridge is not None:
        counts.append(f"bridges {_millions(parameter_count(job.bridge))}")
    if job.teacher is not None:
        counts.append(f"frozen teacher {_millions(parameter_count(job.teacher))}")
    lines.append("parameters: " + ", ".join(counts))
    return lines


def describe(c: ml_collections.ConfigDict, data_dir: str | None = None) -> str:
    """The resolved config and its derived values. ``data_dir``: where a study builds the embedded datasets
    (used when ``c.data.data_dir`` is empty)."""
    config_lib.validate(c)  # the mesh fields too, before the mesh is made from them
    mesh = sharding.make_mesh(c.mesh)
    config_lib.validate(c, mesh.shape)
    devices = jax.devices()
    lines = ["# config", str(c).rstrip(), "", "# derived",
             f"devices: {len(devices)} x {devices[0].device_kind} ({jax.process_count()} process(es)); mesh "
             + " x ".join(f"{axis} {size}" for axis, size in mesh.shape.items())]
    if data_dir and not c.data.data_dir:
        c = ml_collections.ConfigDict(c.to_dict())
        c.data.data_dir = data_dir
    if c.task != "study":
        return "\n".join(lines + describe_job(c, dict(mesh.shape)))
    teacher = ml_collections.ConfigDict(c.to_dict())
    teacher.task = "train_teacher"
    student = ml_collections.ConfigDict(c.to_dict())
    student.task = "distill"
    stages = [("teacher, once", teacher)] + [(f"student, loss mode {mode}", _with_mode(student, mode))
                                             for mode in c.study.modes]
    for title, stage in stages:
        lines += [f"study stage: {title}"] + [f"  {line}" for line in describe_job(stage, dict(mesh.shape))]
    return "\n".join(lines)


def _with_mode(c: ml_collections.ConfigDict, mode: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(c.to_dict())
    c.loss.mode = mode
    if c.domain == "language":
        c.student.init_from_attention = mode in c.study.init_from_attention_modes
    return c


def markdown_table(rows: list[dict], columns: Sequence[str] | None = None) -> str:
    """A Markdown table, one line per row; the columns default to every key, in first-seen order, and a row without
    a column's key leaves its cell empty. A "|" in a name or a cell is escaped (``max |y - ref|`` stays one cell)."""
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    cells = lambda values: "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"
    lines = [cells(columns), "|" + "---|" * len(columns)]
    lines += [cells(row.get(col, "") for col in columns) for row in rows]
    return "\n".join(lines)

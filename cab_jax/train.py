"""Train state, optimizer, sharded train/eval steps and the training loop (teacher or student)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from cab_jax import checkpoint, sharding
from cab_jax import config as config_lib
from cab_jax.bridge import AttentionBridge
from cab_jax.convert.weights import load_model_weights
from cab_jax.losses import LossWeights
from cab_jax.tasks import Task, task_for

NO_DECAY_NAMES = frozenset({"pos_embed", "cls_token", "A_log"})
State = dict[str, Any]


# ----------------------------------------------------------------------------------------------- models


def build_teacher(c: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    return task_for(c, "teacher").build_teacher(rngs)


def build_student(c: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    return task_for(c).build_student(rngs)


def build_bridge(c: ml_collections.ConfigDict, rngs: nnx.Rngs) -> AttentionBridge:
    return task_for(c).build_bridge(rngs)


@dataclasses.dataclass(frozen=True)
class Functional:
    """An NNX module split into its static graph and an abstract state; ``apply`` runs it on a pure-dict
    parameter tree, so parameters can live in plain pytrees (jit arguments, optax, orbax)."""

    graphdef: nnx.GraphDef
    abstract: nnx.State

    @classmethod
    def split(cls, module: nnx.Module) -> tuple[Functional, dict]:
        graphdef, state = nnx.split(module)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        return cls(graphdef, abstract), state.to_pure_dict()

    def module(self, params: dict) -> nnx.Module:
        state = jax.tree.map(lambda x: x, self.abstract)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)


# -------------------------------------------------------------------------------------------- optimizer


def decay_mask(params: dict) -> dict:
    """Weight decay on matrices only: not on norms, biases, D (1-D) nor pos_embed, cls_token, A_log."""
    def keep(path, leaf) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        return np.ndim(leaf) >= 2 and name not in NO_DECAY_NAMES
    return jax.tree_util.tree_map_with_path(keep, params)


def learning_rate_fn(t: ml_collections.ConfigDict, sched: config_lib.Schedule) -> optax.Schedule:
    """Linear warmup from ``warmup_lr`` to the peak, then cosine (or, with ``lr_decay="linear"``, linear) decay
    to ``min_lr``."""
    decay_steps = max(1, sched.total_steps - sched.warmup_steps)
    if t.lr_decay == "linear":
        decay = optax.linear_schedule(sched.peak_lr, t.min_lr, decay_steps)
    else:
        decay = optax.cosine_decay_schedule(sched.peak_lr, decay_steps,
                                            alpha=t.min_lr / sched.peak_lr if sched.peak_lr > 0 else 0.0)
    if sched.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(t.warmup_lr, sched.peak_lr, sched.warmup_steps)
    return optax.join_schedules([warmup, decay], [sched.warmup_steps])


def make_optimizer(t: ml_collections.ConfigDict, lr_fn: optax.Schedule) -> optax.GradientTransformation:
    tx = optax.adamw(lr_fn, b1=0.9, b2=0.999, eps=1e-8, weight_decay=t.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), tx) if t.grad_clip > 0 else tx


# --------------------------------------------------------------------------------------------- trainer


@dataclasses.dataclass
class Trainer:
    """Sharded train and eval steps for one model (plus bridge and frozen teacher when distilling).

    The state is a dict: step, params {"model", ["bridge"]}, opt_state, rng, [ema]. The teacher's
    parameters are a separate, read-only argument of the train step. ``task`` supplies what depends on
    the domain (batch -> inputs and targets, losses, metrics).
    """

    mesh: Mesh
    task: Task
    model: Functional
    tx: optax.GradientTransformation
    lr_fn: optax.Schedule
    weights: LossWeights
    bridge: Functional | None = None
    teacher: Functional | None = None
    cls_position: int | None = 0
    detach_student: bool = False
    temperature: float = 1.0

    def init_state(self, params: dict, seed: int, param_axes: dict) -> State:
        """Place ``params`` on the mesh by their logical axes and build the optimizer state there."""
        shardings = sharding.param_shardings(params, param_axes, self.mesh)
        params = jax.device_put(params, shardings)
        rep = sharding.replicated(self.mesh)

        def init(params):
            state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params),
                     "rng": jax.random.key_data(jax.random.key(seed))}
            if self.task.train_cfg.ema_decay > 0:
                state["ema"] = jax.tree.map(jnp.copy, params)
            return state

        abstract = jax.eval_shape(init, params)
        out_shardings = {k: rep for k in abstract}
        out_shardings["params"] = shardings
        if "ema" in abstract:
            out_shardings["ema"] = shardings
        # Optimizer moments mirror the parameters and follow their shardings; counters are replicated.
        out_shardings["opt_state"] = optax.tree_map_params(
            self.tx, lambda _, s: s, abstract["opt_state"], shardings, transform_non_params=lambda _: rep)
        self.state_shardings = out_shardings
        return jax.jit(init, out_shardings=out_shardings)(params)

    # ---- steps

    def _loss(self, params: dict, inputs: jax.Array, targets, teacher_out, key: jax.Array | None):
        logits, aux = self.task.forward(self.model.module(params["model"]), inputs, key)
        terms = {}
        if self.weights.ce:
            terms["ce"] = self.task.ce(logits, targets)
        if self.weights.kl:
            terms["kl"] = self.task.kl(logits, teacher_out[0], targets, self.temperature)
        if self.weights.bridge:
            projections = self.task.bridge_inputs(jax.lax.stop_gradient(aux) if self.detach_student else aux)
            terms["bridge"] = self.bridge.module(params["bridge"])(projections, teacher_out[1], self.cls_position)
        total = sum(getattr(self.weights, name) * value for name, value in terms.items())
        return total, (terms, logits)

    def train_step(self, state: State, teacher_params: dict | None, batch: dict) -> tuple[State, dict]:
        # The mesh is visible while tracing so that kernels (Pallas scans) can run per device on their shard.
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
            return self._train_step(state, teacher_params, batch)

    def _train_step(self, state: State, teacher_params: dict | None, batch: dict) -> tuple[State, dict]:
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        prepare_key, drop_key = jax.random.split(step_key)
        inputs, targets = self.task.prepare(prepare_key, batch)
        teacher_out = None
        if self.weights.needs_teacher:
            teacher_out = jax.lax.stop_gradient(self.teacher.module(teacher_params)(inputs))
        (loss, (terms, logits)), grads = jax.value_and_grad(self._loss, has_aux=True)(
            state["params"], inputs, targets, teacher_out, drop_key)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state}
        if "ema" in state:
            d = self.task.train_cfg.ema_decay
            new_state["ema"] = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state["ema"], params)
        metrics = {"loss": loss, **terms, "lr": self.lr_fn(state["step"]), "grad_norm": optax.global_norm(grads),
                   **self.task.train_metrics(logits, targets)}
        return new_state, metrics

    def eval_step(self, params: dict, batch: dict) -> dict:
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
            logits, _ = self.task.forward(self.model.module(params), self.task.eval_inputs(batch))
        return self.task.eval_sums(logits, batch)

    def compile(self, teacher_shardings) -> None:
        """jit both steps with explicit shardings; the train step donates the state."""
        batch = sharding.batch_sharding(self.mesh)
        rep = sharding.replicated(self.mesh)
        self.jit_train_step = jax.jit(
            self.train_step, in_shardings=(self.state_shardings, teacher_shardings, batch),
            out_shardings=(self.state_shardings, rep), donate_argnums=(0,))
        self.jit_eval_step = jax.jit(self.eval_step, in_shardings=(self.state_shardings["params"]["model"], batch),
                                     out_shardings=rep)

    def evaluate(self, params: dict, batches: Iterable[dict]) -> dict[str, float]:
        totals = None
        for local in batches:
            out = self.jit_eval_step(params, sharding.global_batch(local, self.mesh))
            totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        return self.task.summarize(jax.device_get(totals))


# ------------------------------------------------------------------------------------------------ loop


class StopRequest:
    """SIGINT/SIGTERM set a flag so the loop can checkpoint and exit; a second Ctrl-C aborts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # signals can only be set from the main thread
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logging.warning("Stop requested (signal %d): saving a checkpoint, then exiting.", signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class MetricsWriter:
    """Appends one JSON object per line to ``workdir/metrics.jsonl``."""

    def __init__(self, workdir: epath.Path):
        self.path = workdir / "metrics.jsonl"
        self.enabled = jax.process_index() == 0

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, "split": split, **values}) + "\n")


@dataclasses.dataclass
class RunResult:
    metrics: dict[str, float]  # the final evaluation (top1/top5, or eval_loss/perplexity/token_acc)
    steps: int
    wall_time_s: float
    train_examples: int
    stopped_early: bool = False


@dataclasses.dataclass
class Setup:
    trainer: Trainer
    state: State
    teacher_params: dict | None
    sched: config_lib.Schedule


def setup(c: ml_collections.ConfigDict, *, role: str, mesh: Mesh, train_size: int,
          subset_fraction: float = 1.0) -> Setup:
    """Build the models, optimizer, initial sharded state, frozen teacher and compiled steps for ``role``."""
    task = task_for(c, role)
    train_cfg = task.train_cfg
    sched = config_lib.schedule(train_cfg, train_size, subset_fraction)
    lr_fn = learning_rate_fn(train_cfg, sched)
    rngs = nnx.Rngs(c.seed)
    weights = task.loss_weights()
    student = role == "student"

    model = task.build_teacher(rngs) if role == "teacher" else task.build_student(rngs)
    model_fn, model_params = Functional.split(model)
    if student and c.student.init_from:  # start from given weights (a resumed run restores later)
        model_params = load_model_weights(c.student.init_from, c, "student", model_params)
    bridge_fn = teacher_fn = None
    teacher_params = teacher_shardings = None
    if student and (weights.needs_teacher or task.attention_init):
        teacher = task.build_teacher(nnx.Rngs(c.seed + 1))
        teacher_fn, teacher_params = Functional.split(teacher)
        teacher_shardings = sharding.param_shardings(teacher_params, sharding.logical_axes(teacher), mesh)
        teacher_params = load_teacher(c, teacher_params, teacher_shardings)
    if task.attention_init:
        student_module = model_fn.module(model_params)
        task.init_student_from_teacher(student_module, teacher_fn.module(teacher_params))
        model_params = nnx.state(student_module).to_pure_dict()
        logging.info("Student initialised from the teacher's attention, MLPs, norms and embeddings.")
    if not weights.needs_teacher:
        teacher_fn = teacher_params = teacher_shardings = None
    params, axes = {"model": model_params}, {"model": sharding.logical_axes(model)}
    if student and weights.bridge > 0:
        bridge = task.build_bridge(rngs)
        bridge_fn, params["bridge"] = Functional.split(bridge)
        axes["bridge"] = sharding.logical_axes(bridge)

    trainer = Trainer(mesh=mesh, task=task, model=model_fn, tx=make_optimizer(train_cfg, lr_fn), lr_fn=lr_fn,
                      weights=weights, bridge=bridge_fn, teacher=teacher_fn,
                      cls_position=task.cls_position(model), detach_student=c.bridge.detach_student,
                      temperature=c.loss.temperature)
    state = trainer.init_state(params, c.seed, axes)
    trainer.compile(teacher_shardings)

    return Setup(trainer, state, teacher_params, sched)


def save_run_config(workdir: epath.Path, c: ml_collections.ConfigDict, role: str) -> None:
    """``workdir/run_config.json``: what was trained, so tools (``cab_jax.generate``) can rebuild the model."""
    if jax.process_index() == 0:
        meta = {"role": role, "config": json.loads(c.to_json_best_effort())}
        (workdir / "run_config.json").write_text(json.dumps(meta, indent=1))


def run(c: ml_collections.ConfigDict, workdir: str, *, role: str = "student",
        on_step: Callable[[int], None] | None = None) -> RunResult:
    """Train the student (``role="student"``, distillation per ``c.loss``) or the teacher
    (``role="teacher"``, supervised on the full train split with ``c.teacher.train``), resuming from the
    latest checkpoint in ``workdir``. ``on_step`` is called after each step (tests use it)."""
    task = task_for(c, role)
    config_lib.validate(c)
    workdir_path = epath.Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(c.mesh)
    train_cfg = task.train_cfg
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    for name in ("batch_size", "eval_batch_size"):
        if train_cfg[name] % data_parallel:
            raise ValueError(f"config.{'teacher.' if role == 'teacher' else ''}train.{name} "
                             f"({train_cfg[name]}) must be divisible by the data-parallel mesh size {data_parallel}")

    train_size = task.train_size()
    built = setup(c, role=role, mesh=mesh, train_size=train_size,
                  subset_fraction=task.data_cfg().get("subset_fraction", 1.0))
    trainer, state, teacher_params, sched = built.trainer, built.state, built.teacher_params, built.sched

    train_iter = task.train_iterator(train_cfg.batch_size, c.seed)
    eval_batches = task.eval_batches(train_cfg.eval_batch_size)
    ckpt = checkpoint.RunCheckpointer(workdir_path / "checkpoints", keep=train_cfg.keep_checkpoints)
    state, restored_step = ckpt.restore(state, train_iter)
    save_run_config(workdir_path, c, role)
    writer = MetricsWriter(workdir_path)
    step = int(restored_step or 0)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]["model"]))
    logging.info("%s: %d parameters, %d train examples, %d steps (%d warmup, %d per epoch), peak lr %.3g, "
                 "mesh %s, %s", role, n_params, train_size, sched.total_steps, sched.warmup_steps,
                 sched.steps_per_epoch, sched.peak_lr, dict(mesh.shape),
                 f"resumed at step {step}" if restored_step else "starting fresh")

    start, interval_start, interval_steps, stopped = time.time(), time.time(), 0, False
    eval_params = lambda s: s["ema"]["model"] if "ema" in s else s["params"]["model"]
    with StopRequest() as stop:
        while step < sched.total_steps:
            batch = sharding.global_batch(next(train_iter), mesh)
            state, metrics = trainer.jit_train_step(state, teacher_params, batch)
            step += 1
            interval_steps += 1
            if on_step is not None:
                on_step(step)
            if step % train_cfg.log_every == 0 or step == sched.total_steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.time() - interval_start
                values.update(task.throughput(interval_steps * train_cfg.batch_size / max(elapsed, 1e-9)))
                writer.write(step, "train", values)
                logging.info("[%s %d/%d] %s", role, step, sched.total_steps,
                             " ".join(f"{k}={v:.4g}" for k, v in values.items()))
                interval_start, interval_steps = time.time(), 0
            if train_cfg.eval_every and step % train_cfg.eval_every == 0 and step < sched.total_steps:
                result = trainer.evaluate(eval_params(state), eval_batches)
                writer.write(step, "eval", result)
                logging.info("[%s %d/%d] eval %s", role, step, sched.total_steps, result)
            if (step % train_cfg.checkpoint_every == 0 and step < sched.total_steps) or stop.requested:
                ckpt.save(step, state, train_iter)
            if stop.requested:
                stopped = True
                break
    if not stopped and ckpt.latest_step() != step:
        ckpt.save(step, state, train_iter)
    ckpt.wait()
    ckpt.close()
    if stopped:
        logging.warning("Stopped at step %d; run the same command again to resume.", step)
        return RunResult({}, step, time.time() - start, train_size, stopped_early=True)
    result = trainer.evaluate(eval_params(state), eval_batches)
    writer.write(step, "eval", result)
    logging.info("[%s] final eval at step %d: %s", role, step, result)
    return RunResult(result, step, time.time() - start, train_size)


def load_teacher(c: ml_collections.ConfigDict, params: dict, shardings: dict) -> dict:
    """The frozen teacher's parameters: from ``c.teacher.init_from``, or random (synthetic data only)."""
    if c.teacher.init_from:
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
        return jax.device_put(load_model_weights(c.teacher.init_from, c, "teacher", target), shardings)
    if not c.data.synthetic:
        raise ValueError("config.teacher.init_from is empty: distillation needs trained teacher weights (a "
                         "train_teacher workdir); only data.synthetic=True runs allow a random teacher")
    logging.warning("No teacher.init_from: using a randomly initialised teacher (synthetic-data run).")
    return jax.device_put(params, shardings)

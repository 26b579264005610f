"""Training one model: the train state and optimizer, the sharded train and eval steps, and the loop with
checkpoints, metrics and resume (``train_and_evaluate``).

What is trained comes from the domain's :class:`~cab_jax.domains.Job`: the student by distillation (with a frozen
teacher and the attention bridge), or the teacher on labels.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx, traverse_util
from jax.sharding import Mesh

from cab_jax import checkpoint, domains, preemption, prefetch, sharding
from cab_jax import config as config_lib
from cab_jax.convert.weights import check_source, load_model_weights
from cab_jax.errors import ConfigError, DivergedError, PathError, UserError
from cab_jax.losses import attention_transfer

NO_DECAY_NAMES = frozenset({"pos_embed", "cls_token", "A_log"})
State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Functional:
    """An NNX module split into its static graph and an abstract state; ``module`` runs it on a pure-dict
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


def decay_mask(params: dict, axes: dict) -> dict:
    """Weight decay on weight matrices only: not on norms, biases, D (1-D per layer) nor pos_embed, cls_token,
    A_log. ``axes`` (the logical-axes tree) tells stacked layers' parameters, whose first axis is "layers"."""
    flat_axes = traverse_util.flatten_dict(axes)

    def decays(path: tuple, leaf) -> bool:
        stacked = (flat_axes.get(path) or (None,))[0] == "layers"
        return np.ndim(leaf) - stacked >= 2 and path[-1] not in NO_DECAY_NAMES

    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: decays(path, leaf) for path, leaf in flat.items()})


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


def make_optimizer(t: ml_collections.ConfigDict, lr_fn: optax.Schedule, mask: dict) -> optax.GradientTransformation:
    """AdamW with weight decay where ``mask`` is True (see ``decay_mask``), after an optional global-norm clip."""
    tx = optax.adamw(lr_fn, b1=0.9, b2=0.999, eps=1e-8, weight_decay=t.weight_decay, mask=mask)
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), tx) if t.grad_clip > 0 else tx


# ---------------------------------------------------------------------------------------------- trainer


@dataclasses.dataclass(frozen=True)
class Trainer:
    """What a run's steps need, complete when built by :func:`create_trainer`: the domain and its job, the
    functional models, the optimizer and schedule, and the shardings of the state and the frozen teacher.

    The state is a dict: step, params {"model", ["bridge"]}, opt_state, rng, [ema]. The teacher's parameters
    are a separate, read-only argument of the train step, never part of the state (nor of checkpoints)."""

    c: ml_collections.ConfigDict
    domain: domains.Domain
    job: domains.Job
    mesh: Mesh
    sched: config_lib.Schedule
    lr_fn: optax.Schedule
    tx: optax.GradientTransformation
    model: Functional
    bridge: Functional | None
    teacher: Functional | None
    cls_position: int | None
    state_shardings: dict
    teacher_shardings: dict | None

    @functools.cached_property
    def jit_train_step(self) -> Callable[[State, dict | None, dict], tuple[State, dict]]:
        """``train_step`` jitted with explicit shardings; it donates the state. On GPUs it compiles with the job's
        ``xla_gpu_options``."""
        on_gpu = self.mesh.devices.flat[0].platform == "gpu"
        return jax.jit(functools.partial(train_step, self),
                       in_shardings=(self.state_shardings, self.teacher_shardings, sharding.batch_sharding(self.mesh)),
                       out_shardings=(self.state_shardings, sharding.replicated(self.mesh)), donate_argnums=(0,),
                       compiler_options=config_lib.xla_options(self.job.train.xla_gpu_options) if on_gpu else None)

    @functools.cached_property
    def jit_eval_step(self) -> Callable[[dict, dict], dict]:
        """``eval_step`` jitted with explicit shardings."""
        return jax.jit(functools.partial(eval_step, self),
                       in_shardings=(self.state_shardings["params"]["model"], sharding.batch_sharding(self.mesh)),
                       out_shardings=sharding.replicated(self.mesh))

    def evaluate(self, params: dict, batches: Iterable[dict]) -> dict[str, float]:
        """The domain's metrics over one pass of ``batches`` (each process's local batches)."""
        return evaluate(self, self.jit_eval_step, params, batches)


class Setup(NamedTuple):
    trainer: Trainer
    state: State  # the initial train state, sharded
    teacher_params: dict | None  # the frozen teacher, sharded (None when the job needs none)


def create_trainer(c: ml_collections.ConfigDict, mesh: Mesh, train_size: int) -> Setup:
    """Build the models, optimizer, initial sharded state and frozen teacher for the job ``c.task`` asks for."""
    domain = domains.for_config(c)
    job = domain.job()
    sched = config_lib.schedule(job.train, train_size, job.data.get("subset_fraction", 1.0))
    lr_fn = learning_rate_fn(job.train, sched)

    # The student and its bridges draw from one RNG stream (the bridge's initialisation follows the student's).
    modules, inits, axes_of = init_modules(lambda rngs: (job.model(rngs), *([job.bridge(rngs)] if job.bridge else [])),
                                           c.seed, mesh)
    model, model_params = modules[0], inits[0]
    model_fn = Functional.split(model)[0]
    if job.init_from:  # start from given weights (a resumed run restores later)
        model_params = load_model_weights(job.init_from, model, model_params)
    teacher_fn = teacher_params = teacher_shardings = None
    if job.teacher is not None:
        teacher_build = lambda rngs: (job.teacher(rngs),)
        if c.teacher.init_from:
            (teacher,) = nnx.eval_shape(lambda: teacher_build(nnx.Rngs(c.seed + 1)))
            teacher_params = None
        else:
            (teacher,), (teacher_params,), _ = init_modules(teacher_build, c.seed + 1, mesh)
        teacher_fn = Functional.split(teacher)[0]
        teacher_shardings = sharding.module_shardings(teacher, mesh)
        teacher_params = load_teacher(c, teacher, teacher_params, teacher_shardings)
    if job.init_from_teacher is not None:
        student = model_fn.module(model_params)
        job.init_from_teacher(student, teacher_fn.module(teacher_params))
        model_params = nnx.state(student).to_pure_dict()
        logging.info("Student initialised from the teacher's attention, MLPs, norms and embeddings.")
    if not job.weights.needs_teacher:  # the teacher was needed for the initialisation only
        teacher_fn = teacher_params = teacher_shardings = None
    params, axes = {"model": model_params}, {"model": axes_of[0]}
    bridge_fn = None
    if job.bridge is not None:
        bridge_fn = Functional.split(modules[1])[0]
        params["bridge"], axes["bridge"] = inits[1], axes_of[1]

    tx = make_optimizer(job.train, lr_fn, decay_mask(params, axes))
    state, state_shardings = init_state(params, axes, tx, mesh, c.seed, job.train.ema_decay > 0)
    trainer = Trainer(c=c, domain=domain, job=job, mesh=mesh, sched=sched, lr_fn=lr_fn, tx=tx, model=model_fn,
                      bridge=bridge_fn, teacher=teacher_fn,
                      cls_position=None if job.teacher is None else domain.cls_position(model),  # the student's
                      state_shardings=state_shardings, teacher_shardings=teacher_shardings)
    return Setup(trainer, state, teacher_params)


def abstract_setup(c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                   ) -> tuple[Trainer, dict, dict | None]:
    """The trainer of ``c`` on ``mesh`` and its state and teacher parameters as shapes only (nothing allocated)."""
    built = {}

    def build():
        setup = create_trainer(c, mesh, train_size=c.train.batch_size)
        built["trainer"] = setup.trainer
        return setup.state, setup.teacher_params

    state, teacher = jax.eval_shape(build)
    return built["trainer"], state, teacher


def init_modules(build: Callable[[nnx.Rngs], tuple[nnx.Module, ...]], seed: int, mesh: Mesh
                 ) -> tuple[tuple[nnx.Module, ...], tuple[dict, ...], tuple[dict, ...]]:
    """``build(nnx.Rngs(seed))``'s modules, traced once: their parameters initialised by one jitted call straight
    into their shardings on ``mesh`` (no device holds a whole large model first), the modules themselves abstract
    (no arrays), and their logical axes: ``(modules, params, axes)``, tuples in ``build``'s order."""
    traced = {}

    def init() -> tuple[dict, ...]:
        modules = build(nnx.Rngs(seed))
        graphdef, state = nnx.split(modules)
        traced["graphdef"], traced["state"] = graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                                     state)
        params = tuple(nnx.state(m).to_pure_dict() for m in modules)
        return jax.lax.with_sharding_constraint(params, tuple(sharding.module_shardings(m, mesh) for m in modules))

    params = jax.jit(init)()
    modules = nnx.merge(traced["graphdef"], traced["state"])
    return modules, params, tuple(sharding.logical_axes(m) for m in modules)


def init_state(params: dict, axes: dict, tx: optax.GradientTransformation, mesh: Mesh, seed: int, ema: bool
               ) -> tuple[State, dict]:
    """The initial train state on ``mesh`` (parameters placed by their logical ``axes``, optimizer moments
    sharded like them, counters replicated) and its shardings."""
    shardings = sharding.param_shardings(params, axes, mesh)
    params = jax.device_put(params, shardings)
    rep = sharding.replicated(mesh)

    def init(params):
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
                 "rng": jax.random.key_data(jax.random.key(seed))}
        if ema:
            state["ema"] = jax.tree.map(jnp.copy, params)
        return state

    abstract = jax.eval_shape(init, params)
    out_shardings = {k: rep for k in abstract}
    out_shardings["params"] = shardings
    if ema:
        out_shardings["ema"] = shardings
    out_shardings["opt_state"] = optax.tree_map_params(
        tx, lambda _, s: s, abstract["opt_state"], shardings, transform_non_params=lambda _: rep)
    return jax.jit(init, out_shardings=out_shardings)(params), out_shardings


# ------------------------------------------------------------------------------------------------ steps


def loss_fn(trainer: Trainer, params: dict, inputs: jax.Array, targets: Any, teacher_out: Any,
            key: jax.Array | None) -> tuple[jax.Array, tuple[dict, jax.Array]]:
    """The job's weighted loss: total and (terms, logits)."""
    domain, weights, c = trainer.domain, trainer.job.weights, trainer.c
    with jax.named_scope("student"):
        logits, aux = domain.forward(trainer.model.module(params["model"]), inputs, key)
    terms = {}
    with jax.named_scope("soft_loss"):
        if weights.ce:
            terms["ce"] = domain.ce(logits, targets)
        if weights.kl:
            terms["kl"] = domain.kl(logits, teacher_out[0], targets, c.loss.temperature)
    if weights.bridge:
        with jax.named_scope("bridge"):
            projections = domain.bridge_inputs(jax.lax.stop_gradient(aux) if c.bridge.detach_student else aux)
            terms["bridge"] = trainer.bridge.module(params["bridge"])(projections, teacher_out[1],
                                                                      trainer.cls_position)
    if weights.attention:  # a second pass through the student's layers, for their implicit attention
        with jax.named_scope("attention_transfer"):
            maps = trainer.model.module(params["model"]).implicit_attention(inputs)
            terms["attention"] = attention_transfer(maps, teacher_out[1], domains.bridge_layer_map(c),
                                                    trainer.cls_position, causal=c.domain == "language")
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return total, (terms, logits)


def train_step(trainer: Trainer, state: State, teacher_params: dict | None, batch: dict) -> tuple[State, dict]:
    """One optimizer step on a global batch: (new state, metrics)."""
    # The mesh is visible while tracing, so that the model runs its kernels per device on their shard.
    with jax.sharding.use_abstract_mesh(trainer.mesh.abstract_mesh):
        job = trainer.job
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        prepare_key, drop_key = jax.random.split(step_key)
        with jax.named_scope("prepare"):
            inputs, targets = trainer.domain.prepare(prepare_key, batch, job.train)
        teacher_out = None
        if job.weights.needs_teacher:
            with jax.named_scope("teacher"):
                teacher_out = jax.lax.stop_gradient(trainer.teacher.module(teacher_params)(inputs))
        (loss, (terms, logits)), grads = jax.value_and_grad(functools.partial(loss_fn, trainer), has_aux=True)(
            state["params"], inputs, targets, teacher_out, drop_key if job.drop_path else None)
        with jax.named_scope("optimizer"):
            updates, opt_state = trainer.tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            learned = {"params": params, "opt_state": opt_state}
            if "ema" in state:
                d = job.train.ema_decay
                learned["ema"] = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state["ema"], params)
            grad_norm = optax.global_norm(grads)
        # A non-finite loss or gradient leaves the learned state as it was (the loop stops or skips on it).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        learned = jax.tree.map(lambda new, old: jnp.where(finite, new, old), learned, {k: state[k] for k in learned})
        metrics = {"loss": loss, **terms, "lr": trainer.lr_fn(state["step"]), "grad_norm": grad_norm,
                   **trainer.domain.train_metrics(logits, targets), NONFINITE: ~finite}
        return {**state, **learned, "step": state["step"] + 1}, metrics


def eval_step(trainer: Trainer, params: dict, batch: dict) -> dict:
    """The domain's metric sums over one global eval batch (padding masked out)."""
    with jax.sharding.use_abstract_mesh(trainer.mesh.abstract_mesh):
        logits, _ = trainer.domain.forward(trainer.model.module(params), trainer.domain.eval_inputs(batch))
    return trainer.domain.eval_sums(logits, batch)


def evaluate(trainer: Trainer, step: Callable[[dict, dict], dict], params: dict, batches: Iterable[dict]
             ) -> dict[str, float]:
    """The domain's metrics over one pass of ``batches`` (each process's local batches) with the eval ``step``."""
    totals = None
    for local in batches:
        out = step(params, sharding.global_batch(local, trainer.mesh))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    return trainer.domain.summarize(jax.device_get(totals))


class CompiledSteps(NamedTuple):
    train: Callable[[State, dict | None, dict], tuple[State, dict]] | None  # None: nothing left to train
    eval: Callable[[dict, dict], dict]


def compile_steps(trainer: Trainer, state: State, teacher_params: dict | None, train_batch: dict | None,
                  eval_batch: dict) -> CompiledSteps:
    """The steps compiled for these global batches before anything runs (the train step only when there is a
    ``train_batch``); ``ConfigError`` when XLA's estimate of a step's memory exceeds what a device has (the host's
    memory, shared by its devices, on CPU)."""
    train = None if train_batch is None else trainer.jit_train_step.lower(state, teacher_params, train_batch).compile()
    eval_ = trainer.jit_eval_step.lower(state["params"]["model"], eval_batch).compile()
    available = device_memory_bytes()
    key = "teacher.train" if trainer.job.trains == "teacher" else "train"
    for name, compiled, field in (("train", train, "batch_size"), ("eval", eval_, "eval_batch_size")):
        if compiled is None:
            continue
        need = step_memory_bytes(compiled)
        if available is not None and need > available:
            raise ConfigError(
                f"config.{key}.{field}: the {name} step needs about {need / 2**30:.1f} GiB per device (XLA's "
                f"estimate), more than the {available / 2**30:.1f} GiB a {jax.local_devices()[0].platform} device "
                f"has here; lower config.{key}.{field}, or turn on remat (student.remat, teacher.remat)")
    return CompiledSteps(train, eval_)


def step_memory_bytes(compiled: jax.stages.Compiled) -> int:
    """XLA's estimate of a compiled step's peak memory per device: arguments, outputs not aliased to (donated)
    arguments, and temporaries."""
    m = compiled.memory_analysis()
    if m is None:
        return 0
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def device_memory_bytes() -> int | None:
    """Memory of one local device: ``CAB_JAX_DEVICE_MEMORY_GIB`` when set (to leave room on a shared machine),
    else the accelerator's limit, or on CPU the host's physical memory divided among its devices (None where
    neither is known)."""
    if os.environ.get("CAB_JAX_DEVICE_MEMORY_GIB"):
        return int(float(os.environ["CAB_JAX_DEVICE_MEMORY_GIB"]) * 2**30)
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    if device.platform == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()
    return None


def read_run_config(workdir: str, domain: str | None = None) -> tuple[ml_collections.ConfigDict, str]:
    """The config and what was trained ("teacher" or "student") of a training run's workdir (its
    ``run_config.json``); ``ConfigError`` if the run is not of ``domain`` (if given)."""
    meta_path = epath.Path(workdir) / "run_config.json"
    if not meta_path.exists():
        raise PathError(f"{meta_path} not found: --workdir must be the workdir of a training run")
    meta = json.loads(meta_path.read_text())
    c = ml_collections.ConfigDict(meta["config"])
    if domain is not None and c.domain != domain:
        raise ConfigError(f"{workdir} holds a {c.domain} run; this needs a {domain} model")
    return c, meta["trains"]


def load_trained_model(workdir: str, domain: str | None = None) -> tuple[ml_collections.ConfigDict, str, nnx.Module]:
    """``read_run_config``, and the trained model (the latest checkpoint)."""
    c, trains = read_run_config(workdir, domain)
    built = domains.for_config(c)
    return c, trains, load_built_model(built.build_teacher if trains == "teacher" else built.build_student, workdir)


def load_built_model(build: Callable[[nnx.Rngs], nnx.Module], weights: str) -> nnx.Module:
    """``build``'s model with the weights at ``weights`` (a run workdir, a converted checkpoint or PyTorch
    weights), built abstractly first."""
    model = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
    graphdef, abstract = nnx.split(model)
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract.to_pure_dict())
    nnx.replace_by_pure_dict(abstract, load_model_weights(weights, model, like))
    return nnx.merge(graphdef, abstract)


def check_weights_paths(c: ml_collections.ConfigDict, job: domains.Job) -> None:
    """``PathError`` / ``FileFormatError`` naming the config field when a weights path the job will read does not
    exist or cannot be read as weights (headers only: fast)."""
    paths = [("student.init_from" if job.trains == "student" else "teacher.init_from", job.init_from)]
    if job.teacher is not None:
        paths.append(("teacher.init_from", c.teacher.init_from))
    for key, path in paths:
        if path:
            try:
                check_source(path)
            except UserError as e:
                raise type(e)(f"config.{key}: {e}") from None


def load_teacher(c: ml_collections.ConfigDict, teacher: nnx.Module, params: dict | None, shardings: dict) -> dict:
    """The frozen teacher's parameters: from ``c.teacher.init_from`` (``teacher`` may be abstract), or ``params``
    (random; synthetic data only)."""
    if c.teacher.init_from:
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              nnx.state(teacher).to_pure_dict(), shardings)
        return jax.device_put(load_model_weights(c.teacher.init_from, teacher, target), shardings)
    if not c.data.synthetic:
        raise ConfigError("config.teacher.init_from is empty: distillation needs trained teacher weights (a "
                         "train_teacher workdir); only data.synthetic=True runs allow a random teacher")
    logging.warning("No teacher.init_from: using a randomly initialised teacher (synthetic-data run).")
    return params


# ------------------------------------------------------------------------------------------------- loop


NONFINITE = "nonfinite"  # the train step's flag: its loss or gradient was not finite, its update not applied


class NonFiniteGuard:
    """Reads each step's :data:`NONFINITE` flag one step late, so that the device queue stays full, then stops
    the run (``on_nonfinite="stop"``: :class:`DivergedError` naming the step and the loss terms) or logs the
    skipped update (``"skip"``). The step never applies a non-finite update, so no checkpoint holds one."""

    def __init__(self, on_nonfinite: str):
        self.on_nonfinite = on_nonfinite
        self._pending: tuple[int, dict] | None = None

    def push(self, step: int, metrics: dict) -> None:
        self.check()
        self._pending = (step, metrics)

    def check(self) -> None:
        """Checks the pushed step (waiting for it to finish), once."""
        if self._pending is None:
            return
        step, metrics = self._pending
        self._pending = None
        if not bool(metrics[NONFINITE]):
            return
        terms = ", ".join(f"{k}={float(v):.4g}" for k, v in jax.device_get(metrics).items() if k != NONFINITE)
        if self.on_nonfinite == "stop":
            raise DivergedError(f"step {step}: the loss or its gradient is not finite ({terms}); the update was not "
                                "applied and no checkpoint was written. Lower the learning rate, or set "
                                "train.on_nonfinite=skip to skip such steps.")
        logging.warning("Step %d: the loss or its gradient is not finite (%s); the update was skipped.", step, terms)


def _summary_writer_class() -> type:
    """tensorboardX's ``SummaryWriter``, imported (on process 0 only) without importing torch: tensorboardX imports
    torch, when it is installed, only for type hints, and that import takes seconds. A torch already imported is
    left as it is."""
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # makes ``import torch`` raise ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide_torch:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Process 0 appends one JSON object per line to ``workdir/metrics.jsonl`` and writes the same scalars as
    TensorBoard events in ``workdir`` (tags ``split/name``: ``tensorboard --logdir WORKDIR``), both flushed at every
    write so that a crash loses nothing written."""

    def __init__(self, workdir: epath.Path):
        self.path = workdir / "metrics.jsonl"
        self._events = None  # on process 0 only
        if jax.process_index() == 0:
            self._events = _summary_writer_class()(str(workdir))

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        if self._events is not None:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, "split": split, **values}) + "\n")
            for name, value in values.items():
                self._events.add_scalar(f"{split}/{name}", value, step)
            self._events.flush()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()


@dataclasses.dataclass
class RunResult:
    metrics: dict[str, float]  # the final evaluation (top1/top5, or eval_loss/perplexity/token_acc)
    steps: int
    wall_time_s: float  # of this invocation
    train_examples: int
    stopped_early: bool = False
    resumed_at: int | None = None  # the step a checkpoint of an earlier invocation restored


class ProgressBar:
    """A tqdm bar of the training steps (rate and time left) where ``stream`` (stderr) is a terminal, on process 0;
    elsewhere nothing, and the log lines say it all. The loop's own log lines clear the bar and redraw it below."""

    def __init__(self, name: str, total: int, done: int, stream: Any = None):
        stream = sys.stderr if stream is None else stream
        self._bar = None
        if jax.process_index() == 0 and stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, desc=name, unit="step", file=stream, dynamic_ncols=True,
                             leave=False)

    def step(self) -> None:
        if self._bar is not None:
            self._bar.update()

    def log(self, *args) -> None:
        """``logging.info(*args)`` above the bar."""
        if self._bar is not None:
            self._bar.clear()
        logging.info(*args)
        if self._bar is not None:
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def format_duration(seconds: float) -> str:
    """``seconds`` as a person reads a remaining time: "42s", "3m05s", "2h07m", "3d04h"."""
    s = round(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            return f"{s // size}{unit}{(s % size) // sub_size:02d}{sub}"
    return f"{s}s"


def _format(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v}" if isinstance(v, int) else f"{k}={v:.4g}" for k, v in values.items())


def save_run_config(workdir: epath.Path, c: ml_collections.ConfigDict, trains: str) -> None:
    """``workdir/run_config.json``: what was trained, so tools (``read_run_config``, ``load_trained_model``) can
    rebuild the model."""
    if jax.process_index() == 0:
        meta = {"trains": trains, "config": json.loads(c.to_json_best_effort())}
        (workdir / "run_config.json").write_text(json.dumps(meta, indent=1))


def write_results(workdir: epath.Path, trains: str, result: RunResult) -> None:
    """``workdir/results.json``: a finished run's final evaluation (``launch/collect_results.py`` tabulates it)."""
    if jax.process_index() == 0:
        record = {"trains": trains, "step": result.steps, "train_examples": result.train_examples,
                  "metrics": result.metrics}
        (workdir / "results.json").write_text(json.dumps(record, indent=1))


def train_and_evaluate(c: ml_collections.ConfigDict, workdir: str) -> RunResult:
    """Train what ``c.task`` asks for ("distill": the student, per ``c.loss``; "train_teacher": the teacher on
    labels, on the full train split, with ``c.teacher.train``), resuming from the latest checkpoint in
    ``workdir``, then evaluate."""
    # Everything that can be checked before work is, in order of cost; the workdir is created once it passes.
    mesh = sharding.make_mesh(c.mesh)
    config_lib.validate(c, mesh.shape)
    domain = domains.for_config(c)
    job = domain.job()
    check_weights_paths(c, job)
    train_size = domain.data.train_size(job.data)  # the dataset is there (embedded ones are built)
    trainer, state, teacher_params = create_trainer(c, mesh, train_size)
    t, sched = job.train, trainer.sched
    train_iter = domain.data.train_iterator(job.data, global_batch_size=t.batch_size, seed=c.seed)
    eval_batches = domain.data.eval_batches(job.data, global_batch_size=config_lib.eval_batch_size(t))

    workdir_path = epath.Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint.RunCheckpointer(workdir_path / "checkpoints", keep=t.keep_checkpoints)
    state, restored_step = ckpt.restore(state, train_iter)
    step = int(restored_step or 0)
    # The first step's batch: the steps compile for its shape (none when a finished run is only evaluated again).
    batch = sharding.global_batch(next(train_iter), mesh) if step < sched.total_steps else None
    steps = compile_steps(trainer, state, teacher_params, batch,
                          sharding.global_batch(eval_batches.first(), mesh))
    save_run_config(workdir_path, c, job.trains)
    writer = MetricsWriter(workdir_path)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]["model"]))
    logging.info("%s: %d parameters, %d train examples, %d steps (%d warmup, %d per epoch), peak lr %.3g, "
                 "mesh %s, %s", job.trains, n_params, train_size, sched.total_steps, sched.warmup_steps,
                 sched.steps_per_epoch, sched.peak_lr, dict(mesh.shape),
                 f"resumed at step {step}" if restored_step else "starting fresh")

    # Later batches are read and placed on the devices in the background, two steps ahead.
    feed = prefetch.DevicePrefetch(train_iter, lambda b: sharding.global_batch(b, mesh)) if batch is not None \
        else None
    start, interval_start, interval_steps, stopped = time.time(), time.time(), 0, False
    eval_params = lambda s: s["ema"]["model"] if "ema" in s else s["params"]["model"]
    guard = NonFiniteGuard(t.on_nonfinite)
    progress = ProgressBar(job.trains, sched.total_steps, step)
    try:  # the checkpointer's pending save is finished and the data workers end, whatever happens
        with preemption.StopRequest(mesh) as stop:
            while step < sched.total_steps:
                if batch is None:
                    batch = next(feed)
                state, metrics = steps.train(state, teacher_params, batch)
                batch = None
                step += 1
                progress.step()
                interval_steps += 1
                guard.push(step, metrics)
                if step % t.log_every == 0 or step == sched.total_steps:
                    values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != NONFINITE}
                    elapsed = time.time() - interval_start
                    values.update(domain.throughput(interval_steps * t.batch_size / max(elapsed, 1e-9)))
                    values["data_wait_ms"] = 1e3 * feed.take_wait_s() / interval_steps  # per step, for its batch
                    writer.write(step, "train", values)
                    eta = (time.time() - start) / (step - (restored_step or 0)) * (sched.total_steps - step)
                    progress.log("[%s %d/%d] %s eta=%s", job.trains, step, sched.total_steps, _format(values),
                                 format_duration(eta))
                    interval_start, interval_steps = time.time(), 0
                if t.eval_every and step % t.eval_every == 0 and step < sched.total_steps:
                    result = evaluate(trainer, steps.eval, eval_params(state), eval_batches)
                    writer.write(step, "eval", result)
                    progress.log("[%s %d/%d] eval %s", job.trains, step, sched.total_steps, _format(result))
                stopped = stop.agreed() and step < sched.total_steps
                if (step % t.checkpoint_every == 0 and step < sched.total_steps) or stopped:
                    guard.check()
                    ckpt.save(step, state, feed)
                if stopped:
                    break
            guard.check()  # the last save finishes under the stop request too (a signal does not cut it short)
            if not stopped and ckpt.latest_step() != step:
                ckpt.save(step, state, feed or train_iter)
            ckpt.wait()
            # A signal during the last step or the final save: stop now (the last step is saved; the same command
            # then only evaluates), not after the final evaluation or, in a study, the next run.
            stopped = stopped or stop.settled()
    finally:
        progress.close()
        ckpt.close()
        (feed or train_iter).close()
    if stopped:
        writer.close()
        logging.warning("Stopped at step %d; run the same command again to resume.", step)
        return RunResult({}, step, time.time() - start, train_size, stopped_early=True, resumed_at=restored_step)
    result = evaluate(trainer, steps.eval, eval_params(state), eval_batches)
    writer.write(step, "eval", result)
    writer.close()
    logging.info("[%s] final eval at step %d: %s", job.trains, step, _format(result))
    run_result = RunResult(result, step, time.time() - start, train_size, resumed_at=restored_step)
    write_results(workdir_path, job.trains, run_result)
    return run_result

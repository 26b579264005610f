"""What the benchmark scripts share: timing a jitted train step, peak device memory, Markdown
tables."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import pathlib
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable

# Selective-scan benchmark shapes, name: (batch, length, d_inner, d_state, bidirectional): the Vim-Ti/S/B
# training shapes of one mixer and a long single-direction one.
SCAN_SHAPES = {
    "vim_ti": (128, 197, 384, 16, True),
    "vim_s": (128, 197, 768, 16, True),
    "vim_b": (128, 197, 1536, 16, True),
    "long": (8, 4096, 2048, 16, False),
    "tiny": (2, 16, 8, 4, True),  # the tests' run on a CPU
}
_PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0}  # SXM HBM3 / HBM3e datasheet peaks


def hbm_peak_gbps(device_name: str) -> float:
    """Datasheet HBM bandwidth of a known GPU (by its name), else 0."""
    return next((v for k, v in _PEAK_GBPS.items() if k in device_name), 0.0)


ROOT = pathlib.Path(__file__).resolve().parents[1]


def add_overrides_flag(parser, example: str = "student.depth=2,teacher.depth=1") -> None:
    """The ``--set`` flag every benchmark takes: config overrides for ``apply_overrides``."""
    parser.add_argument("--set", default="", help=f"config overrides, e.g. {example} (a value may hold commas: "
                                                  "student.scan_blocks=2,32,1,1,4, or XLA options: "
                                                  "train.xla_gpu_options=xla_a=1,xla_b=2)")


def split_overrides(overrides: str) -> list[str]:
    """The ``key=value`` items of ``overrides`` ("student.depth=2,teacher.depth=1"). A value may hold commas
    ("student.scan_blocks=2,32,1,1,4") and XLA options ("train.xla_gpu_options=xla_a=1,xla_b=2"): items split only
    at a comma followed by the next ``key=`` that is not an ``xla_`` option."""
    return list(filter(None, re.split(r",(?=(?!xla_)[\w.]+=)", overrides)))


def apply_overrides(c, overrides: str) -> None:
    """Sets ``overrides`` (``split_overrides``: dotted fields of the ConfigDict ``c``, each value read as its field's
    type by ``config.parse_value``) in ``c``."""
    from cab_jax.config import parse_value

    for item in split_overrides(overrides):
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = parse_value(key, value, node.get_type(leaf))


def join_overrides(*overrides: str) -> str:
    """Several ``--set`` strings as one, empty ones left out."""
    return ",".join(filter(None, overrides))


def load_config(config_name: str, overrides: str = ""):
    """``configs/<config_name>.py``'s ``get_config()`` with ``overrides`` (``apply_overrides``) set."""
    spec = importlib.util.spec_from_file_location(config_name, ROOT / "configs" / f"{config_name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    apply_overrides(c, overrides)
    return c


def save_random_teacher(c, directory: pathlib.Path) -> None:
    """The randomly initialised teacher of config ``c`` saved as model weights in ``directory`` (for
    ``teacher.init_from``)."""
    from flax import nnx

    from cab_jax import checkpoint, domains

    teacher = domains.for_config(c).build_teacher(nnx.Rngs(0))
    checkpoint.save_model_params(directory, nnx.state(teacher).to_pure_dict())


def synthetic_setup(config_name: str, dtype: str, batch_size: int, steps: int, remat: bool, mode: str,
                    scan_impl: str, remat_policy: str = "full", num_batches: int = 2, overrides: str = "") -> tuple:
    """(``train.Setup``, ``num_batches`` device-resident batches of random images) for ``configs/<config_name>.py``
    with its dtype, remat (and its policy), loss mode and scan implementation replaced, then ``overrides``
    (``apply_overrides``), on synthetic data."""
    import numpy as np

    from cab_jax import sharding, train

    c = load_config(config_name)
    c.dtype, c.loss.mode, c.student.remat, c.student.scan_impl = dtype, mode, remat, scan_impl
    c.student.remat_policy = remat_policy
    c.data.synthetic = True
    c.train.batch_size, c.train.steps = batch_size, steps
    apply_overrides(c, overrides)
    mesh = sharding.make_mesh(c.mesh)
    built = train.create_trainer(c, mesh, train_size=batch_size * steps)
    rng = np.random.default_rng(0)
    size, classes = c.data.image_size, c.data.num_classes
    batches = [sharding.global_batch({"image": rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
                                      "label": rng.integers(0, classes, batch_size).astype(np.int32)}, mesh)
               for _ in range(num_batches)]
    return built, batches


def matmul_flops(fn: Callable, *args) -> float:
    """FLOPs of the matrix products and convolutions in ``fn(*args)``'s jaxpr (2 per multiply-add), each scan's
    body counted once per iteration; elementwise work and Pallas kernels (the selective scan) not counted. (XLA's
    cost analysis counts a loop's body once, so it undercounts the scanned layers.)"""
    import math

    import jax
    from jax.extend import core as jax_core

    def count(jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                (lhs_contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
            elif name == "conv_general_dilated":
                kernel = eqn.invars[1].aval.shape  # (out, in / groups, *window) in the default layout
                spec = eqn.params["dimension_numbers"].rhs_spec
                per_output = math.prod(kernel[d] for d in spec[1:])
                total += 2 * math.prod(eqn.outvars[0].aval.shape) * per_output
            inner = [count(j) for j in jax_core.jaxprs_in_params(eqn.params)]
            if name == "cond":
                total += max(inner, default=0.0)
            else:
                total += sum(inner) * (eqn.params["length"] if name == "scan" else 1)
        return total

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def model_flops(built, batch: dict) -> float:
    """Model FLOPs of one train step of ``built`` (a ``train.Setup``) on ``batch``: the teacher's forward plus three
    times the student's (its forward, and a backward taken as twice the forward), bridge and losses included; no
    remat recompute, no optimizer update (matrix products only: ``matmul_flops``)."""
    import jax

    from cab_jax import train

    trainer, params, teacher = built.trainer, built.state["params"], built.teacher_params
    inputs, targets = trainer.domain.prepare(jax.random.key(0), batch, trainer.job.train)
    teacher_fwd = lambda p, x: jax.lax.stop_gradient(trainer.teacher.module(p)(x))
    teacher_out = jax.eval_shape(teacher_fwd, teacher, inputs) if teacher is not None else None  # shapes suffice
    student_fwd = matmul_flops(lambda p, x, y, t: train.loss_fn(trainer, p, x, y, t, None)[0], params, inputs,
                               targets, teacher_out)
    return 3 * student_fwd + (matmul_flops(teacher_fwd, teacher, inputs) if teacher is not None else 0.0)


def matmul_flops_per_s(dtype: str, iters: int = 20) -> float:
    """This device's measured matmul rate: an (n, n) @ (n, n) product in ``dtype`` at JAX's default precision
    (TF32 tensor cores for float32 on NVIDIA GPUs), median of ``iters`` timed calls; n = 8192 (1024 on a CPU)."""
    import jax
    import jax.numpy as jnp

    from cab_jax.timing import median_ms

    n = 1024 if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    return 2 * n**3 / (median_ms(matmul, (a, a), iters) / 1e3)


def report_one(job: str, measure: Callable[..., dict]) -> None:
    """The child's half of ``run_one``: ``measure(**job)`` (``job`` the JSON of ``--one``) printed after "ROW"."""
    print("ROW" + json.dumps(measure(**json.loads(job))), flush=True)


def parse_args_or_measure(parser, measure: Callable[..., dict]):
    """``parser``'s arguments (an ``argparse.ArgumentParser``; the hidden ``--one`` flag added); None in a child of
    ``run_one``, after measuring and printing its row (``report_one``)."""
    import argparse

    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        report_one(args.one, measure)
        return None
    return args


def run_one(script: str, job: dict, error_row: dict, env: dict[str, str] | None = None,
            timeout: float | None = None) -> dict:
    """Runs ``python script --one JSON(job)`` (one measurement in its own process, so its peak memory is its own;
    in ``env``, default this process's environment; killed after ``timeout`` seconds): the row it printed on a line
    starting with "ROW" (``report_one``), or ``error_row`` with the last error line of its stderr as "error"."""
    try:
        proc = subprocess.run([sys.executable, script, "--one", json.dumps(job)], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**error_row, "error": f"still running after {timeout} s: killed"}
    row = next((line[3:] for line in proc.stdout.splitlines() if line.startswith("ROW")), None)
    if proc.returncode == 0 and row is not None:
        try:
            return json.loads(row)
        except json.JSONDecodeError:
            pass  # cut by other output: the error row below
    lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}, no row"]
    return {**error_row, "error": next((line for line in reversed(lines) if "Error" in line), lines[-1])[:160]}


def run_each(script: str, jobs: Iterable[dict], error_row: Callable[[dict], dict]) -> list[dict]:
    """``run_one`` for each job in turn, each row printed as a JSON line as it comes (a run cut off keeps what it
    measured); ``error_row(job)``: the row of a job whose process failed."""
    rows = []
    for job in jobs:
        rows.append(run_one(script, job, error_row(job)))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def time_train_steps(built, batches: list, steps: int, warmup: int = 1) -> tuple[float, float, dict]:
    """(compile seconds, seconds for ``steps`` steps after ``warmup`` more, last metrics) of ``built.trainer``'s
    train step (a ``train.Setup``), cycling through ``batches``."""
    import jax

    state, step = built.state, built.trainer.jit_train_step
    start = time.perf_counter()
    state, metrics = step(state, built.teacher_params, batches[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    for i in range(warmup):
        state, metrics = step(state, built.teacher_params, batches[(i + 1) % len(batches)])
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(steps):
        state, metrics = step(state, built.teacher_params, batches[i % len(batches)])
    jax.block_until_ready(metrics)
    return compile_s, time.perf_counter() - start, metrics


def torch_median_ms(fn, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of ``iters`` calls of ``fn()`` (torch, on a GPU) after ``warmup`` calls, each ended by a
    device synchronisation (as ``cab_jax.timing.median_ms`` times JAX functions)."""
    import statistics

    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def state_gib(state) -> float:
    """GiB of the arrays of ``state`` (a pytree: parameters, optimizer state) held on the first device: its shards
    where the arrays are split over several devices; 4 significant digits, so that a toy model's shows too."""
    import jax

    first = jax.devices()[0]
    held = sum(shard.data.nbytes for leaf in jax.tree.leaves(state) if isinstance(leaf, jax.Array)
               for shard in leaf.addressable_shards if shard.device == first)
    return float(f"{held / 2**30:.4g}")


def peak_gib() -> float:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return round(stats.get("peak_bytes_in_use", 0) / 2**30, 2)


@contextlib.contextmanager
def gpu_turn(lock_path: str | None):
    """Holds an exclusive lock on ``lock_path`` (none when it is None): processes that compile at the same time
    take turns to time, so no two timings share the GPU."""
    if lock_path is None:
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def relative_error(x, ref) -> float:
    """max |x - ref| / max |ref| of two arrays, in float32."""
    import jax.numpy as jnp

    x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.max(jnp.abs(x - ref)) / jnp.max(jnp.abs(ref)))


def error_message(e: BaseException) -> str:
    """The first line of an exception, short enough for a table cell."""
    return f"{type(e).__name__}: {e}".splitlines()[0][:100]

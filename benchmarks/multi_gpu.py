"""The sharded step on two GPUs of one host (or two fake CPU devices): the losses of one device, two processes as
SLURM starts them, images/s per device count, and FSDP's memory per device.

    python benchmarks/multi_gpu.py --out=/tmp/multi_gpu [--parts=equal,main,processes,scaling,fsdp] \
        [--config=vim_small] [--steps=20] [--batch_size=128] [--set=FIELD=VALUE,...] [--cpu]

Every measurement runs in a process of its own that sees only the devices it needs (the first of
``CUDA_VISIBLE_DEVICES``; with ``--cpu``, that many fake CPU devices), with ``NCCL_NVLS_ENABLE=0`` (NVLink multicast
off), and is stopped after ``--timeout`` seconds. The parts that compare losses run float32 matmuls at full
precision (``JAX_DEFAULT_MATMUL_PRECISION=highest``): a GPU's default TF32 rounds differently for each shard's
shape. Parts:

- equal: the CAB step on synthetic data in float32, ``--steps`` steps at the global batch ``--batch_size``, on one
  device and on two with each of ``--meshes`` (``mesh.data=2``, ``mesh.fsdp=2``, ``mesh.tensor=2``): each run's
  largest loss deviation from the one-device run, and the scan kernel's calls in the lowered step with the shapes
  of their first operand (per device: half the batch, or under tensor parallelism half of d_inner).
- main: the same through the entry point on the config's data (for an ImageNet config the fake ImageNet, written
  under ``--out``) with a random teacher saved there, repeated augmentation off (as it is on one device), one
  device against ``mesh.data=2``: ``metrics.jsonl``'s losses.
- processes: two processes of one device each, started as ``launch/slurm_gpu.sbatch``'s ``srun`` starts its tasks
  (SLURM's variables, ``--jax_distributed``), stopped by SIGTERM to both process groups (data workers included, as
  SLURM signals every process of a step) once the first step is logged (both save a checkpoint and exit 75), and
  started again: it resumes at the saved step. Every step's loss (those logged before the stop and after) against
  main's one-device run; the checkpoints directory holds one entry per kept step.
- scaling: ``train_throughput.py``'s step (``--dtypes``, no remat) on one device at ``--batch_size`` and on two with
  ``mesh.data=2`` at twice the batch: images/s, and the efficiency (two devices' images/s over twice one's).
- fsdp: ``lm_throughput.py``'s CAB train step of configs/phi_mamba.py (synthetic tokens, ``--lm_set`` overrides) on
  one device and with ``mesh.fsdp=2``: the train state (parameters, optimizer state) held per device, its ratio to
  one device's, and the peak.

Prints the tables and writes them to ``--out/multi_gpu.md``, every row to ``--out/multi_gpu.json`` (both after
each part), the entry point's logs under ``--out/logs``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common import (  # benchmarks/common.py
    ROOT,
    add_overrides_flag,
    join_overrides,
    load_config,
    parse_args_or_measure,
    run_one,
    save_random_teacher,
    split_overrides,
    synthetic_setup,
)

from cab_jax.summary import markdown_table

PARTS = ("equal", "main", "processes", "scaling", "fsdp")
# name: (config overrides, devices)
MESHES = {"1 device": ("", 1), "mesh.data=2": ("mesh.data=2", 2), "mesh.fsdp=2": ("mesh.data=1,mesh.fsdp=2", 2),
          "mesh.tensor=2": ("mesh.data=1,mesh.tensor=2", 2)}


# Variables of an outer launcher that would decide, instead of this script, how the processes find each other.
FOREIGN = re.compile(r"JAX_COORDINATOR_ADDRESS|JAX_LOCAL_DEVICE_IDS|JAX_NUM_PROCESSES|JAX_PROCESS_ID|SLURM_.*|"
                     r"OMPI_.*|PMI_.*|TPU_WORKER_.*|MEGASCALE_.*")


def device_env(devices: int, cpu: bool, exact: bool = False) -> dict[str, str]:
    """This process's environment (less ``FOREIGN`` variables) for a JAX process on the first ``devices`` GPUs this
    process may use (``CUDA_VISIBLE_DEVICES``, default all), or on that many fake CPU devices; ``exact``: float32
    matmuls at full precision (on GPUs TF32 by default, which rounds differently for each shard's shape)."""
    env = {k: v for k, v in os.environ.items() if not FOREIGN.fullmatch(k)}
    env["NCCL_NVLS_ENABLE"] = "0"
    if exact:
        env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    if cpu:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join([f"--xla_force_host_platform_device_count={devices}",
                                                             *flags]))
    else:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(devices)))).split(",")
        if len(visible) < devices:
            raise SystemExit(f"error: {devices} GPUs needed, CUDA_VISIBLE_DEVICES={','.join(visible)}")
        env.update(JAX_PLATFORMS="cuda", CUDA_VISIBLE_DEVICES=",".join(visible[:devices]))
    return env


# ---- measured in a child process (--one)


def trajectory(config_name: str, batch_size: int, steps: int, overrides: str) -> dict:
    """Every step's loss of the CAB step on synthetic data, and the scan kernel's calls in the lowered step."""
    import jax

    from cab_jax import lower
    from cab_jax.kernels.selective_scan import resolve_impl

    built, data = synthetic_setup(config_name, "float32", batch_size, steps, False, "cab", "auto", num_batches=4,
                                  overrides=overrides)
    state, step = built.state, built.trainer.jit_train_step
    text = step.lower(state, built.teacher_params, data[0]).as_text()
    kernel, mesh = resolve_impl(built.trainer.domain.c.student.scan_impl), built.trainer.mesh.shape
    calls, shapes, _, problems = lower.check(text, kernel, batch_size, batch_size // (mesh["data"] * mesh["fsdp"]))
    losses = []
    for i in range(steps):
        state, metrics = step(state, built.teacher_params, data[i % len(data)])
        losses.append(metrics["loss"])
    return {"devices": jax.device_count(), "losses": [float(x) for x in jax.device_get(losses)], "kernel": kernel,
            "kernel_calls": calls, "kernel_shapes": sorted({"x".join(map(str, s)) for s in shapes}),
            "kernel_problems": "; ".join(problems), "device": jax.devices()[0].device_kind, "jax": jax.__version__}


def prepare(out: str, config_name: str, overrides: str, cpu: bool) -> dict:
    """The data of ``config_name`` with ``overrides`` (for ImageNet the fake one, written under ``out``; else the
    config's embedded dataset) and a random teacher saved under ``out``: the config overrides that name them."""
    from cab_jax import domains
    from cab_jax.data import fake_imagenet

    c, named = load_config(config_name, overrides), []
    if c.data.name == fake_imagenet.NAME:
        data_dir = pathlib.Path(out) / "fake_imagenet"
        fake_imagenet.write(str(data_dir), train_per_class=1 if cpu else 3, validation_per_class=1,
                            scale=0.08 if cpu else 0.5, seed=0)
        named.append(f"data.data_dir={data_dir}")
    else:
        domains.for_config(c).data.prepare(c.data)
    teacher = pathlib.Path(out) / "teacher"
    if not teacher.exists():
        save_random_teacher(c, teacher)
    return {"overrides": ",".join([*named, f"teacher.init_from={teacher}"])}


def measure(kind: str, **job) -> dict:
    return (trajectory if kind == "trajectory" else prepare)(**job)


# ---- the entry point, one or two processes


class EntryPoint:
    """``python -m cab_jax.main`` on the prepared data (``prepare``), the same run in several layouts; workdirs under
    ``out/runs``, logs under ``out/logs``."""

    def __init__(self, args: argparse.Namespace, prepared: dict):
        self.args, self.out = args, pathlib.Path(args.out).resolve()
        self.done: dict[str, dict] = {}  # name: the row of a run this invocation made
        overrides = join_overrides(prepared["overrides"], "task=distill", "data.subset_fraction=1.0", "dtype=float32",
                           f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", "train.log_every=1",
                           f"train.checkpoint_every={args.steps}", "data.repeated_augmentation=1", args.set)
        self.flags = [f"--config=configs/{args.config}.py",
                      *(f"--config.{item}" for item in split_overrides(overrides))]

    def start(self, name: str, mesh: str, processes: int, devices: int) -> list[subprocess.Popen]:
        """Starts run ``name`` (``mesh`` overrides): one process on ``devices`` devices, or ``processes`` processes
        of one device each with a SLURM job's task variables (JAX's cluster detection finds the coordinator)."""
        workdir, logs = self.out / "runs" / name, self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        flags = [*self.flags, f"--workdir={workdir}", *(f"--config.{item}" for item in split_overrides(mesh))]
        env = device_env(devices * processes, self.args.cpu, exact=True)
        if processes == 1:
            return [self._popen(flags, env, logs / f"{name}.log")]
        port, procs = str(_free_port()), []  # the coordinator's, as slurm_gpu.sbatch takes JAX_COORDINATOR_PORT
        for i in range(processes):
            task = {"SLURM_JOB_ID": str(os.getpid()), "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_NUM_NODES": "1",
                    "SLURM_NTASKS": str(processes), "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i),
                    "JAX_COORDINATOR_PORT": port, "NCCL_DEBUG": "WARN"}
            if self.args.cpu:  # one fake CPU device per process (each GPU process takes GPU SLURM_LOCALID)
                task.update(device_env(devices, True, exact=True))
            procs.append(self._popen([*flags, "--jax_distributed"], {**env, **task}, logs / f"{name}.{i}.log"))
        return procs

    @staticmethod
    def _popen(flags: list[str], env: dict, log: pathlib.Path) -> subprocess.Popen:
        """The entry point in a session of its own: a signal to its process group reaches its data workers too, as
        SLURM's reaches every process of a job step."""
        with log.open("a") as f:
            return subprocess.Popen([sys.executable, "-m", "cab_jax.main", *flags], cwd=ROOT, env=env, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, procs: list[subprocess.Popen]) -> list[int | str]:
        """Each process's exit status; "timeout" for one still running ``--timeout`` s after the start of the wait
        (its process group killed)."""
        deadline, statuses = time.time() + self.args.timeout, []
        for p in procs:
            try:
                statuses.append(p.wait(timeout=max(deadline - time.time(), 0.1)))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                statuses.append("timeout")
        return statuses

    def losses(self, name: str) -> list[float]:
        path = self.out / "runs" / name / "metrics.jsonl"
        lines = path.read_text().split("\n")[:-1] if path.exists() else []  # whole lines: one may be in writing
        records = [json.loads(line) for line in lines]
        by_step = {r["step"]: r["loss"] for r in records if r["split"] == "train"}  # a resumed run: the newest
        return [by_step[s] for s in sorted(by_step)]

    def fresh(self, name: str) -> None:
        """Removes what an earlier run ``name`` left (its workdir and logs)."""
        shutil.rmtree(self.out / "runs" / name, ignore_errors=True)
        for log in (self.out / "logs").glob(f"{name}.*log"):
            log.unlink()

    def run(self, name: str, mesh: str = "", processes: int = 1, devices: int = 1) -> dict:
        self.fresh(name)
        start = time.perf_counter()
        statuses = self.wait(self.start(name, mesh, processes, devices))
        self.done[name] = {"run": name, "processes": processes, "devices": processes * devices,
                           "exit": _statuses(statuses), "seconds": round(time.perf_counter() - start, 1),
                           "losses": self.losses(name)}
        return self.done[name]

    def stopped_and_resumed(self, name: str, processes: int) -> dict:
        """Run ``name`` in ``processes`` processes, SIGTERM to each once a step is logged, then the same command
        again."""
        self.fresh(name)
        start = time.perf_counter()
        procs, deadline = self.start(name, "", processes, 1), time.time() + self.args.timeout
        while not self.losses(name) and all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.1)
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        stopped = self.wait(procs)
        steps_then = len(self.losses(name))
        resumed = self.wait(self.start(name, "", processes, 1))
        log = (self.out / "logs" / f"{name}.0.log").read_text(errors="replace")
        resumed_at = re.findall(r"resumed at step (\d+)", log)
        saved = self.out / "runs" / name / "checkpoints"
        checkpoints = sorted(int(d.name) for d in saved.iterdir() if d.name.isdigit()) if saved.exists() else []
        return {"run": name, "processes": processes, "devices": processes, "exit": _statuses(resumed),
                "stopped_exit": _statuses(stopped), "stopped_after": steps_then,
                "resumed_at": int(resumed_at[-1]) if resumed_at else None, "checkpoints": checkpoints,
                "seconds": round(time.perf_counter() - start, 1), "losses": self.losses(name)}


def _statuses(statuses: list[int]) -> str:
    return ",".join(map(str, statuses))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# ---- the parts


def deviations(rows: list[dict]) -> list[dict]:
    """``rows`` (each with "losses") with the first row's losses as the reference: each row's largest relative
    deviation from them and its last loss."""
    ref = rows[0].get("losses") or []
    for row in rows:
        losses = row.get("losses") or []
        row["last_loss"] = round(losses[-1], 6) if losses else None
        if ref and len(losses) == len(ref):
            row["max_rel_dev"] = f"{max(abs(a - b) / abs(b) for a, b in zip(losses, ref, strict=True)):.2e}"
        else:
            row["max_rel_dev"] = f"{len(losses)} of {len(ref)} steps"
    return rows


def part_equal(args) -> list[dict]:
    rows = []
    for name in ["1 device", *args.meshes.split(",")]:
        mesh, devices = MESHES[name]
        job = dict(kind="trajectory", config_name=args.config, batch_size=args.batch_size, steps=args.steps,
                   overrides=join_overrides(mesh, args.set))
        row = run_one(__file__, job, {}, device_env(devices, args.cpu, exact=True), args.timeout)
        rows.append({"run": name, **row, "kernel_shapes": " ".join(row.get("kernel_shapes", []))})
        _print_row(rows[-1])
    return deviations(rows)


def part_main(entry: EntryPoint) -> list[dict]:
    return deviations([_print_row(entry.run("1 device")), _print_row(entry.run("mesh.data=2", "mesh.data=2", 1, 2))])


def part_processes(entry: EntryPoint) -> list[dict]:
    one = entry.done.get("1 device") or _print_row(entry.run("1 device"))
    return deviations([one, _print_row(entry.stopped_and_resumed("2 processes, SIGTERM, run again", 2))])


def part_scaling(args) -> list[dict]:
    rows = []
    for dtype in args.dtypes.split(","):
        for devices in (1, 2):
            job = dict(config_name=args.config, dtype=dtype, batch_size=args.batch_size * devices,
                       steps=args.throughput_steps, remat=False, mode="cab", scan_impl="auto",
                       overrides=join_overrides("mesh.data=2" if devices == 2 else "", args.set))
            row = run_one(str(ROOT / "benchmarks" / "train_throughput.py"), job, {}, device_env(devices, args.cpu),
                          args.timeout)
            rows.append(_print_row({"devices": devices, **row}))
        one, two = (r.get("images_per_s") for r in rows[-2:])
        if one and two:
            rows[-1]["efficiency"] = round(two / (2 * one), 3)
    return rows


def part_fsdp(args) -> list[dict]:
    rows = []
    for mesh, devices in (("mesh.fsdp=1", 1), ("mesh.fsdp=2", 2)):
        job = dict(kind="train", length=args.lm_length, tokens_per_step=args.lm_tokens, mode="cab", dtype="bfloat16",
                   steps=3, overrides=join_overrides(mesh, args.lm_set))
        row = run_one(str(ROOT / "benchmarks" / "lm_throughput.py"), job, {}, device_env(devices, args.cpu),
                      args.timeout)
        rows.append(_print_row({"mesh": mesh, "devices": devices, **row}))
    one, two = (r.get("state_gib") for r in rows)
    if one and two:
        rows[-1]["state / 1 device"] = round(two / one, 3)
    return rows


def _print_row(row: dict) -> dict:
    print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    return row


COLUMNS = {
    "equal": ["run", "devices", "device", "last_loss", "max_rel_dev", "kernel", "kernel_calls", "kernel_shapes",
              "kernel_problems", "error"],
    "main": ["run", "devices", "exit", "seconds", "last_loss", "max_rel_dev"],
    "processes": ["run", "processes", "devices", "exit", "stopped_exit", "stopped_after", "resumed_at", "checkpoints",
                  "seconds", "last_loss", "max_rel_dev"],
    "scaling": ["devices", "dtype", "batch", "images_per_s", "ms_per_step", "efficiency", "mfu", "peak_gib",
                "compile_s", "error"],
    "fsdp": ["mesh", "devices", "length", "batch", "state_gib", "state / 1 device", "teacher_gib", "peak_gib",
             "tokens_per_s", "loss", "error"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="directory for the data, runs, logs and tables (required)")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--config", default="vim_small")
    parser.add_argument("--meshes", default=",".join(list(MESHES)[1:]), help="the layouts of the equal part, "
                        "each against one device")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=128, help="global batch of one device")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="of the scaling part")
    parser.add_argument("--throughput_steps", type=int, default=50)
    parser.add_argument("--lm_length", type=int, default=2048)
    parser.add_argument("--lm_tokens", type=int, default=8192, help="tokens per step of the fsdp part")
    parser.add_argument("--lm_set", default="", help="configs/phi_mamba.py overrides of the fsdp part")
    parser.add_argument("--cpu", action="store_true", help="fake CPU devices instead of GPUs")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a measurement or run may take")
    add_overrides_flag(parser)
    args = parse_args_or_measure(parser, measure)
    if args is None:
        return
    if not args.out:
        parser.error("--out is required")
    for flag, valid in (("parts", PARTS), ("meshes", list(MESHES)[1:])):
        unknown = set(getattr(args, flag).split(",")) - set(valid)
        if unknown:
            parser.error(f"--{flag}: unknown {sorted(unknown)}; valid choices are {', '.join(valid)}")
    out = pathlib.Path(args.out).resolve()  # the children run in the repository's root
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    if "main" in args.parts or "processes" in args.parts:
        prepared = run_one(__file__, dict(kind="prepare", out=str(out), config_name=args.config, overrides=args.set,
                                          cpu=args.cpu), {}, {**os.environ, "JAX_PLATFORMS": "cpu"}, args.timeout)
        if "error" in prepared:
            sys.exit(f"error: preparing the fake ImageNet and the teacher: {prepared['error']}")
        entry = EntryPoint(args, prepared)
    for part in args.parts.split(","):
        results[part] = {"equal": lambda: part_equal(args), "main": lambda: part_main(entry),
                         "processes": lambda: part_processes(entry), "scaling": lambda: part_scaling(args),
                         "fsdp": lambda: part_fsdp(args)}[part]()
        tables = "\n\n".join(f"### {p}\n\n{markdown_table(rows, COLUMNS[p])}" for p, rows in results.items())
        (out / "multi_gpu.md").write_text(tables + "\n")  # after each part: a later one's failure keeps it
        (out / "multi_gpu.json").write_text(json.dumps(results, indent=1))
    print(tables)


if __name__ == "__main__":
    main()

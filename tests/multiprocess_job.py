"""Run the real entry point as one JAX job of several CPU processes on this machine (gloo collectives).

Each process is ``python -m cab_jax.main ARGS`` with ``devices_per_process`` fake CPU devices; with more than one
process they get ``--jax_distributed`` and the coordinator on a free local port (as flags, or as the variables of a
SLURM job's tasks or of a GKE TPU pod's workers). Logs go to files, one per process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).parents[1]
EVERY_PROCESS_CACHES = pathlib.Path(__file__).parent / "every_process_caches"  # its sitecustomize: see there


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Job:
    procs: list[subprocess.Popen]
    logs: list[pathlib.Path]
    earlier_records: int = 0  # train records in the workdir's metrics when the job started

    def log(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace")

    def wait(self, timeout: float) -> list[int]:
        """Every process's exit status; kills them all and fails when they take longer than ``timeout`` s."""
        deadline = time.time() + timeout
        for proc in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                raise AssertionError(f"job still running after {timeout} s; last log lines:\n{self.tail()}") from None
        return [p.returncode for p in self.procs]

    def signal(self, signum: int, which: list[int] | None = None) -> None:
        for i in range(len(self.procs)) if which is None else which:
            if self.procs[i].poll() is None:
                self.procs[i].send_signal(signum)

    def tail(self, lines: int = 15) -> str:
        return "\n".join(f"--- process {i}\n" + "\n".join(self.log(i).splitlines()[-lines:])
                         for i in range(len(self.procs)))


def cpu_env(devices: int) -> dict[str, str]:
    """This process's environment (conftest's compile flags and cache included) for a JAX process on ``devices``
    fake CPU devices."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    python_path = os.pathsep.join(p for p in (str(EVERY_PROCESS_CACHES), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": python_path,
            "XLA_FLAGS": " ".join([f"--xla_force_host_platform_device_count={devices}", *flags])}


def slurm_env(process: int, processes: int, job_id: int) -> dict[str, str]:
    """The variables SLURM sets for task ``process`` of a one-node job of ``processes`` tasks (those JAX's cluster
    detection reads)."""
    return {"SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_NUM_NODES": "1",
            "SLURM_NTASKS": str(processes), "SLURM_PROCID": str(process), "SLURM_LOCALID": str(process)}


def gke_tpu_env(process: int, processes: int, port: int) -> dict[str, str]:
    """The variables of worker ``process`` of a GKE TPU pod of ``processes`` hosts (one slice) that JAX's GkeTpuCluster
    reads: TPU_WORKER_HOSTNAMES and TPU_WORKER_ID (GKE's), and the MEGASCALE_* variables that a JobSet sets (without
    them JAX asks the GCE metadata server, which is not here). Two stand-ins: JAX_FORCE_TPU_INIT, with which JAX takes
    this machine for a Cloud TPU VM although it has no TPU chips (JAX_PLATFORMS=cpu keeps the CPU backend), and
    JAX_COORDINATOR_PORT, a free port instead of JAX's fixed 8482. Worker ids go in reverse launch order, so that a
    test can tell a process's index came from TPU_WORKER_ID."""
    return {"JAX_FORCE_TPU_INIT": "1", "TPU_WORKER_HOSTNAMES": ",".join(["localhost"] * processes),
            "TPU_WORKER_ID": str(processes - 1 - process), "MEGASCALE_COORDINATOR_ADDRESS": "localhost",
            "MEGASCALE_NUM_SLICES": "1", "MEGASCALE_SLICE_ID": "0", "JAX_COORDINATOR_PORT": str(port)}


def free_slurm_job_id() -> int:
    """A job id whose coordinator port (JAX derives it: 61440 + id % 4096) is free here."""
    first = os.getpid() % 4096
    for offset in range(4096):
        job_id = 4096 + (first + offset) % 4096
        with socket.socket() as s:
            try:
                s.bind(("localhost", 61440 + job_id % 4096))
            except OSError:
                continue
        return job_id
    raise RuntimeError("no free port for a SLURM job's coordinator")


def start(args: list[str], *, processes: int, devices_per_process: int, log_dir: pathlib.Path,
          heartbeat_timeout_s: int = 10, cluster: str | None = None) -> Job:
    """Start the job; ``args`` are the entry point's flags (``--config=...``, ``--workdir=...``, overrides). With
    ``cluster`` "slurm" or "gke_tpu" the processes find each other as a SLURM job's tasks or a GKE TPU pod's workers
    do (``--jax_distributed`` alone, JAX's cluster detection reading that cluster's variables); else from
    ``--coordinator_address`` and the process flags."""
    assert cluster in (None, "slurm", "gke_tpu"), cluster
    env = cpu_env(devices_per_process)
    port = free_port()  # the coordinator's (a SLURM job's is derived from its id)
    job_id = free_slurm_job_id() if cluster == "slurm" else 0
    variables = [slurm_env(i, processes, job_id) if cluster == "slurm" else
                 gke_tpu_env(i, processes, port) if cluster == "gke_tpu" else {} for i in range(processes)]
    flags = [[] for _ in range(processes)]  # each process's distributed flags
    if processes > 1:
        shared = ["--jax_distributed", f"--heartbeat_timeout_s={heartbeat_timeout_s}"]
        if not cluster:
            shared += [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}"]
        flags = [shared + ([] if cluster else [f"--process_id={i}"]) for i in range(processes)]
    log_dir.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    for i in range(processes):
        logs.append(log_dir / f"process_{i}.log")
        with logs[-1].open("w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "cab_jax.main", *args, *flags[i]], cwd=ROOT,
                                          env={**env, **variables[i]},
                                          stdout=log, stderr=subprocess.STDOUT))
    workdir = next((pathlib.Path(a.split("=", 1)[1]) for a in args if a.startswith("--workdir=")), None)
    return Job(procs, logs, len(metrics(workdir)) if workdir else 0)


def children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (Linux ``/proc``)."""
    found = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError):
            continue
        if int(ppid) == pid and state != "Z":
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def metrics(workdir: pathlib.Path, split: str = "train") -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == split]


def wait_for_step(job: Job, workdir: pathlib.Path, step: int, timeout: float = 300) -> None:
    """Block until this job logged a train step >= ``step`` (records of earlier jobs in the same workdir do not
    count); fails if a process exits first."""
    deadline = time.time() + timeout
    while len(metrics(workdir)) <= job.earlier_records or metrics(workdir)[-1]["step"] < step:
        exited = [i for i, p in enumerate(job.procs) if p.poll() is not None]
        assert not exited, f"processes {exited} exited before step {step}\n{job.tail()}"
        assert time.time() < deadline, f"step {step} not reached in {timeout} s\n{job.tail()}"
        time.sleep(0.2)

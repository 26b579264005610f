"""The real entry point as a job of several CPU processes: the same numbers as one process, one checkpoint for
the job that resumes after SIGKILL and with another process count, agreed stops, and a lost process ends the job.

Every run shares the session's persistent compilation cache (conftest), so each layout compiles once per process
count."""

import json
import random
import re
import signal
import time

import jax
import multiprocess_job as mp
import numpy as np
import pytest
import tensorflow_datasets as tfds
import test_lm_train
import test_train
from flax import nnx, traverse_util

from cab_jax import checkpoint, domains
from cab_jax.preemption import EXIT_RESUME

pytestmark = pytest.mark.slow

VISION_STEPS = 12  # long enough that a signal sent after a step lands before the end
LOSS_KEYS = {"vision": ("loss", "kl", "bridge", "grad_norm"), "language": ("loss", "ce", "kl", "bridge", "grad_norm")}
EVAL_KEYS = {"vision": ("top1", "top5", "eval_examples"), "language": ("eval_loss", "token_acc", "eval_tokens")}


def prepared(c, root, name):
    """Builds the embedded dataset of ``c`` and saves a random teacher; returns the entry point's flags for ``c``."""
    domain = domains.for_config(c)
    domain.data.prepare(c.data)
    teacher_dir = root / f"{name}_teacher"
    checkpoint.save_model_params(teacher_dir, nnx.state(domain.build_teacher(nnx.Rngs(0))).to_pure_dict())
    c.teacher.init_from = str(teacher_dir)
    config_file = "demo_lm.py" if c.domain == "language" else "demo.py"
    base = (test_lm_train.demo_lm_config if c.domain == "language" else test_train.demo_config).get_config()
    flat, flat_base = (traverse_util.flatten_dict(x.to_dict(), sep=".") for x in (c, base))
    changed = {k: v for k, v in flat.items() if flat_base.get(k) != v}
    return [f"--config={mp.ROOT / 'configs' / config_file}", *(f"--config.{k}={v}" for k, v in changed.items())]


@pytest.fixture(scope="module")
def vision_flags(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    c = test_train.small_config(root, steps=VISION_STEPS, checkpoint_every=2)
    c.student.depth = 2  # each layer's gradients are reduced inside the layer scan: each costs ms over gloo
    return prepared(c, root, "vision")


@pytest.fixture(scope="module")
def language_flags(tmp_path_factory):
    root = tmp_path_factory.mktemp("language")
    c = test_lm_train.tiny_config(root, steps=4, eval_batch_size=128)
    c.data.update(dict(synthetic=False, max_corpus_bytes=100_000, vocab_size=512, seq_len=32))
    c.teacher.vocab_size = c.student.vocab_size = 512
    return prepared(c, root, "language")


def mesh_flags(data, fsdp=1, tensor=1):
    return [f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}", f"--config.mesh.tensor={tensor}"]


def start(flags, workdir, processes, cluster=None):
    return mp.start([*flags, f"--workdir={workdir}"], processes=processes, devices_per_process=8 // processes,
                    log_dir=workdir.with_name(workdir.name + "_logs"), cluster=cluster)


def finished(job):
    """``job`` once every process exited 0."""
    assert job.wait(300) == [0] * len(job.procs), job.tail()
    return job


def run(flags, workdir, processes):
    return finished(start(flags, workdir, processes))


def by_step(workdir, split="train"):
    """The last record of each step (a replayed step after a restart replaces the one before it)."""
    return {r["step"]: r for r in mp.metrics(workdir, split)}


def assert_same_run(workdir, reference, domain, strict_until=2):
    """Every step's loss terms (and gradient norm) within 1e-6 of the loss (or of the value, when larger) up to step
    ``strict_until`` (at most 2: steps of an uninterrupted run), 1e-5 after. The processes' gloo all-reduce adds the
    devices' partial sums in another order than one process does: the first step's KL differs in its last bit, and
    training amplifies that (measured: 6e-8 of the loss at step 2, 1.01e-6 at step 3 (in 3 of 17 runs on
    2026-12-04 just over 1e-6), 1.45e-6 at step 4 of the vision chain, 1e-6 at step 5, 2e-6 at step 24)."""
    strict_until = min(strict_until, 2)
    got, want = by_step(workdir), by_step(reference)
    assert sorted(got) == sorted(want)
    for step, row in want.items():
        for key in LOSS_KEYS[domain]:
            tolerance = (1e-6 if step <= strict_until else 1e-5) * max(abs(row["loss"]), abs(row[key]))
            assert abs(got[step][key] - row[key]) <= tolerance, (step, key, got[step][key], row[key])
    (final,), (final_want,) = by_step(workdir, "eval").values(), by_step(reference, "eval").values()
    for key in EVAL_KEYS[domain]:
        np.testing.assert_allclose(final[key], final_want[key], rtol=1e-5, err_msg=key)


def assert_one_checkpoint_per_step(workdir):
    """Each step is one checkpoint of the job: one state (its shards written by each process) and one iterator
    state (written once, not once per process)."""
    steps = [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps
    for step in steps:
        assert sorted(p.name for p in step.iterdir() if p.is_dir()) == ["data", "state"], step
        assert sorted(p.name for p in (step / "data").iterdir()) == ["commit_success.txt", "metadata"], step
        assert (step / "state" / "manifest.ocdbt").exists() and (step / "state" / "_METADATA").exists(), step


@pytest.fixture(scope="module")
def language_one(tmp_path_factory, language_flags):
    """The language CAB step (the chunked SSD scan) with data=2 x fsdp=4, its flags and the workdir of its run in
    one process, started (not waited for: a test starts its two-process job beside it, then waits for both)."""
    flags = [*language_flags, *mesh_flags(2, 4), "--config.student.ssd_impl=chunked"]
    workdir = tmp_path_factory.mktemp("language_one") / "one"
    return flags, workdir, start(flags, workdir, 1)


def test_two_processes_give_the_numbers_of_one_language(tmp_path, language_one):
    """The language step of ``language_one``; the vision step's layouts are the chain's below. The two processes are
    a SLURM job's two tasks: ``--jax_distributed`` alone, the coordinator, process count and index detected from
    SLURM's variables (the chain below passes them as flags)."""
    flags, one, reference = language_one
    two = start(flags, tmp_path / "two", 2, cluster="slurm")
    finished(reference), finished(two)
    assert "process 1/2" in two.log(1)
    assert_same_run(tmp_path / "two", one, "language")
    assert_one_checkpoint_per_step(tmp_path / "two")


def test_two_processes_find_each_other_as_a_gke_tpu_pods_workers(tmp_path, language_one):
    """The same job as a GKE TPU pod's two workers: ``--jax_distributed`` alone, and JAX's GkeTpuCluster takes the
    coordinator, process count and index from TPU_WORKER_HOSTNAMES, TPU_WORKER_ID and the MEGASCALE_* variables
    (``multiprocess_job.gke_tpu_env``; JAX_FORCE_TPU_INIT stands in for the TPU chips). The worker ids are the reverse
    of the launch order, so each process's index is seen to come from TPU_WORKER_ID. The numbers are one process's.
    A Cloud TPU VM slice's detection (GceTpuCluster, from the GCE metadata server) cannot run here: JAX skips it on a
    machine without TPU chips."""
    flags, one, reference = language_one
    two = start(flags, tmp_path / "two", 2, cluster="gke_tpu")
    finished(reference), finished(two)
    assert "process 1/2" in two.log(0) and "process 0/2" in two.log(1), two.tail()
    assert_same_run(tmp_path / "two", one, "language")
    assert_one_checkpoint_per_step(tmp_path / "two")


def test_lost_killed_stopped_and_resumed_with_other_process_counts_and_layouts(tmp_path, vision_flags):
    """The vision run of ``VISION_STEPS`` steps, against one uninterrupted process with mesh data=8 (the associative
    scan): job a (2 processes, data=8) loses process 1 to SIGKILL; the other exits non-zero within the heartbeat
    timeout (plus slack), naming it, and no data worker of either outlives them. Job b (1 process, data=8) resumes
    and is stopped by SIGINT (Ctrl-C); job c (2 processes, data=2 x fsdp=2 x tensor=2, the Pallas scan interpreted)
    resumes, resharded, and is stopped by SIGTERM sent to one process only (both stop after the same step); each
    saves the step it stopped at and exits 75. The last job (2 processes, data=8) runs to the end (exit 0). Each
    restart continues from the last saved step, and the trajectory is the uninterrupted run's: job a's first steps
    (a fresh 2-process run) within 1e-6, the later ones, job c's other layout and scan included, within 1e-5."""
    straight = start([*vision_flags, *mesh_flags(8), f"--config.train.checkpoint_every={VISION_STEPS}"],
                     tmp_path / "straight", 1)  # saves nothing; runs beside job a
    work = tmp_path / "run"
    data8 = [*vision_flags, *mesh_flags(8), f"--workdir={work}"]
    # Job a reads through grain worker processes (one per trainer process), the others in the trainer's threads:
    # the batches of a step do not depend on how they are read, so the trajectory is the same.
    kill_at, heartbeat = random.Random().randint(3, 4), 5  # after the checkpoint of step 2

    job = mp.start([*data8, "--config.data.num_workers=1"], processes=2, devices_per_process=4,
                   log_dir=tmp_path / "logs_a", heartbeat_timeout_s=heartbeat)
    mp.wait_for_step(job, work, kill_at)
    workers = [pid for proc in job.procs for pid in mp.children(proc.pid)]
    assert len(workers) >= 2, workers  # at least each process's grain worker
    job.signal(signal.SIGKILL, which=[1])
    killed = time.time()
    status = job.wait(heartbeat + 60)[0]
    while any(map(mp.alive, workers)) and time.time() < killed + heartbeat + 70:
        time.sleep(0.2)
    assert not any(map(mp.alive, workers)), "data workers outlived the processes that started them"
    assert status not in (0, EXIT_RESUME) and time.time() - killed < heartbeat + 60, status
    assert re.search(r"stopped sending heartbeats\)?:?\s*(/job:jax_worker/replica:0/task:)?1\b", job.log(0)), job.tail()
    saved = fresh = checkpoint.RunCheckpointer(work / "checkpoints").latest_step()  # job a's steps up to here stay
    assert saved is not None and saved >= 2, (saved, kill_at)

    finished(straight)  # before job b, which runs its programs
    job = mp.start(data8, processes=1, devices_per_process=8, log_dir=tmp_path / "logs_b")
    mp.wait_for_step(job, work, saved + 2)
    job.signal(signal.SIGINT)
    assert job.wait(120) == [EXIT_RESUME], job.tail()
    assert f"resumed at step {saved}" in job.log(0) and "Stop requested (signal 2)" in job.log(0)
    saved = checkpoint.RunCheckpointer(work / "checkpoints").latest_step()
    assert f"Stopped at step {saved};" in job.log(0), job.tail()

    job = mp.start([*vision_flags, *mesh_flags(2, 2, 2), "--config.student.scan_impl=pallas", f"--workdir={work}"],
                   processes=2, devices_per_process=4, log_dir=tmp_path / "logs_c")
    mp.wait_for_step(job, work, saved + 2)
    job.signal(signal.SIGTERM, which=[1])  # one process gets the signal; both must stop after the same step
    assert job.wait(120) == [EXIT_RESUME] * 2, job.tail()
    stopped = checkpoint.RunCheckpointer(work / "checkpoints").latest_step()
    assert all(f"Stopped at step {stopped};" in job.log(i) for i in range(2)), job.tail()
    assert f"resumed at step {saved}" in job.log(0) and stopped < VISION_STEPS

    last = run([*vision_flags, *mesh_flags(8)], work, 2)
    assert f"resumed at step {stopped}" in last.log(0) and "process 1/2" in last.log(1)
    # Its lines end with the time left, 0 s at the last step (job c may have stopped one step before the end).
    lines = re.findall(rf"\[student (\d+)/{VISION_STEPS}\] .* eta=(\w+)\n", last.log(0))
    assert lines and lines[-1] == (str(VISION_STEPS), "0s"), last.tail()
    assert all(re.fullmatch(r"\d+s", eta) for _, eta in lines), lines
    assert_same_run(work, tmp_path / "straight", "vision", strict_until=fresh)  # later steps replayed after restarts
    final, want = (json.loads((w / "results.json").read_text()) for w in (work, tmp_path / "straight"))
    assert final["step"] == want["step"] == VISION_STEPS and final["metrics"] == pytest.approx(want["metrics"])
    data_dir = next(f.split("=", 1)[1] for f in vision_flags if f.startswith("--config.data.data_dir="))
    test_examples = tfds.builder("cab_digits", data_dir=data_dir).info.splits["test"].num_examples
    assert final["metrics"]["eval_examples"] == test_examples  # counted once by two processes, padding excluded
    assert_one_checkpoint_per_step(work)


def test_a_run_that_fails_with_data_workers_leaves_no_worker_or_shared_memory(tmp_path, vision_flags):
    """An exception in the training loop (the non-finite guard's: the teacher's weights are NaN) while grain worker
    processes read: exit status 1 with one line naming the step, no worker outlives the run and no shared memory is
    left for the resource tracker to clean. The program is the chain's uninterrupted run's (compiled once)."""
    c = test_train.small_config(tmp_path)
    teacher = nnx.state(domains.for_config(c).build_teacher(nnx.Rngs(0))).to_pure_dict()
    checkpoint.save_model_params(tmp_path / "nan_teacher", jax.tree.map(lambda x: np.full(x.shape, np.nan), teacher))
    flags = [*vision_flags, *mesh_flags(8), f"--config.train.checkpoint_every={VISION_STEPS}",
             f"--config.teacher.init_from={tmp_path / 'nan_teacher'}", "--config.data.num_workers=1"]
    job = mp.start([*flags, f"--workdir={tmp_path / 'run'}"], processes=1, devices_per_process=8,
                   log_dir=tmp_path / "logs")
    deadline, workers = time.time() + 120, []
    while len(workers) < 2 and job.procs[0].poll() is None and time.time() < deadline:
        workers = mp.children(job.procs[0].pid)
        time.sleep(0.1)
    assert len(workers) >= 2, job.tail()  # the grain worker and the resource tracker
    assert job.wait(300) == [1], job.tail()
    assert re.search(r"error: step \d+: the loss or its gradient is not finite", job.log(0)), job.tail()
    time.sleep(1)
    assert not any(map(mp.alive, workers)) and "leaked shared_memory" not in job.log(0), job.tail()

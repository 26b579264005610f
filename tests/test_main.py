"""The entry point end to end: SIGTERM and Ctrl-C save the current step and exit with the "resume me" status (75),
the same command resumes, and a finished run exits 0."""

import pathlib
import signal

import multiprocess_job as mp

from cab_jax.preemption import EXIT_RESUME

ROOT = pathlib.Path(__file__).parents[1]


def teacher_flags(workdir, steps):
    return [f"--config={ROOT / 'configs' / 'demo.py'}", f"--workdir={workdir}", "--config.task=train_teacher",
            "--config.teacher.depth=2", "--config.teacher.embed_dim=32", f"--config.teacher.train.steps={steps}",
            "--config.teacher.train.log_every=2", "--config.teacher.train.checkpoint_every=100000",
            f"--config.data.data_dir={workdir / 'tfds'}"]


def train_steps(workdir):
    return [r["step"] for r in mp.metrics(workdir)]


def saved_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def stop_with(signum, workdir, after_step):
    """Start a long run, send ``signum`` once it logged ``after_step``, return its (exit status, log)."""
    job = mp.start(teacher_flags(workdir, 100000), processes=1, devices_per_process=1,
                   log_dir=workdir.parent / f"logs_signal_{signum}")
    mp.wait_for_step(job, workdir, after_step)
    job.signal(signum)
    (status,) = job.wait(120)
    return status, job.log(0)


def test_signals_save_the_step_exit_75_and_the_same_command_resumes(tmp_path):
    work = tmp_path / "run"
    status, log = stop_with(signal.SIGTERM, work, 6)
    assert status == EXIT_RESUME, log[-3000:]
    assert "Stop requested (signal 15)" in log and "run the same command again to resume" in log
    saved = saved_steps(work)
    assert len(saved) == 1 and saved[0] >= 6, saved  # no periodic checkpoint was due: this is the stop's
    first_stop = saved[0]

    status, log = stop_with(signal.SIGINT, work, first_stop + 2)
    assert status == EXIT_RESUME, log[-3000:]
    assert f"resumed at step {first_stop}" in log and "Stop requested (signal 2)" in log
    stopped_at = saved_steps(work)[-1]
    assert stopped_at >= first_stop + 2

    logged_before = len(train_steps(work))
    resumed = mp.run(teacher_flags(work, stopped_at + 4), processes=1, devices_per_process=1,
                     log_dir=tmp_path / "logs_resumed")
    assert f"resumed at step {stopped_at}" in resumed.log(0)
    new_steps = train_steps(work)[logged_before:]
    assert new_steps and new_steps[-1] == stopped_at + 4 and all(s > stopped_at for s in new_steps)

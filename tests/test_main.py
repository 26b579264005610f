"""The entry point end to end: SIGTERM and Ctrl-C save the current step and exit with the "resume me" status (75),
the same command resumes, and a finished run exits 0."""

import json
import pathlib
import signal
import subprocess
import sys
import time

from cab_jax.preemption import EXIT_RESUME

ROOT = pathlib.Path(__file__).parents[1]


def teacher_command(workdir, steps):
    return [sys.executable, "-m", "cab_jax.main", f"--config={ROOT / 'configs' / 'demo.py'}", f"--workdir={workdir}",
            "--config.task=train_teacher", "--config.teacher.depth=2", "--config.teacher.embed_dim=32",
            f"--config.teacher.train.steps={steps}", "--config.teacher.train.log_every=2",
            "--config.teacher.train.checkpoint_every=100000", f"--config.data.data_dir={workdir / 'tfds'}"]


def train_steps(workdir):
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if r["split"] == "train"]


def saved_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def stop_with(signum, workdir, after_step):
    """Start a long run, send ``signum`` once it logged ``after_step``, return its (returncode, stderr)."""
    proc = subprocess.Popen(teacher_command(workdir, 100000), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not train_steps(workdir) or train_steps(workdir)[-1] < after_step:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "training did not reach the step in time"
        time.sleep(0.5)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


def test_signals_save_the_step_exit_75_and_the_same_command_resumes(tmp_path):
    status, stderr = stop_with(signal.SIGTERM, tmp_path, 6)
    assert status == EXIT_RESUME, stderr[-3000:]
    assert "Stop requested (signal 15)" in stderr and "run the same command again to resume" in stderr
    saved = saved_steps(tmp_path)
    assert len(saved) == 1 and saved[0] >= 6, saved  # no periodic checkpoint was due: this is the stop's
    first_stop = saved[0]

    status, stderr = stop_with(signal.SIGINT, tmp_path, first_stop + 2)
    assert status == EXIT_RESUME, stderr[-3000:]
    assert f"resumed at step {first_stop}" in stderr and "Stop requested (signal 2)" in stderr
    stopped_at = saved_steps(tmp_path)[-1]
    assert stopped_at >= first_stop + 2

    logged_before = len(train_steps(tmp_path))
    resumed = subprocess.run(teacher_command(tmp_path, stopped_at + 4), cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at step {stopped_at}" in resumed.stderr
    new_steps = train_steps(tmp_path)[logged_before:]
    assert new_steps and new_steps[-1] == stopped_at + 4 and all(s > stopped_at for s in new_steps)

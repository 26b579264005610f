"""The entry point end to end: Ctrl-C saves and exits cleanly, and the same command resumes."""

import json
import pathlib
import signal
import subprocess
import sys
import time

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


def test_sigint_checkpoints_and_the_same_command_resumes(tmp_path):
    proc = subprocess.Popen(teacher_command(tmp_path, 100000), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not train_steps(tmp_path) or train_steps(tmp_path)[-1] < 6:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "training did not start in time"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Stop requested" in stderr and "run the same command again to resume" in stderr
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and saved[0] >= 6, saved  # no periodic checkpoint was due: this is the stop's

    stopped_at = saved[0]
    logged_before = len(train_steps(tmp_path))
    resumed = subprocess.run(teacher_command(tmp_path, stopped_at + 4), cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at step {stopped_at}" in resumed.stderr
    new_steps = train_steps(tmp_path)[logged_before:]
    assert new_steps and new_steps[-1] == stopped_at + 4 and all(s > stopped_at for s in new_steps)

"""What a user sees from the real command lines: one-line errors with exit status 2, --help and --print_config,
checks before any work, and a log without library noise."""

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest
import test_config

ROOT = pathlib.Path(__file__).parents[1]
CONFIGS = ROOT / "configs"


def run(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def is_log_line(line: str) -> bool:
    """An absl log line: I/W/E + date."""
    return line[:1] in "IWE" and line[1:5].isdigit()


def user_lines(stderr: str) -> list[str]:
    """stderr without absl's log lines."""
    return [line for line in stderr.splitlines() if line.strip() and not is_log_line(line)]


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = user_lines(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("override, fragments", [
    ("--config.trian.steps=5", ("--config.trian.steps=5", "no field 'trian'", "did you mean 'train'?")),
    ("--config.train.stepz=5", ("--config.train.stepz=5", "no field 'stepz'", "did you mean 'steps'?")),
    ("--config.train.steps=-5", ("config.train.steps", "must be positive", "-5")),
    ("--config.loss.mode=cabb", ("config.loss.mode: got 'cabb', expected one of ('vanilla', 'soft', 'cab', "
                                 "'attention_transfer', 'ce', 'kl'); did you mean 'cab'?",)),  # README's line
    ("--config.data.subset_fraction=-0.1", ("config.data.subset_fraction", "(0, 1]", "-0.1")),
    ("--config.train.batch_size=abc", ("--config.train.batch_size=abc", "'abc'")),
])
def test_bad_overrides_are_one_line_usage_errors(tmp_path, override, fragments):
    proc = run("cab_jax.main", f"--config={CONFIGS / 'vim_small.py'}", f"--workdir={tmp_path / 'run'}", override)
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "run").exists()


def test_a_batch_the_data_parallel_mesh_does_not_divide_is_a_usage_error(tmp_path):
    proc = run("cab_jax.main", f"--config={CONFIGS / 'vim_small.py'}", f"--workdir={tmp_path / 'run'}",
               "--config.train.batch_size=3", env={"JAX_NUM_CPU_DEVICES": "2"})
    assert_one_line_error(proc, "config.train.batch_size: 3 must be divisible by the data-parallel mesh size "
                                "(mesh.data x mesh.fsdp = 2)")
    assert not (tmp_path / "run").exists()


def test_a_dataset_that_is_not_prepared_is_one_line_before_any_work(tmp_path):
    proc = run("cab_jax.main", f"--config={CONFIGS / 'vim_small.py'}", f"--workdir={tmp_path / 'run'}",
               f"--config.data.data_dir={tmp_path / 'tfds'}")
    assert_one_line_error(proc, f"Dataset 'imagenet2012' is not prepared in data_dir '{tmp_path / 'tfds'}'",
                          "this pipeline never downloads", "tfds build imagenet2012")
    assert not (tmp_path / "run").exists() and not (tmp_path / "tfds").exists()


def test_bad_config_files_and_variants_are_one_line_usage_errors(tmp_path):
    assert_one_line_error(run("cab_jax.main", "--config=configs/nope.py", f"--workdir={tmp_path}"),
                          "--config=configs/nope.py", "no such file")
    assert_one_line_error(run("cab_jax.main", "--config=configs/vim_small.py:subsett=0.01", f"--workdir={tmp_path}"),
                          "subsett=0.01", "'subset'")
    assert_one_line_error(run("cab_jax.main", "--config=configs/vim_small.py"), "--workdir is required")


def test_help_exits_0_and_names_print_config():
    for module in ("cab_jax.main", "cab_jax.convert"):
        proc = run(module, "--help")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "--" in proc.stdout
    assert "--print_config" in run("cab_jax.main", "--help").stdout


def test_print_config_shows_the_derived_values_and_trains_nothing(tmp_path):
    proc = run("cab_jax.main", f"--config={CONFIGS / 'vim_small.py'}:synthetic=True", "--config.train.batch_size=64",
               f"--workdir={tmp_path / 'run'}", "--print_config")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "batch_size: 64" in out  # the resolved fields
    # 1024 synthetic images, batch 64: 16 steps per epoch, the recipe's 300 epochs of a 10 % subset, 5 warmup epochs.
    assert "steps: 4,800 (300 epochs of 16 steps, from the recipe's epochs for the subset); warmup 80 steps" in out
    assert "peak lr: 6.25e-05 (= 0.0005 x 64 / 512)" in out
    assert "batch: 64 global, 64 per device; eval batch 64 global, 64 per device" in out  # eval follows train
    assert "mesh data 1 x fsdp 1 x tensor 1" in out
    assert "parameters: student 25.80 M, bridges 4.96 M, frozen teacher 22.05 M" in out
    assert not (tmp_path / "run").exists()


def test_unreadable_weights_fail_before_any_work(tmp_path):
    demo = [f"--config={CONFIGS / 'demo.py'}", "--config.task=distill", f"--config.data.data_dir={tmp_path / 'tfds'}"]
    start = time.time()
    proc = run("cab_jax.main", *demo, f"--workdir={tmp_path / 'run'}", f"--config.teacher.init_from={tmp_path / 'no'}")
    assert_one_line_error(proc, "config.teacher.init_from", str(tmp_path / "no"))
    assert time.time() - start < 60 and not (tmp_path / "run").exists() and not (tmp_path / "tfds").exists()

    junk = tmp_path / "x.pth"
    junk.write_bytes(os.urandom(4096))
    proc = run("cab_jax.main", *demo, f"--workdir={tmp_path / 'run'}", f"--config.teacher.init_from={junk}")
    assert_one_line_error(proc, "not a PyTorch checkpoint: neither a zip archive nor a pickle")
    assert "weights_only" not in proc.stderr and not (tmp_path / "run").exists()

    proc = run("cab_jax.main", *demo, f"--workdir={tmp_path / 'run'}", f"--config.student.init_from={tmp_path / 'no'}")
    assert_one_line_error(proc, "config.student.init_from", str(tmp_path / "no"))
    assert not (tmp_path / "run").exists()

    proc = run("cab_jax.convert", "--src=/nonexistent.pth", "--format=timm", "--model=deit_small",
               f"--out={tmp_path / 'out'}")
    assert_one_line_error(proc, "no weights at /nonexistent.pth")
    assert not (tmp_path / "out").exists()


def test_a_step_that_does_not_fit_stops_before_training(tmp_path):
    proc = run("cab_jax.main", f"--config={CONFIGS / 'demo.py'}", "--config.task=train_teacher",
               f"--config.data.data_dir={tmp_path / 'tfds'}", f"--workdir={tmp_path / 'run'}",
               env={"CAB_JAX_DEVICE_MEMORY_GIB": "0.001"})
    assert_one_line_error(proc, "config.teacher.train.batch_size", "GiB per device (XLA's estimate)",
                          "0.0 GiB a cpu device has here")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


NOISE = ("Downloading and preparing", "downloaded and prepared", "\x1b[A", "Variant folder", "Done writing",
         "Unable to initialize backend", "Load dataset info", "read_only=True", "Given directory is read only",
         "Using custom data configuration", "Traceback")


def log_lines(stderr: str) -> list[str]:
    """absl's log lines of stderr, the part after the source location."""
    return [line.split("] ", 1)[1] for line in stderr.splitlines() if is_log_line(line)]


@pytest.mark.slow
def test_a_study_logs_only_what_the_user_needs_and_a_rerun_says_it_reused(tmp_path):
    """A small study (teacher, then one distilled student) twice: the log carries no library noise, a line per
    ``log_every`` steps, and so (README) about 45 lines for the whole demo; the second invocation's table marks both
    rows as reused."""
    args = [f"--config={CONFIGS / 'demo.py'}", f"--workdir={tmp_path}", "--config.study.modes=('soft',)",
            "--config.teacher.depth=1", "--config.student.depth=2", "--config.teacher.train.steps=4",
            "--config.train.steps=4", "--config.teacher.train.log_every=2", "--config.train.log_every=2"]
    first = run("cab_jax.main", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    for noise in NOISE:
        assert noise not in first.stderr + first.stdout, noise
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["this run"] for r in rows] == ["trained", "trained"]

    log = log_lines(first.stderr)
    progress = [line.split("]")[0] + "]" for line in log if re.match(r"\[(teacher|student) \d+/4\]", line)]
    assert progress == ["[teacher 2/4]", "[teacher 4/4]", "[student 2/4]", "[student 4/4]"], log
    student = next(i for i, line in enumerate(log) if line.startswith("Study stage 2"))
    teacher_lines, student_lines = student - 2, len(log) - student - 2  # each without its progress lines
    demo = test_config.load(CONFIGS / "demo.py")
    assert demo.teacher.train.log_every == demo.train.log_every == 50
    lines = (teacher_lines + demo.teacher.train.steps // demo.teacher.train.log_every
             + len(demo.study.modes) * (student_lines + demo.train.steps // demo.train.log_every))
    assert 40 <= lines <= 50, (lines, log)  # README: "about 45 lines in all"

    second = run("cab_jax.main", *args)
    assert second.returncode == 0, second.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["this run"] for r in rows] == ["reused", "reused"]
    assert "| reused |" in second.stdout


@pytest.mark.parametrize("raised, status, one_line", [("RuntimeError('boom')", 1, False),
                                                      ("DivergedError('loss is nan at step 3')", 1, True),
                                                      ("ConfigError('config.x: bad')", 2, True)])
def test_exit_statuses_of_failures(raised, status, one_line):
    """README: a usage or config error is one line with status 2, a diverged run one line with status 1, any other
    failure status 1 with its traceback."""
    script = ("import sys\nfrom cab_jax import cli\nfrom cab_jax.errors import ConfigError, DivergedError\n"
              f"def main(argv):\n    raise {raised}\ncli.run(main)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if status == 2:
        assert_one_line_error(proc, "config.x: bad")
    elif one_line:
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert user_lines(proc.stderr) == ["error: loss is nan at step 3"], proc.stderr
    else:
        assert proc.returncode == 1 and "Traceback" in proc.stderr and "RuntimeError: boom" in proc.stderr

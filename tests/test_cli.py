"""What a user sees from the real command lines: one-line errors with exit status 2, --help and --print_config,
checks before any work, and a log without library noise."""

import json
import os
import pathlib
import re
import subprocess
import sys
import time
import types

import pytest
import readme_text
import test_config
import yaml

ROOT = pathlib.Path(__file__).parents[1]
CONFIGS = ROOT / "configs"
README = readme_text.README


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
    if override == "--config.trian.steps=5":  # README's example of an unknown field, the whole line
        assert user_lines(proc.stderr) == list(readme_text.find(r"\(`(error: --config\.trian\.steps=5: [^`]*)`\)")), \
            proc.stderr


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
    assert_prints_every_field(out, test_config.load(f"{CONFIGS / 'vim_small.py'}:synthetic=True",
                                                    "--config.train.batch_size=64"))


def assert_prints_every_field(out: str, config) -> None:
    """README: ``--print_config`` prints every field (then the derived values): its ``# config`` section reads back
    as the resolved config, every field with its value."""
    section = out.split("# config\n", 1)[1].split("\n# derived\n", 1)[0]
    printed, expected = test_config.flatten(yaml.unsafe_load(section)), test_config.flatten(config.to_dict())
    assert sorted(printed) == sorted(expected), set(printed) ^ set(expected)
    assert printed == expected


@pytest.mark.slow
def test_the_synthetic_vision_command_trains_through_main(tmp_path):
    """README's ``configs/vim_small.py:synthetic=True`` command, as README writes it (its overrides read from it),
    then shrunk for a CPU (one teacher and two student layers, 2 steps of 4 of 8 images, read in the trainer's
    threads): random images and a random teacher, every term of the cab loss, and a final evaluation in
    results.json."""
    readme = README.read_text()
    command = re.search(r"python -m cab_jax\.main (--config=configs/vim_small\.py:synthetic=True) "
                        r"--workdir=\S+ \\\n\s+(.+)\n", readme)
    assert command, "README's synthetic vim_small command"
    shrink = ["--config.teacher.depth=1", "--config.student.depth=2", "--config.train.steps=2",
              "--config.train.batch_size=4", "--config.data.synthetic_size=8", "--config.data.num_workers=0"]
    proc = run("cab_jax.main", command.group(1), f"--workdir={tmp_path}", *command.group(2).split(), *shrink,
               timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in trained if r["split"] == "train"]
    assert trained[-1]["step"] == 2 and all(trained[-1][k] >= 0 for k in ("kl", "bridge", "loss")), trained[-1]
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["step"] == 2 and 0 <= result["metrics"]["top1"] <= 100, result


def test_the_synthetic_language_variant_prints_its_config(tmp_path):
    """README's ``configs/phi_mamba.py:synthetic=True`` command, with ``--print_config``: random tokens and a random
    teacher, FSDP over every device, and nothing trained."""
    proc = run("cab_jax.main", f"--config={CONFIGS / 'phi_mamba.py'}:synthetic=True", f"--workdir={tmp_path / 'run'}",
               "--print_config")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train examples: 1,024 (random (data.synthetic))" in proc.stdout
    assert "mesh data 1 x fsdp 1 x tensor 1" in proc.stdout  # fsdp -1: the one device here
    assert_prints_every_field(proc.stdout, test_config.load(f"{CONFIGS / 'phi_mamba.py'}:synthetic=True"))
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


def located_log_lines(stderr: str) -> list[tuple[str, str]]:
    """absl's log lines of stderr as (source location ``file.py:N``, message)."""
    return [tuple(line.split(" ", 3)[3].split("] ", 1)) for line in stderr.splitlines() if is_log_line(line)]


def readme_sample_log() -> list[tuple[str, str]]:
    """README's abridged demo log: (source location, message) per line, without its "..." lines."""
    text = README.read_text()
    block = text[text.index("```\nmain.py:"):].split("\n```", 1)[0]
    return [tuple(line.split("] ", 1)) for line in block.splitlines()[1:] if line != "..."]


NUMBER = r"\d+(?:\.\d+)*(?:e[-+]?\d+)?"


def sample_pattern(message: str, workdir: pathlib.Path) -> str:
    """A README sample log message as a pattern for a run in ``workdir``: its numbers stand for any number, a quoted
    name for any name, README's /tmp/cab_demo for ``workdir``, and a trailing "..." for the rest of the line."""
    message = message.replace("/tmp/cab_demo", str(workdir))
    message, rest = (message[:-4], ".*") if message.endswith(" ...") else (message, "")
    parts = re.split(rf"((?<![\w.]){NUMBER}|'\w+')", message)
    return "".join(re.escape(part) if i % 2 == 0 else NUMBER if part[0] != "'" else r"'\w+'"
                   for i, part in enumerate(parts)) + rest


def test_the_readme_logs_source_locations_are_its_logging_calls():
    """README's sample log names where each line is logged (``train.py:608]``): that line of that file is a logging
    call (the slow study test checks that a run logs each sample line from there)."""
    sources = {path.name: path for path in (ROOT / "cab_jax").rglob("*.py")}
    for location, _ in readme_sample_log():
        name, number = location.split(":")
        line = sources[name].read_text().splitlines()[int(number) - 1]
        assert re.search(r"\blogging\.(info|warning)\(", line), (location, line)


@pytest.mark.slow
def test_a_study_logs_only_what_the_user_needs_and_a_rerun_says_it_reused(tmp_path):
    """A small study (teacher, then one distilled student) twice: the log carries no library noise, a line per
    ``log_every`` steps, and so (README) about 45 lines for the whole demo; the second invocation's table marks both
    rows as reused."""
    args = [f"--config={CONFIGS / 'demo.py'}", f"--workdir={tmp_path}", "--config.study.modes=('soft',)",
            "--config.teacher.depth=1", "--config.student.depth=2", "--config.teacher.train.steps=4",
            "--config.train.steps=4", "--config.teacher.train.log_every=2", "--config.train.log_every=2",
            "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=3"]
    first = run("cab_jax.main", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    for noise in NOISE:
        assert noise not in first.stderr + first.stdout, noise
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["this run"] for r in rows] == ["trained", "trained"]
    student_dir = tmp_path / "students" / "soft" / "fraction0.03_seed0"
    # train.keep_checkpoints reaches the run: of the student's checkpoints at steps 1-4, the newest 3 stay
    assert sorted(int(p.name) for p in (student_dir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3, 4]
    # TensorBoard: one run per model, each model's events in its own directory
    for model_dir in (tmp_path / "teacher", student_dir):
        assert list(model_dir.glob("events.out.tfevents.*")), model_dir
    assert not list(tmp_path.glob("events.out.tfevents.*"))
    # results.md: README's table header, less the columns README says it leaves out
    (left_out,) = readme_text.find(r"\(shown here without its (.*?) columns\)")
    left_out = re.findall(r"`([^`]+)`", left_out)
    readme_header = next(line for line in README.read_text().splitlines() if line.startswith("| model | mode |"))
    header = (tmp_path / "results.md").read_text().splitlines()[0]
    columns = readme_text.table_cells(header)
    assert set(left_out) <= set(columns), (left_out, header)
    assert "| " + " | ".join(c for c in columns if c not in left_out) + " |" == readme_header, header

    # README's sample log: each of its lines (numbers, names and the workdir aside) is a line of this run's log,
    # logged from the place it names; the dataset is built once
    located = located_log_lines(first.stderr)
    for location, message in readme_sample_log():
        pattern = sample_pattern(message, tmp_path)
        found = [where for where, got in located if re.fullmatch(pattern, got)]
        assert len(found) == 1 if "(once)" in message else found, (message, pattern, located)
        assert set(found) == {location}, (message, found)

    log = log_lines(first.stderr)
    progress = [line.split("]")[0] + "]" for line in log if re.match(r"\[(teacher|student) \d+/4\]", line)]
    assert progress == ["[teacher 2/4]", "[teacher 4/4]", "[student 2/4]", "[student 4/4]"], log
    # README: each progress line has the loss terms (the teacher's ce; soft distillation's kl), lr and throughput
    for line in log:
        if match := re.fullmatch(r"\[(teacher|student) \d+/4\] (.*) eta=\S+", line):
            keys = {item.split("=")[0] for item in match.group(2).split()}
            terms = {"teacher": {"ce"}, "student": {"kl"}}[match.group(1)]
            assert keys >= terms | {"loss", "lr", "images_per_s"}, line
    assert sum(" eta=" in line for line in log) == len(progress)
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
    building = next(message for _, message in readme_sample_log() if message.startswith("Building the embedded"))
    assert not any(line.startswith(building.split(" in ")[0]) for line in log_lines(second.stderr)), second.stderr
    assert any(line.startswith("Study stage 1: ") for line in log_lines(second.stderr))


def test_the_eta_counts_the_time_of_evaluations(tmp_path, monkeypatch, caplog):
    """README: ``eta=`` is from the average step so far, evaluations included. A clock that only moves during
    evaluations (300 s each): after step 3 of 4, with an evaluation after step 2, 300 s / 3 steps x 1 step left."""
    from cab_jax import train

    c = test_config.load(CONFIGS / "demo.py", "--config.task=distill", "--config.data.synthetic=True",
                         f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.teacher.depth=1",
                         "--config.student.depth=1", "--config.train.steps=4", "--config.train.log_every=1",
                         "--config.train.eval_every=2", "--config.train.batch_size=8")
    now = [1000.0]
    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=lambda: now[0]))
    evaluate = train.evaluate

    def slow_evaluate(*args, **kwargs):
        now[0] += 300.0
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", slow_evaluate)
    with caplog.at_level("INFO"):
        train.train_and_evaluate(c, str(tmp_path / "run"))
    etas = re.findall(r"\[student (\d)/4\] .* eta=(\S+)$", caplog.text, re.MULTILINE)
    assert etas == [("1", "0s"), ("2", "0s"), ("3", "1m40s"), ("4", "0s")], caplog.text


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

"""The benchmark scripts: each name they import from this repository (``cab_jax``, ``benchmarks/common.py``,
``benchmarks/mamba_cuda/bench.py``), at any depth of a script (lazy imports inside functions included), must exist,
or the first sign of a rename is a lost device call; and each script that runs on a CPU is run from the repository
root at its smallest size, its printed tables checked (columns, row count, finite numbers). Not run here: what needs
a GPU, torch's CUDA or a mamba build (``mamba_cuda/``, ``cab_torch/``, ``scan_three_way.sh``), and
``input_bound.py`` (two trainings of a full-size config, one through ``cab_jax.main``: minutes on a CPU)."""

import ast
import importlib
import json
import math
import pathlib
import re
import subprocess
import sys

import pytest
from test_launch import shellcheck

ROOT = pathlib.Path(__file__).parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.rglob("*.py"))
LOCAL = {"common": BENCHMARKS, "bench": BENCHMARKS / "mamba_cuda"}  # modules the scripts import off sys.path


def repository_imports(path: pathlib.Path) -> list[tuple[str, str]]:
    """(module, name) for every ``from <repository module> import name`` in ``path``."""
    pairs = []
    for node in ast.walk(ast.parse(path.read_text())):
        local = isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
        if local and (node.module in LOCAL or node.module.split(".")[0] == "cab_jax"):
            pairs += [(node.module, alias.name) for alias in node.names]
    return pairs


@pytest.fixture
def bench_script(monkeypatch):
    """Imports a script of ``benchmarks/`` by module name, fresh (as the scripts import each other: from that
    folder)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))

    def load(module: str):
        monkeypatch.delitem(sys.modules, module, raising=False)
        return importlib.import_module(module)

    return load


def test_the_scripts_are_found():
    assert {"train_throughput.py", "step.py", "bench.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(BENCHMARKS)))
def test_every_name_a_benchmark_imports_from_the_repository_exists(script, monkeypatch):
    for module, name in repository_imports(script):
        if module in LOCAL:
            monkeypatch.syspath_prepend(str(LOCAL[module]))
            monkeypatch.delitem(sys.modules, module, raising=False)
        imported = importlib.import_module(module)
        submodule = hasattr(imported, "__path__") and importlib.util.find_spec(f"{module}.{name}")
        assert hasattr(imported, name) or submodule, (
            f"{script.name}: `from {module} import {name}`: {module} has no {name}")


def test_the_benchmark_shell_scripts_are_shellcheck_clean():
    scripts = sorted(BENCHMARKS.rglob("*.sh"))
    assert {p.name for p in scripts} >= {"build.sh", "compare.sh"}
    proc = subprocess.run([shellcheck(), *scripts], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_matmul_flops_counts_products_convolutions_and_every_scan_iteration(bench_script):
    import jax
    import jax.numpy as jnp

    matmul_flops = bench_script("common").matmul_flops

    w, x = jnp.ones((3, 8, 16)), jnp.ones((4, 8))
    layers = lambda w, x: jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi[:, :8]), None), x, w)[0]
    assert matmul_flops(layers, w, x) == 3 * 2 * 4 * 8 * 8
    images, kernel = jnp.ones((2, 3, 16, 16)), jnp.ones((5, 3, 4, 4))  # NCHW, OIHW; stride 4: 4 x 4 outputs
    patchify = lambda i, k: jax.lax.conv_general_dilated(i, k, (4, 4), "VALID")
    assert matmul_flops(patchify, images, kernel) == 2 * (2 * 5 * 4 * 4) * (3 * 4 * 4)
    assert matmul_flops(jax.jit(lambda a: a @ a.T), x) == 2 * 4 * 4 * 8  # inside a nested jit


def test_overrides_split_at_keys_so_a_value_may_hold_commas(bench_script):
    import ml_collections

    apply_overrides = bench_script("common").apply_overrides

    c = ml_collections.ConfigDict({"student": {"scan_blocks": "", "depth": 24, "remat": True}, "lr": 0.1,
                                   "steps": ml_collections.config_dict.placeholder(int),
                                   "train": {"xla_gpu_options": ""}})
    apply_overrides(c, "student.scan_blocks=2,32,1,1,4,student.depth=2,train.xla_gpu_options=xla_a=1,xla_b=X,Y,"
                       "student.remat=false,lr=0.5,steps=7")
    assert c.to_dict() == {"student": {"scan_blocks": "2,32,1,1,4", "depth": 2, "remat": False}, "lr": 0.5,
                           "steps": 7, "train": {"xla_gpu_options": "xla_a=1,xla_b=X,Y"}}
    with pytest.raises(ValueError, match=r"student\.remat='flase': expected True or False"):
        apply_overrides(c, "student.remat=flase")


def run_script(script: str, *flags: str) -> str:
    """The stdout of ``python benchmarks/<script> <flags>``, run from the repository root; it must exit 0."""
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Each Markdown table in ``text``, as its rows ({column: cell}, "\\|" read back as "|"); every row must be as
    wide as its header."""
    tables, lines = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            lines.append([c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]])
        elif lines:
            header, _, *rows = lines
            assert all(len(row) == len(header) for row in rows), f"cells do not match the header {header}: {rows}"
            tables.append([dict(zip(header, row, strict=True)) for row in rows])
            lines = []
    return tables


def number(cell: str) -> float:
    """A table cell as a number; NaN if it is none (an empty cell: nothing measured)."""
    try:
        return float(cell)
    except ValueError:
        return math.nan


def assert_numbers(rows: list[dict], positive: tuple[str, ...] = (), nonnegative: tuple[str, ...] = ()) -> None:
    """Each row's cells of ``positive`` are finite numbers > 0, those of ``nonnegative`` finite numbers >= 0 (values
    a tiny run rounds to 0)."""
    for row in rows:
        for column in (*positive, *nonnegative):
            value = number(row[column])
            assert math.isfinite(value) and (value > 0 if column in positive else value >= 0), (column, row)


TINY_VISION = "--set=teacher.depth=1,student.depth=2"  # configs/demo.py's models, a quarter as deep


def test_train_throughput_prints_a_row_of_rates_per_combination():
    out = run_script("train_throughput.py", TINY_VISION, "--configs=demo", "--dtypes=float32", "--remat=true",
                     "--batch_size=2", "--steps=3")
    [rows] = markdown_tables(out)
    assert [(r["config"], r["dtype"], r["remat"], r["batch"], r["error"]) for r in rows] == [
        ("demo", "float32", "True", "2", "")], rows
    assert_numbers(rows, positive=("images_per_s", "ms_per_step", "xla_step_gib", "loss"),
                   nonnegative=("peak_gib", "compile_s", "model_gflop", "matmul_tflops", "mfu"))


def test_memory_estimate_prints_the_estimate_beside_xla():
    out = run_script("memory_estimate.py", TINY_VISION, "--configs=demo", "--batch_size=16")
    [rows] = markdown_tables(out)
    assert [(r["config"], r["remat"], r["batch"]) for r in rows] == [("demo", "True", "16")] and "error" not in rows[0]
    assert_numbers(rows, positive=("estimate GiB", "of which activations", "xla GiB"), nonnegative=("peak GiB",))


def test_memory_estimate_measures_each_combination_of_its_lists_once(bench_script, monkeypatch, capsys):
    """README's H200 command, `memory_estimate.py --configs=vim_tiny,vim_small --dtypes=float32,bfloat16
    --remat=true,false --batch_size=128`, gives one row per config, dtype and remat: eight measurements, each with
    arguments ``measure`` takes, in the table's order (the measurement itself, one process per row, is run above for
    one row; here the processes are replaced by a row of their arguments)."""
    import inspect

    script = bench_script("memory_estimate")
    fields = {"config_name": "config", "dtype": "dtype", "remat": "remat", "batch_size": "batch"}

    def run_each(path, jobs, error_row):
        jobs = list(jobs)
        for job in jobs:
            inspect.signature(script.measure).bind(**job)
        return [{column: job[name] for name, column in fields.items()} for job in jobs]

    monkeypatch.setattr(script, "run_each", run_each)
    monkeypatch.setattr(sys, "argv", ["memory_estimate.py", "--configs=vim_tiny,vim_small",
                                      "--dtypes=float32,bfloat16", "--remat=true,false", "--batch_size=128"])
    script.main()
    [rows] = markdown_tables(capsys.readouterr().out)
    assert [(r["config"], r["dtype"], r["remat"], r["batch"]) for r in rows] == [
        (config, dtype, remat, "128") for config in ("vim_tiny", "vim_small") for dtype in ("float32", "bfloat16")
        for remat in ("True", "False")]


def test_step_profile_splits_the_step_by_scope(tmp_path):
    out = run_script("step_profile.py", TINY_VISION, "--config=demo", "--dtype=float32", "--remat=true",
                     "--batch_size=2", "--steps=2", "--profile_steps=1", "--top=3", f"--out={tmp_path / 'p.json'}")
    parts, slowest, *gaps = markdown_tables(out)
    result = json.loads((tmp_path / "p.json").read_text())
    assert len(gaps) == int(bool(result["idle_gaps"])) and all(len(g) == len(result["idle_gaps"]) for g in gaps)
    assert result["ms_per_step"] > 0 and result["images_per_s"] > 0 and result["device_busy_ms"] > 0, result
    names = [r["part"] for r in parts]
    assert names == [p["part"] for p in result["parts"]] and names[-1] == "host and idle", names
    assert {"selective_scan", "teacher", "optimizer"} <= set(names), names
    assert_numbers(parts[:-1], positive=("ms",), nonnegative=("forward ms", "backward ms", "% of step"))
    assert len(slowest) == 3 and {r["pass"] for r in slowest} <= {"forward", "backward"}, slowest
    assert_numbers(slowest, positive=("ms",))


def test_idle_gaps_are_summed_by_the_ops_around_them(bench_script):
    script = bench_script("step_profile")
    event = lambda op, ts, dur, tid=0: {"ts": ts, "dur": dur, "tid": tid, "args": {"hlo_op": op}}
    events = [event("a", 0, 10), event("b", 5, 7, tid=1), event("c", 20, 5), event("d", 25, 5), event("e", 40, 1),
              event("c", 50, 5), event("f", 1, 2)]  # f lies inside a; c follows e after a gap, as after b
    assert script.idle_gaps(events) == {("b", "c"): 8, ("d", "e"): 10, ("e", "c"): 9}


def test_device_events_without_an_hlo_op_count_inside_the_step(bench_script):
    """A library's own kernels (cuBLAS's, a memset) on a device stream carry no HLO op: those between the step's
    first and last op count as busy time under "no hlo op"; the module's span line and the host do not."""
    script = bench_script("step_profile")
    meta = lambda kind, pid, name, tid=None: {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}
    op = lambda name, ts, dur, tid=1, pid=1, module="jit_train_step": {
        "ph": "X", "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur,
        "args": {"hlo_op": name, "hlo_module": module}}
    bare = lambda name, ts, dur, tid=1, pid=1: {"ph": "X", "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur}
    trace = {"traceEvents": [
        meta("process_name", 1, "/device:GPU:0"), meta("process_name", 2, "/host:CPU"),
        meta("thread_name", 1, "Stream #7(Compute)", tid=1), meta("thread_name", 1, "XLA Modules", tid=2),
        op("custom-call.1", 10, 5), bare("sm90_gemm_splitk_reduce", 15, 3), op("fusion.2", 20, 4),
        bare("jit_train_step(1)", 10, 14, tid=2), bare("before_the_step", 0, 5), bare("after_the_step", 30, 5),
        bare("host_work", 12, 2, pid=2), op("other_module_op", 16, 1, module="jit_eval")]}
    events = script.device_events(trace, "train_step")
    assert sorted(e["args"]["hlo_op"] for e in events) == [
        "custom-call.1", "fusion.2", script.UNNAMED + "sm90_gemm_splitk_reduce"]
    assert script.busy_us(events) == 12 and script.idle_gaps(events) == {(script.UNNAMED + "sm90_gemm_splitk_reduce",
                                                                          "fusion.2"): 2}
    assert script.part_of_op(script.UNNAMED + "x", {}) == ("no hlo op", False)


def test_a_fusion_without_metadata_takes_the_scope_of_its_computation(bench_script):
    """XLA's own fusions (the padded copy before a split-K matmul) carry no op_name; the ops inside them do."""
    script = bench_script("step_profile")
    hlo = """%fused_pad.1 (param_0: bf16[4,3,8]) -> bf16[16,8] {
  %param_0 = bf16[4,3,8]{2,1,0} parameter(0), metadata={scheduling_name="param_0"}
  %bitcast.1 = bf16[12,8]{1,0} bitcast(%param_0), metadata={op_name="jit(step)/transpose(jvp(x_proj))/dot_general"}
  ROOT %pad.1 = bf16[16,8]{1,0} pad(%bitcast.1, %constant.1), padding=0_4x0_0
}

ENTRY %main.2 (p: bf16[4,3,8]) -> bf16[16,8] {
  %p = bf16[4,3,8]{2,1,0} parameter(0)
  %mul.3 = bf16[4,3,8]{2,1,0} multiply(%p, %p), metadata={op_name="jit(step)/conv1d/mul"}
  ROOT %loop_pad_fusion.1 = bf16[16,8]{1,0} fusion(%mul.3), kind=kLoop, calls=%fused_pad.1, metadata={a="x"}
}
"""
    scopes = script.op_scopes(hlo)
    assert scopes["loop_pad_fusion.1"] == "jit(step)/transpose(jvp(x_proj))/dot_general"
    assert scopes["mul.3"] == "jit(step)/conv1d/mul" and "p" not in scopes
    assert script.part_of(scopes["loop_pad_fusion.1"]) == ("x_proj", True)


def test_loss_trajectory_summarises_saves_and_plots_the_run(tmp_path):
    out = run_script("loss_trajectory.py", TINY_VISION, "--config=demo", "--dtypes=float32", "--batch_size=2",
                     "--steps=3", "--batches=1", f"--out={tmp_path / 'traj.json'}", f"--plot={tmp_path / 'traj.png'}")
    [rows] = markdown_tables(out)
    [run] = json.loads((tmp_path / "traj.json").read_text())
    assert {len(v) for v in run["metrics"].values()} == {3} and "loss" in run["metrics"], run
    assert [r["metric"] for r in rows] == list(run["metrics"]) and {r["run"] for r in rows} == {"float32 auto"}
    assert list(rows[0]) == ["metric", "run", "step 1", "step 3", "max rel. deviation"], rows[0]
    assert {r["max rel. deviation"] for r in rows} == {"0.00%"}  # one run: its own baseline
    assert_numbers([r for r in rows if r["metric"] == "loss"], positive=("step 1", "step 3"))
    assert (tmp_path / "traj.png").stat().st_size > 0


def test_loss_trajectory_compares_runs_saved_apart(tmp_path, bench_script):
    """`--replot=a.json,b.json` summarises runs of separate invocations (one GPU against two) against the first
    file's first run, each named by its file."""
    script = bench_script("loss_trajectory")
    run = lambda loss: {"run": "float32 auto", "config": "demo", "batch": 2, "device": "cpu", "jax": "0",
                        "metrics": {"loss": loss}}
    (tmp_path / "one.json").write_text(json.dumps([run([1.0, 0.5])]))
    (tmp_path / "two.json").write_text(json.dumps([run([1.0, 0.5]), run([1.01, 0.49])]))
    runs = script.saved_runs([str(tmp_path / "one.json"), str(tmp_path / "two.json")])
    assert [r["run"] for r in runs] == ["one: float32 auto", "two: float32 auto", "two: float32 auto"]
    assert [r["max rel. deviation"] for r in script.summary_rows(runs, [1, 2])] == ["0.00%", "0.00%", "2.00%"]
    assert script.saved_runs([str(tmp_path / "one.json")])[0]["run"] == "float32 auto"


TINY_LM = ("teacher.vocab_size=256,student.vocab_size=256,data.vocab_size=256,teacher.hidden_size=32,"
           "student.d_model=32,teacher.depth=1,student.depth=1,teacher.num_heads=2,student.n_qk_heads=2,"
           "student.n_v_heads=2,student.d_state=16,teacher.intermediate_size=64,student.intermediate_size=64,"
           "student.chunk_size=8")


@pytest.mark.slow
def test_lm_throughput_prints_train_and_generation_rates():
    out = run_script("lm_throughput.py", "--lengths=16", "--modes=cab", "--tokens_per_step=32", "--steps=1",
                     "--gen_batch=1", "--new_tokens=4", "--dtype=float32", f"--set={TINY_LM}")
    [rows] = markdown_tables(out)
    assert [(r["part"], r["mode"], r["length"], r["error"]) for r in rows] == [
        ("train", "cab", "16", ""), ("generate", "student", "16", ""), ("generate", "teacher", "16", "")], rows
    assert_numbers(rows, positive=("tokens_per_s", "ms_per_step"), nonnegative=("peak_gib", "compile_s"))
    assert_numbers(rows[:1], positive=("loss",))
    assert_numbers(rows[1:], nonnegative=("cache_mib",))


def test_selective_scan_times_and_checks_each_implementation(tmp_path):
    impls = ["associative", "reference", "pallas"]  # pallas: the GPU kernel, interpreted on a CPU
    out = run_script("selective_scan.py", "--shapes=tiny", f"--impls={','.join(impls)}", "--iters=2", "--check",
                     "--rounds=3", f"--lock={tmp_path / 'lock'}")
    [rows] = markdown_tables(out)
    json_rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["impl"] for r in rows] == [r["impl"] for r in json_rows] == impls and "error" not in rows[0], rows
    assert_numbers(rows, positive=("fwd ms", "fwd+bwd ms", "fwd / associative", "fwd+bwd / associative"), nonnegative=(
        "fwd compile s", "fwd+bwd compile s", "fwd+bwd temp MiB", "fwd GB/s", "fwd+bwd GB/s"))
    assert json_rows[0]["fwd / associative"] == json_rows[0]["fwd+bwd / associative"] == 1.0, json_rows[0]
    assert all(r["max |y - ref| / max |ref|"] < 1e-5 and r["max grad error"] < 1e-5 for r in json_rows), json_rows


def test_ssd_times_and_checks_each_implementation():
    out = run_script("ssd.py", "--lengths=32", "--impls=reference,chunked", "--batch=1", "--heads=2", "--head_dim=4",
                     "--groups=2", "--d_state=4", "--chunk_size=8", "--dtype=float32", "--iters=2", "--check")
    [rows] = markdown_tables(out)
    assert [(r["length"], r["impl"]) for r in rows] == [("32", "reference"), ("32", "chunked")], rows
    assert_numbers(rows, positive=("fwd ms", "fwd+bwd ms"))
    assert all(float(r["max |y - ref| / max |ref|"]) < 1e-5 for r in rows), rows


def test_input_pipeline_writes_the_data_then_times_stages_and_workers(tmp_path):
    out = run_script("input_pipeline.py", f"--data_dir={tmp_path}", "--train_per_class=1", "--scale=0.05",
                     "--workers=0,1", "--batch_size=2", "--batches=1", "--stage_images=2")
    assert "wrote the fake ImageNet" in out
    stages, workers = markdown_tables(out)
    assert list(stages[0]) == ["read record", "decode", "crop + resize (bicubic)", "flip", "RandAugment",
                               "normalise", "random erasing"] and len(stages) == 1, stages
    assert_numbers(stages, positive=("read record", "decode", "crop + resize (bicubic)", "RandAugment"),
                   nonnegative=("flip", "normalise", "random erasing"))
    assert [r["workers"] for r in workers] == ["0", "1"], workers
    assert_numbers(workers, positive=("images/s",))


@pytest.mark.slow
def test_multi_gpu_on_two_cpu_devices_gives_one_devices_losses_and_resumes_two_processes(tmp_path):
    """Its equal part (the synthetic step, one device against mesh.fsdp=2) and its processes part (the entry point
    on configs/demo.py's digits, two SLURM-style processes with a data worker each, stopped by SIGTERM to their
    process groups after a step and started again)."""
    steps = 4
    out = run_script("multi_gpu.py", f"--out={tmp_path}", "--cpu", "--config=demo", "--parts=equal,processes",
                     "--meshes=mesh.fsdp=2", f"--steps={steps}", "--batch_size=4", f"{TINY_VISION},data.num_workers=1")
    equal, processes = markdown_tables(out)
    assert [(r["run"], r["devices"], r["kernel"], r["error"]) for r in equal] == [
        ("1 device", "1", "associative", ""), ("mesh.fsdp=2", "2", "associative", "")], equal
    one, stopped = processes
    assert (one["exit"], stopped["exit"], stopped["stopped_exit"]) == ("0", "0,0", "75,75"), processes
    assert 0 < int(stopped["resumed_at"]) == int(stopped["stopped_after"]) < steps, stopped
    assert json.loads(stopped["checkpoints"]) == [int(stopped["resumed_at"]), steps], stopped  # one entry a step
    saved = json.loads((tmp_path / "multi_gpu.json").read_text())
    for rows in (saved["equal"], saved["processes"]):
        assert len(rows[1]["losses"]) == len(rows[0]["losses"]) == steps, rows
        assert all(math.isfinite(x) for x in rows[0]["losses"]) and float(rows[1]["max_rel_dev"]) < 1e-4, rows
    assert (tmp_path / "multi_gpu.md").read_text().strip() in out
    logs = sorted((tmp_path / "logs").glob("2 processes*.log"))
    assert len(logs) == 2, logs
    for log in logs:  # the data workers outlived the signal, cleanly
        assert not re.search("terminated unexpectedly|leaked", log.read_text()), log.read_text()[-3000:]


def test_multi_gpu_scales_the_batch_with_the_devices_and_halves_nothing_it_should_not(bench_script, monkeypatch,
                                                                                     capsys, tmp_path):
    """The scaling and fsdp parts hand train_throughput.py and lm_throughput.py jobs their ``measure`` takes, two
    devices get twice the batch and the mesh override, and the efficiency is two devices' rate over twice one's (the
    processes replaced by rows of their arguments)."""
    import inspect

    script = bench_script("multi_gpu")
    measures = {name: bench_script(name) for name in ("train_throughput", "lm_throughput")}
    calls = []

    def run_one(path, job, error_row, env, timeout):
        measure = measures[pathlib.Path(path).stem]
        if "kind" in job:
            inspect.signature(measure.measure_train).bind(**{k: v for k, v in job.items() if k != "kind"})
        else:
            inspect.signature(measure.measure).bind(**job)
        devices = len(env["CUDA_VISIBLE_DEVICES"].split(","))
        calls.append((pathlib.Path(path).stem, devices, job.get("batch_size"), job["overrides"]))
        return {"dtype": job.get("dtype"), "images_per_s": 100.0 * devices ** 0.5, "state_gib": 1.0 / devices}

    monkeypatch.setattr(script, "run_one", run_one)
    monkeypatch.setattr(sys, "argv", ["multi_gpu.py", f"--out={tmp_path}", "--parts=scaling,fsdp", "--dtypes=bfloat16"])
    script.main()
    assert calls == [("train_throughput", 1, 128, ""), ("train_throughput", 2, 256, "mesh.data=2"),
                     ("lm_throughput", 1, None, "mesh.fsdp=1"), ("lm_throughput", 2, None, "mesh.fsdp=2")]
    scaling, fsdp = markdown_tables(capsys.readouterr().out)
    assert [r["efficiency"] for r in scaling] == ["", str(round(2**0.5 / 2, 3))], scaling
    assert [(r["state_gib"], r["state / 1 device"]) for r in fsdp] == [("1.0", ""), ("0.5", "0.5")], fsdp


def test_multi_gpu_names_an_unknown_part_or_mesh():
    for flag, valid in (("--parts=equal,bogus", "equal, main, processes, scaling, fsdp"),
                        ("--meshes=mesh.data=3", "mesh.data=2, mesh.fsdp=2, mesh.tensor=2")):
        proc = subprocess.run([sys.executable, "benchmarks/multi_gpu.py", "--out=unused", flag], cwd=ROOT,
                              capture_output=True, text=True)
        assert proc.returncode == 2 and f"valid choices are {valid}" in proc.stderr, proc.stderr


def test_step_ab_times_variants_in_turn_against_the_first():
    out = run_script("step_ab.py", "--config=demo", "--batch_size=4", "--steps=1", "--rounds=2", TINY_VISION,
                     "--variant=base:", "--variant=bf16:dtype=bfloat16",
                     "--variant=xla:train.xla_gpu_options=xla_gpu_enable_dynamic_slice_fusion=true,"
                     "xla_gpu_dot_merger_threshold_mb=0", "--variant=bad:student.depth=two")
    [rows] = markdown_tables(out)
    assert [r["variant"] for r in rows] == ["base", "bf16", "xla", "bad"] and rows[0]["/ base"] == "1.0", rows
    assert "student.depth='two': expected a int" in rows.pop()["error"]  # the others still ran
    assert_numbers(rows, positive=("ms_per_step", "images_per_s", "/ base", "compile_s", "loss"))
    assert rows[0]["loss"] == rows[2]["loss"] != rows[1]["loss"], rows  # XLA options alone change no number
    assert rows[0]["program"] == rows[2]["program"] != rows[1]["program"], rows  # and on a CPU not the program
    assert "xla: train.xla_gpu_options=xla_gpu_enable_dynamic_slice_fusion=true,xla_gpu_dot_merger" in out
    proc = subprocess.run([sys.executable, "benchmarks/step_ab.py", "--variant=a:", "--variant=a:dtype=bfloat16"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "at least two, with different names" in proc.stderr, proc.stderr

"""The study runner's grid, tables and plot, with a stand-in for training (what one training run does is tested
in test_train.py, and a real study end to end in test_cli.py)."""

import itertools
import json
import pathlib

import numpy as np
import pytest
import test_config

from cab_jax import study, train

DEMO = pathlib.Path(__file__).parents[1] / "configs" / "demo.py"


def fake_top1(mode: str, fraction: float, seed: int) -> float:
    return {"vanilla": 10.0, "soft": 20.0, "cab": 30.0}[mode] + 100 * fraction + seed


@pytest.fixture
def trained(monkeypatch):
    """Replaces training: records each run's config and workdir, and gives a top-1 made of its mode, fraction and
    seed."""
    runs = []

    def train_and_evaluate(c, workdir):
        runs.append((c, workdir))
        if c.task == "train_teacher":
            return train.RunResult({"top1": 99.0, "top5": 100.0}, 5, 1.0, 360)
        top1 = fake_top1(c.loss.mode, c.data.subset_fraction, c.seed)
        return train.RunResult({"top1": top1, "top5": 100.0}, 3, 1.0, 12)

    monkeypatch.setattr(train, "train_and_evaluate", train_and_evaluate)
    return runs


def test_the_teacher_trains_once_and_each_cell_of_the_grid_once(tmp_path, trained):
    c = test_config.load(DEMO, "--config.study.fractions=(0.05, 0.2)", "--config.study.seeds=(0, 1, 2)",
                         "--config.study.modes=('soft', 'cab')")
    rows, finished = study.run(c, str(tmp_path))
    assert finished
    assert [r.task for r, _ in trained] == ["train_teacher"] + ["distill"] * 12
    cells = [(r.data.subset_fraction, r.loss.mode, r.seed) for r, _ in trained[1:]]
    assert cells == [(f, m, s) for f in (0.05, 0.2) for m in ("soft", "cab") for s in (0, 1, 2)]
    assert all(r.teacher.init_from == str(tmp_path / "teacher") for r, _ in trained[1:])
    assert len({w for _, w in trained}) == 13  # every run has its own workdir
    assert trained[1][1] == str(tmp_path / "students" / "soft" / "fraction0.05_seed0")
    assert [r["top-1"] for r in rows[1:]] == [fake_top1(m, f, s) for f, m, s in cells]
    # README: the table of runs goes to WORKDIR/results.md and results.json, one row per run, the teacher first
    table = (tmp_path / "results.md").read_text().splitlines()
    assert len(table) == 2 + 13 and all(str(fake_top1(m, f, s)) in line for (f, m, s), line in zip(cells, table[3:],
                                                                                                    strict=True))
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(rows))


def test_the_summary_gives_mean_std_and_every_seed_and_the_plot_is_a_png(tmp_path, trained):
    c = test_config.load(DEMO, "--config.study.fractions=(0.05, 0.2)", "--config.study.seeds=(0, 1, 2)",
                         "--config.study.modes=('vanilla', 'cab')")
    study.run(c, str(tmp_path))
    cells = json.loads((tmp_path / "study.json").read_text())
    assert [(x["fraction"], x["mode"]) for x in cells] == [(0.05, "vanilla"), (0.05, "cab"), (0.2, "vanilla"),
                                                          (0.2, "cab")]
    for cell in cells:
        want = [fake_top1(cell["mode"], cell["fraction"], s) for s in (0, 1, 2)]
        assert cell["seeds"] == [0, 1, 2] and cell["per seed"] == want and cell["metric"] == "top-1"
        assert cell["mean"] == pytest.approx(np.mean(want), abs=1e-3)
        assert cell["std"] == pytest.approx(np.std(want, ddof=1), abs=1e-3)
    table = (tmp_path / "study.md").read_text()
    assert table.startswith("| fraction | mode | variant | bridge params | metric | mean | std |")
    assert table.count("\n") == 6
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plot_draws_the_metric_against_the_fraction_one_line_per_mode_with_error_bars(tmp_path, monkeypatch):
    """README: study.png draws top-1 against the fraction (log scale), one line per mode, standard deviations as
    error bars."""
    pytest.importorskip("matplotlib")
    from cab_jax import plots

    drawn = []
    monkeypatch.setattr(plots, "save_png", lambda fig, path: drawn.append(fig))
    cells = [{"fraction": f, "mode": m, "metric": "top-1", "mean": mean, "std": std}
             for f, m, mean, std in [(0.05, "soft", 60.0, 1.0), (0.05, "cab", 62.0, 2.0), (0.2, "soft", 70.0, 0.5),
                                     (0.2, "cab", 75.0, 1.5)]]
    assert study.plot(cells, tmp_path / "study.png")
    (ax,) = drawn[0].axes
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "top-1 (%)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["soft", "cab"]
    for container, (mean, std) in zip(ax.containers, [((60, 70), (1.0, 0.5)), ((62, 75), (2.0, 1.5))], strict=True):
        line, _, (bars,) = container
        np.testing.assert_allclose(np.asarray(line.get_xdata(), float), [5.0, 20.0])
        np.testing.assert_allclose(np.asarray(line.get_ydata(), float), mean)
        heights = [segment[1, 1] - segment[0, 1] for segment in bars.get_segments()]
        np.testing.assert_allclose(heights, 2 * np.asarray(std))


def test_each_row_says_whether_this_run_trained_resumed_or_reused_it(tmp_path, monkeypatch):
    """README: "this run" says trained / resumed / reused: a run restored from an earlier checkpoint before its last
    step says where it resumed, one restored at its last step was reused."""
    def train_and_evaluate(c, workdir):
        resumed_at = {"train_teacher": 5, "soft": None, "cab": 2}[c.loss.mode if c.task == "distill" else c.task]
        return train.RunResult({"top1": 50.0, "top5": 90.0}, 5 if c.task == "train_teacher" else 3, 1.0, 12,
                               resumed_at=resumed_at)

    monkeypatch.setattr(train, "train_and_evaluate", train_and_evaluate)
    c = test_config.load(DEMO, "--config.study.fractions=(0.05,)", "--config.study.seeds=(0,)",
                         "--config.study.modes=('soft', 'cab')")
    rows, _ = study.run(c, str(tmp_path))
    assert [r["this run"] for r in rows] == ["reused", "trained", "resumed at step 2"]
    assert "resumed at step 2" in (tmp_path / "results.md").read_text()


def mlp_bridge_params(hidden_layers, d_in=8, width=64, d_out=64, maps=4 * 8):
    """The demo's bridge: 8 student layers, each with 4 maps (B, B_b -> K; C, C_b -> Q), biases included."""
    sizes = [d_in] + [width] * hidden_layers + [d_out]
    return maps * sum(a * b + b for a, b in itertools.pairwise(sizes))


def test_variants_are_tried_with_the_bridged_modes_and_reported_with_their_bridge_size(tmp_path, trained):
    c = test_config.load(DEMO, "--config.study.modes=('soft', 'cab')", "--config.study.seeds=(0, 1)",
                         "--config.study.variants=('linear: bridge.kind=linear', "
                         "'mlp2: bridge.hidden_layers=2; bridge.kernel_map=relu')")
    rows, _ = study.run(c, str(tmp_path))
    students = [(r.loss.mode, r.bridge.kind, r.bridge.hidden_layers, r.bridge.kernel_map, r.seed)
                for r, _ in trained[1:]]
    assert students == [("soft", "mlp", 1, "softmax", 0), ("soft", "mlp", 1, "softmax", 1),
                        ("cab", "linear", 1, "softmax", 0), ("cab", "linear", 1, "softmax", 1),
                        ("cab", "mlp", 2, "relu", 0), ("cab", "mlp", 2, "relu", 1)]
    assert trained[3][1] == str(tmp_path / "students" / "cab" / "linear" / "fraction0.03_seed0")
    assert trained[1][1] == str(tmp_path / "students" / "soft" / "fraction0.03_seed0")
    cells = json.loads((tmp_path / "study.json").read_text())
    assert [(x["mode"], x["variant"], x["bridge params"]) for x in cells] == [
        ("soft", "-", 0), ("cab", "linear", mlp_bridge_params(0)), ("cab", "mlp2", mlp_bridge_params(2))]
    assert rows[0]["bridge params"] == 0 and study.bridge_params(c) == mlp_bridge_params(1)


@pytest.mark.parametrize("entry", ["no colon here", "x: bridge.nonexistent=1", "y: bridge.hidden_layers=0",
                                   "z: loss.mode", "w: loss.mode=soft", "v: teacher.depth=8", "../up: seed=1",
                                   "u: seed.y=1"])
def test_a_bad_variant_fails_before_anything_trains(tmp_path, trained, entry):
    c = test_config.load(DEMO, f"--config.study.variants=('{entry}',)")
    with pytest.raises(ValueError, match=r"variants|hidden_layers"):
        study.run(c, str(tmp_path))
    assert trained == []


def test_variants_no_mode_would_try_are_refused(tmp_path, trained):
    c = test_config.load(DEMO, "--config.study.modes=('soft',)", "--config.study.variants=('lin: bridge.kind=linear',)")
    with pytest.raises(ValueError, match="variant_modes"):
        study.run(c, str(tmp_path))


def test_without_a_grid_the_study_is_the_config_s_one_fraction_and_seed(tmp_path, trained):
    c = test_config.load(DEMO, "--config.seed=7")
    study.run(c, str(tmp_path))
    assert [(r.data.subset_fraction, r.loss.mode, r.seed) for r, _ in trained[1:]] == [
        (c.data.subset_fraction, m, 7) for m in ("vanilla", "soft", "cab")]
    cells = json.loads((tmp_path / "study.json").read_text())
    assert [x["std"] for x in cells] == [0.0] * 3


def test_without_matplotlib_there_is_no_plot_and_a_line_says_how_to_get_it(tmp_path, plot_warnings_without_matplotlib,
                                                                          trained):
    """README: without matplotlib the study says so (``pip install -e '.[plot]'``) and writes the rest."""
    cells = [{"fraction": 0.1, "mode": "cab", "metric": "top-1", "mean": 1.0, "std": 0.0}]
    from etils import epath

    assert not study.plot(cells, epath.Path(tmp_path) / "study.png")
    assert not (tmp_path / "study.png").exists() and "cab-jax[plot]" in plot_warnings_without_matplotlib[0]
    c = test_config.load(DEMO, "--config.study.fractions=(0.05, 0.2)", "--config.study.seeds=(0, 1)",
                         "--config.study.modes=('soft', 'cab')")
    (tmp_path / "run").mkdir()
    _, finished = study.run(c, str(tmp_path / "run"))
    assert finished and not (tmp_path / "run" / "study.png").exists()
    assert len(json.loads((tmp_path / "run" / "study.json").read_text())) == 4
    assert all((tmp_path / "run" / name).stat().st_size > 0 for name in ("study.md", "results.md", "results.json"))


@pytest.mark.parametrize("preset", [False, True])
def test_a_study_caches_its_compiled_programs_in_its_workdir_unless_a_cache_is_set(tmp_path, preset):
    """Every seed of a cell compiles the same programs: the study keeps JAX's persistent cache in the workdir, but
    leaves a cache the user set alone."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    if preset:
        env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "users_cache")
    script = ("import jax, jax.numpy as jnp; from etils import epath; from cab_jax import study; "
              f"study._cache_compiled_programs(epath.Path({str(tmp_path)!r})); "
              "jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          cwd=pathlib.Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    ours, users = tmp_path / "jax_cache", tmp_path / "users_cache"
    assert (not ours.exists() and any(users.iterdir())) if preset else any(ours.iterdir())

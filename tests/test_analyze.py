"""The analyses of trained runs: a Vim student's implicit attention per layer against a brute-force probe of its
scans, the teacher's token order, the similarity measures, and both commands end to end on saved runs."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import test_lm_train
import test_train
from flax import nnx
from test_bridge import all_eqns

from cab_jax import analyze, checkpoint, domains, train
from cab_jax.bridge import move_cls_token
from cab_jax.kernels.selective_scan.reference import selective_scan_reference
from cab_jax.kernels.ssd.implicit_attention import implicit_attention as ssd_implicit_attention
from cab_jax.kernels.ssd.reference import ssd_reference
from cab_jax.models import registry
from cab_jax.models.layers import attention_weights


def probed(mixer, hidden):
    """(batch, t, s): what the mixer's scans (the reference, one direction after the other) give at t for a unit
    input at s on every channel, with delta, B and C those of ``hidden``: the brute-force implicit attention."""
    x, _ = jnp.split(mixer.in_proj(hidden), 2, axis=-1)
    batch, length, d_inner = x.shape
    total = 0.0
    for direction, reverse in ((mixer.fwd, False), (mixer.bwd, True)):
        d = direction.scan_inputs(x, reverse=reverse)
        columns = []
        for s in range(length):
            u = jnp.zeros((batch, length, d_inner)).at[:, s, :].set(1.0)
            y = selective_scan_reference(u, d.delta, d.A, d.B, d.C, delta_bias=d.delta_bias, delta_softplus=True,
                                         reverse=reverse)
            columns.append(y.mean(-1))
        total = total + jnp.stack(columns, axis=-1)
    return total


def tiny_vim():
    """3 layers, 8 x 8 images in 4 patches + the cls token (5 tokens)."""
    return registry.build("vim", num_classes=3, img_size=8, patch_size=4, embed_dim=8, depth=3, d_state=3,
                          scan_impl="associative", rngs=nnx.Rngs(0))


def tiny_phi_mamba():
    """2 layers, vocabulary 32."""
    return registry.build("phi_mamba", vocab_size=32, d_model=16, depth=2, intermediate_size=32, d_state=4,
                          n_qk_heads=2, n_v_heads=4, rngs=nnx.Rngs(0))


def test_each_vim_layers_implicit_attention_is_what_its_scans_do_to_a_probe():
    vim = tiny_vim()
    images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    got = vim.implicit_attention(images)
    assert got.shape == (3, 2, 5, 5)  # layers, images, tokens (4 patches and the cls token)
    graphdef, stacked = nnx.split(vim.layers)
    hidden, residual = vim.embed(images), jnp.zeros((2, 5, 8))
    for i in range(3):
        block = nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], stacked))
        normed, residual = block.mixer_input(hidden, residual, 0.0, None)
        np.testing.assert_allclose(got[i], probed(block.mixer, normed), rtol=1e-4, atol=1e-6, err_msg=f"layer {i}")
        hidden, _ = block.mixer(normed)


def test_the_teachers_cls_token_moves_to_the_students_middle_position():
    maps = np.arange(16).reshape(4, 4)  # teacher tokens: cls, p0, p1, p2
    got = np.asarray(move_cls_token(maps[None], cls_position=1, axes=(-2, -1)))[0]  # student: p0, cls, p1, p2
    order = [1, 0, 2, 3]
    assert got.tolist() == [[maps[a, b] for b in order] for a in order]


def test_similarity_measures():
    a = np.random.default_rng(0).normal(size=(5, 5))
    assert analyze.similarity(a, 3 * a) == pytest.approx({"cosine": 1.0, "spearman": 1.0})
    assert analyze.similarity(a, -a)["cosine"] == pytest.approx(-1.0)
    b = np.random.default_rng(1).normal(size=(5, 5))
    got = analyze.similarity(a, np.exp(b))  # ranks ignore a monotone map, the cosine does not
    assert got["spearman"] == pytest.approx(scipy.stats.spearmanr(a.ravel(), b.ravel()).statistic)
    assert got["cosine"] == pytest.approx(a.ravel() @ np.exp(b).ravel() / np.linalg.norm(a) / np.linalg.norm(np.exp(b)))


def save_runs(root, config):
    """A random teacher and two random student "runs" (cab, vanilla) of ``config(root, mode)``, with metrics."""
    runs = {}
    for seed, mode in enumerate(("cab", "vanilla")):
        c = config(root, mode=mode)
        domain = domains.for_config(c)
        if not runs:
            domain.data.prepare(c.data)
            teacher = nnx.state(domain.build_teacher(nnx.Rngs(0))).to_pure_dict()
            checkpoint.save_model_params(root / "teacher", teacher)
        c.teacher.init_from = str(root / "teacher")
        run = root / mode
        checkpoint.save_model_params(run, nnx.state(domain.build_student(nnx.Rngs(seed + 1))).to_pure_dict())
        train.save_run_config(run, c, "student")
        steps = [{"step": s, "split": "train", "loss": 1.0 / s, "kl": 0.5 / s, "lr": 1e-3} for s in (1, 2, 3)]
        steps.append({"step": 3, "split": "eval", "top1": 40.0 + seed})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
        runs[mode] = run
    return runs


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory):
    """Vision runs of the test model on the embedded digits."""
    return save_runs(tmp_path_factory.mktemp("runs"), test_train.small_config)


def analyze_command(*args):
    proc = subprocess.run([sys.executable, "-m", "cab_jax.analyze", *args], cwd=test_train.ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_attention_command_writes_numbers_and_figures(saved_runs, tmp_path):
    cab, vanilla = str(saved_runs["cab"]), str(saved_runs["vanilla"])
    analyze_command("attention", f"--workdir={cab}", f"--compare={vanilla},{cab}", "--num_examples=12",
                    "--batch_size=8", f"--out={tmp_path}")
    report = json.loads((tmp_path / "attention.json").read_text())
    assert [r["mode"] for r in report] == ["cab", "vanilla", "cab"] and all(r["examples"] == 12 for r in report)
    # the test student's 4 layers <- the teacher's 2, proportionally
    assert [(r["student_layer"], r["teacher_layer"]) for r in report[0]["layers"]] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert report[0]["layers"] == report[2]["layers"]  # the same run twice: the same numbers
    assert report[0]["layers"] != report[1]["layers"]
    for r in report[0]["layers"] + report[1]["layers"]:
        assert -1 <= r["cosine"] <= 1 and -1 <= r["spearman"] <= 1
    assert (tmp_path / "attention_similarity.png").stat().st_size > 0
    assert (tmp_path / "attention_maps.png").stat().st_size > 0


def test_the_attention_of_language_students_is_compared_with_the_causal_teachers(tmp_path):
    runs = save_runs(tmp_path, test_lm_train.tiny_config)  # 2 + 2 layers, synthetic tokens
    report = analyze.attention_report([str(runs["cab"]), str(runs["vanilla"])], num_examples=6, batch=4)
    assert [r["mode"] for r in report] == ["cab", "vanilla"] and report[0]["examples"] == 6
    assert [(r["student_layer"], r["teacher_layer"]) for r in report[0]["layers"]] == [(0, 0), (1, 1)]
    teacher, student = report[0]["maps"]["teacher"], report[0]["maps"]["student"]
    length = test_lm_train.SEQ
    assert teacher.shape == student.shape == (2, length, length)
    assert np.allclose(np.triu(teacher, 1), 0) and np.allclose(np.triu(student, 1), 0)  # both causal
    assert np.allclose(teacher.sum(-1), 1)  # softmax rows


def test_curves_are_each_runs_metrics_by_step(saved_runs, tmp_path):
    cab, vanilla = str(saved_runs["cab"]), str(saved_runs["vanilla"])
    series = analyze.plot_curves([cab, vanilla], tmp_path / "curves.png")
    assert series[cab]["loss"] == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)] and series[cab]["lr"][0] == (1, 1e-3)
    assert series[vanilla]["top1"] == [(3, 41.0)] and "bridge" not in series[cab]
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_the_curves_command_draws_into_the_runs_analysis_directory(saved_runs):
    """README: ``python -m cab_jax.analyze curves --workdir=RUN`` draws the run's curves into
    ``RUN/analysis/curves.png`` when no ``--out`` is given."""
    cab, vanilla = saved_runs["cab"], saved_runs["vanilla"]
    analyze_command("curves", f"--workdir={cab}", f"--compare={vanilla}")
    assert (cab / "analysis" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (vanilla / "analysis").exists()


def test_a_teacher_run_is_refused(saved_runs, tmp_path):
    (tmp_path / "run_config.json").write_text(json.dumps({"trains": "teacher", "config": json.loads(
        (saved_runs["cab"] / "run_config.json").read_text())["config"]}))
    with pytest.raises(ValueError, match="needs a student run"):
        analyze.attention_report([str(tmp_path)], 4, 4)


def test_the_ssd_scans_implicit_attention_is_what_it_does_to_a_probe():
    keys = jax.random.split(jax.random.key(3), 3)
    batch, length, heads, groups, head_dim, d_state = 2, 6, 4, 2, 3, 5
    log_decay = -jax.nn.softplus(jax.random.normal(keys[0], (batch, length, heads)))
    B, C = (jax.random.normal(k, (batch, length, groups, d_state)) for k in keys[1:])
    columns = []
    for s in range(length):
        x = jnp.zeros((batch, length, heads, head_dim)).at[:, s].set(1.0)
        columns.append(ssd_reference(x, log_decay, B, C).mean(axis=(2, 3)))
    np.testing.assert_allclose(ssd_implicit_attention(log_decay, B, C), jnp.stack(columns, -1), rtol=1e-5, atol=1e-6)


def test_each_phi_mamba_layers_implicit_attention_is_what_its_scan_does_to_a_probe():
    model = tiny_phi_mamba()
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, 32)
    got = model.implicit_attention(tokens)
    assert got.shape == (2, 2, 7, 7)
    graphdef, stacked = nnx.split(model.layers)
    x = model.embed(tokens)
    for i in range(2):
        block = nnx.merge(graphdef, jax.tree.map(lambda t, i=i: t[i], stacked))
        mixer, h = block.mixer, block.input_layernorm(x)
        prefix = jnp.zeros((2, mixer.d_conv - 1, mixer.conv_dim), mixer.dtype)
        inputs, B, C, _, decay, _ = mixer._project(h, prefix)
        columns = []
        for s in range(7):  # the reference scan's output at t for a unit input at s, mean over heads and channels
            probe = jnp.zeros(inputs.shape).at[:, s].set(1.0)
            columns.append(ssd_reference(probe, decay, B, C).mean(axis=(2, 3)))
        np.testing.assert_allclose(got[i], jnp.stack(columns, -1), rtol=1e-4, atol=1e-6, err_msg=f"layer {i}")
        x = block(x)[0]


def test_causal_attention_weights_see_only_the_past():
    q, k = (jax.random.normal(key, (2, 5, 4)) for key in jax.random.split(jax.random.key(0)))
    full, causal = attention_weights(q, k), attention_weights(q, k, causal=True)
    assert np.allclose(np.triu(causal, 1), 0) and np.allclose(causal.sum(-1), 1) and np.allclose(full.sum(-1), 1)
    np.testing.assert_allclose(causal[:, -1], full[:, -1], rtol=1e-6)  # the last query sees every key either way


def test_the_attention_maps_are_averaged_over_64_examples_by_default(saved_runs, tmp_path):
    """README: the maps are averaged over 64 eval examples unless --num_examples says otherwise (a run of the command
    without the flag)."""
    analyze_command("attention", f"--workdir={saved_runs['cab']}", "--batch_size=32", f"--out={tmp_path}")
    (report,) = json.loads((tmp_path / "attention.json").read_text())
    assert report["examples"] == 64


def test_without_matplotlib_the_figures_are_skipped_with_a_line_saying_how_to_get_them(tmp_path,
                                                                                   plot_warnings_without_matplotlib):
    """README: the analyses' figures need matplotlib (the `plot` extra); without it each is skipped, and a warning
    names the extra."""
    from etils import epath

    report = [{"run": str(tmp_path / "r"), "mode": "cab", "layers": [{"student_layer": 0, "cosine": 0.5,
                                                                      "spearman": 0.5}]}]
    out = epath.Path(tmp_path)
    assert not analyze.plot_similarity(report, out / "similarity.png")
    assert not analyze.plot_maps(report, out / "maps.png")
    analyze.plot_curves([], out / "curves.png")
    assert not list(tmp_path.glob("*.png"))
    warnings = plot_warnings_without_matplotlib
    assert len(warnings) == 3 and all("cab-jax[plot]" in w for w in warnings), warnings


@pytest.mark.parametrize("name", ["vim", "phi_mamba"])
def test_the_attention_transfer_pass_recomputes_each_layer_in_the_backward_pass(name):
    """Without it the pass keeps every layer's (batch, tokens, channel block, d_state) factors: 180 GiB at Vim-S's
    batch 128 (an out-of-memory error on the H200)."""
    if name == "vim":
        model, inputs = tiny_vim(), jnp.zeros((2, 8, 8, 3))
    else:
        model, inputs = tiny_phi_mamba(), jnp.zeros((2, 7), jnp.int32)
    jaxpr = jax.make_jaxpr(model.implicit_attention)(inputs).jaxpr
    layer_scan = next(e for e in all_eqns(jaxpr) if e.primitive.name == "scan")  # the outermost scan
    body = [e.primitive.name for e in layer_scan.params["jaxpr"].jaxpr.eqns]
    remat = jax.make_jaxpr(jax.checkpoint(jnp.sin))(0.0).eqns[0].primitive.name  # "remat2" in jax 0.10
    assert remat in body, f"the layer scan's body is not checkpointed: {body}"

"""Language CAB in the shared trainer: token losses, the language bridge, init from attention, the train step,
a resumable run, generation from a run's workdir, and sharding."""

import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import multiprocess_job
import numpy as np
import optax
import pytest
from flax import nnx

from cab_jax import config as config_lib
from cab_jax import domains, generate, lower, sharding, train
from cab_jax.bridge import AttentionBridge
from cab_jax.losses import LANGUAGE_MODE_WEIGHTS, loss_weights, token_cross_entropy, token_kl_divergence
from cab_jax.models.mamba import SSMProjections

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "configs"))
import demo_lm as demo_lm_config  # noqa: E402
import phi_mamba as phi_mamba_config  # noqa: E402

VOCAB, SEQ = 64, 16


def tiny_config(tmp_path, mode="cab", **train_overrides):
    """A two-layer Phi teacher and a mirroring two-layer Phi-Mamba student on synthetic tokens."""
    c = demo_lm_config.get_config()
    c.task = "distill"
    c.loss.mode = mode
    c.data.update(dict(data_dir=str(tmp_path / "tfds"), seq_len=SEQ, vocab_size=VOCAB, synthetic=True,
                       synthetic_size=64))
    c.teacher.update(dict(vocab_size=VOCAB, hidden_size=32, depth=2, num_heads=2, intermediate_size=64))
    c.student.update(dict(vocab_size=VOCAB, d_model=32, depth=2, d_state=16, n_qk_heads=2, n_v_heads=2,
                          intermediate_size=64, chunk_size=8))
    c.student.init_from_attention = mode == "cab"
    c.train.update({**dict(steps=4, batch_size=8, log_every=1, checkpoint_every=2, eval_batch_size=8,
                           warmup_epochs=0.0), **train_overrides})
    c.teacher.train.update(dict(steps=4, batch_size=8, log_every=1, eval_batch_size=8))
    return c


def token_batch(mesh, seed=0, batch=8):
    rng = np.random.default_rng(seed)
    return sharding.global_batch({"tokens": rng.integers(0, VOCAB, (batch, SEQ + 1)).astype(np.int32),
                                  "loss_mask": np.ones((batch, SEQ), np.float32)}, mesh)


def test_token_losses_match_numpy():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(3, 7, 11)), rng.normal(size=(3, 7, 11)) * 2
    labels, mask = rng.integers(0, 11, (3, 7)), (rng.random((3, 7)) > 0.3).astype(np.float64)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ls, lt = log_softmax(s), log_softmax(t)
    nll = -np.take_along_axis(ls, labels[..., None], -1)[..., 0]
    kl = (np.exp(lt) * (lt - ls)).sum(-1)
    np.testing.assert_allclose(token_cross_entropy(jnp.asarray(s, jnp.float32), labels, mask),
                               (nll * mask).sum() / mask.sum(), rtol=1e-5)
    np.testing.assert_allclose(token_kl_divergence(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), mask),
                               (kl * mask).sum() / mask.sum(), rtol=1e-5)


def test_language_mode_weights_follow_the_original():
    """One vocabulary with vision (vanilla/soft/cab, and the attention-transfer baseline); the earlier names ce/kl
    still select vanilla/soft."""
    assert {m: (w.ce, w.kl, w.bridge, w.attention) for m, w in LANGUAGE_MODE_WEIGHTS.items()} == {
        "vanilla": (1.0, 0.0, 0.0, 0.0), "soft": (1.0, 1.0, 0.0, 0.0), "cab": (1.0, 0.5, 0.5, 0.0),
        "attention_transfer": (1.0, 0.5, 0.0, 0.5)}
    assert loss_weights("cab", LANGUAGE_MODE_WEIGHTS, kl=0.25).kl == 0.25
    assert loss_weights("kl", LANGUAGE_MODE_WEIGHTS) == LANGUAGE_MODE_WEIGHTS["soft"]
    assert loss_weights("ce", LANGUAGE_MODE_WEIGHTS) == LANGUAGE_MODE_WEIGHTS["vanilla"]
    with pytest.raises(ValueError, match=r"'hard'.*'vanilla', 'soft', 'cab'.*'kl' for 'soft'"):
        loss_weights("hard", LANGUAGE_MODE_WEIGHTS)


@pytest.mark.parametrize("teacher_depth", [2, 4])
def test_language_bridge_matches_numpy(teacher_depth):
    """Two maps per layer from per-head B, C flattened over heads; teacher layer l * T // S; no token move."""
    batch, length, heads, d_state, t_heads, head_dim = 2, 5, 2, 3, 2, 4
    bridge = AttentionBridge(student_depth=2, teacher_depth=teacher_depth, d_in=heads * d_state,
                             d_teacher=t_heads * head_dim, hidden=7, kind="mlp", kernel_map="none",
                             bidirectional=False, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    proj = SSMProjections(*(rng.normal(size=(2, batch, length, heads, d_state)).astype(np.float32) for _ in "BC"))
    q_all, k_all = (rng.normal(size=(teacher_depth, batch, t_heads, length, head_dim)).astype(np.float32)
                    for _ in "qk")
    loss = float(bridge(proj, (q_all, k_all), None))

    params = nnx.state(bridge).to_pure_dict()["layers"]  # stacked over the bridged layers

    def mlp(p, layer, x):
        h = x.reshape(batch, length, -1) @ p["layers"][0]["kernel"][layer] + p["layers"][0]["bias"][layer]
        h = h / (1 + np.exp(-h))
        return h @ p["layers"][1]["kernel"][layer] + p["layers"][1]["bias"][layer]

    flat = lambda t: t.transpose(0, 2, 1, 3).reshape(batch, length, -1)
    expected = []
    for layer in range(2):
        g = layer * teacher_depth // 2
        expected.append(np.mean((mlp(params["b_to_k"], layer, proj.B[layer]) - flat(k_all[g])) ** 2)
                        + np.mean((mlp(params["c_to_q"], layer, proj.C[layer]) - flat(q_all[g])) ** 2))
    assert loss == pytest.approx(np.mean(expected), rel=1e-5)


def test_train_step_learns_and_every_term_is_used(tmp_path):
    c = tiny_config(tmp_path, base_lr=3e-3)
    c.student.init_from_attention = False  # a student copied from the (random) teacher starts with KL ~ 0
    mesh = sharding.make_mesh(c.mesh)
    built = train.create_trainer(c, mesh, train_size=64)
    state, batch = built.state, token_batch(mesh)
    history = []
    for _ in range(12):
        state, metrics = built.trainer.jit_train_step(state, built.teacher_params, batch)
        history.append(jax.device_get(metrics))
    first, last = history[0], history[-1]
    assert set(first) >= {"loss", "ce", "kl", "bridge", "train_token_acc", "grad_norm"}
    assert first["loss"] == pytest.approx(first["ce"] + 0.5 * first["kl"] + 0.5 * first["bridge"], rel=1e-5)
    for key in ("loss", "ce", "kl", "bridge"):
        assert last[key] < first[key], key


def test_bridge_gradients_reach_the_student_mixer(tmp_path):
    """The bridge term alone moves the student's in_proj (B and C come from it), unless detached."""
    def in_proj_grad(detach: bool) -> float:
        c = tiny_config(tmp_path)
        c.loss.update(dict(ce_weight=0.0, kl_weight=0.0))
        c.bridge.detach_student = detach
        built = train.create_trainer(c, sharding.make_mesh(c.mesh), train_size=64)
        trainer = built.trainer
        inputs, targets = trainer.domain.prepare(None, token_batch(trainer.mesh), trainer.job.train)
        teacher_out = trainer.teacher.module(built.teacher_params)(inputs)
        g = jax.grad(lambda p: train.loss_fn(trainer, p, inputs, targets, teacher_out, None)[0])(
            built.state["params"])
        return float(jnp.abs(g["model"]["layers"]["mixer"]["in_proj"]["kernel"]).max())

    assert in_proj_grad(False) > 0 and in_proj_grad(True) == 0


def test_setup_initialises_the_student_from_the_teacher(tmp_path):
    c = tiny_config(tmp_path, mode="cab")
    built = train.create_trainer(c, sharding.make_mesh(c.mesh), train_size=64)
    student, teacher = built.state["params"]["model"], built.teacher_params
    fc1 = lambda p: p["layers"]["mlp"]["fc1"]["kernel"]  # every layer's, stacked
    np.testing.assert_array_equal(fc1(student), fc1(teacher))
    np.testing.assert_array_equal(student["embed"]["embedding"], teacher["embed"]["embedding"])

    c = tiny_config(tmp_path, mode="soft")
    built = train.create_trainer(c, sharding.make_mesh(c.mesh), train_size=64)
    assert not np.array_equal(built.state["params"]["model"]["embed"]["embedding"],
                              built.teacher_params["embed"]["embedding"])


@pytest.mark.slow
def test_run_logs_tokens_per_s_and_generation_follows_the_model(tmp_path):
    """A teacher run, then a student distilled from its workdir: the student run ends with a held-out perplexity;
    ``generate`` rebuilds each model from its workdir and its greedy tokens equal the argmax of full forwards
    recomputed at every step."""
    c = tiny_config(tmp_path)
    c.task = "train_teacher"
    train.train_and_evaluate(c, str(tmp_path / "teacher"))
    c.task, c.teacher.init_from = "distill", str(tmp_path / "teacher")
    result = train.train_and_evaluate(c, str(tmp_path / "student"))
    assert np.isfinite(result.metrics["perplexity"]) and result.metrics["eval_tokens"] == 64 * SEQ
    records = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["tokens_per_s"] > 0 for r in records if r["split"] == "train")

    prompt = np.random.default_rng(0).integers(0, VOCAB, (2, 5)).astype(np.int32)
    for workdir in ("student", "teacher"):
        _, trained, model = train.load_trained_model(str(tmp_path / workdir), "language")
        assert trained == workdir
        tokens, _ = generate.Generator(model, prefill_chunk=2)(prompt, max_new_tokens=6)  # prefill in 3 chunks
        context = prompt
        for i in range(6):
            logits, _ = model(jnp.asarray(context))
            np.testing.assert_array_equal(tokens[:, i], np.argmax(np.asarray(logits[:, -1]), -1))
            context = np.concatenate([context, tokens[:, i : i + 1]], axis=1)


def test_sampling_draws_from_the_temperature_scaled_softmax(tmp_path):
    """4,000 copies of one prompt, one sampled token each at temperature 0.5: their histogram is within 0.1 (total
    variation) of softmax(logits / 0.5) (about 0.04 measured), and 0.24 away from softmax(logits), the distribution
    a sampler that ignored the temperature would draw from. The same seed repeats the draw; another changes it."""
    model = domains.for_config(tiny_config(tmp_path)).build_student(nnx.Rngs(0))
    prompt = np.tile(np.arange(5, dtype=np.int32)[None], (4000, 1))
    logits = np.asarray(model(jnp.asarray(prompt[:1]))[0][0, -1], np.float64)
    sample = generate.Generator(model)

    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    tokens, _ = sample(prompt, 1, temperature=0.5, seed=1)
    histogram = np.bincount(tokens[:, 0], minlength=VOCAB) / len(tokens)
    assert 0.5 * np.abs(histogram - softmax(logits / 0.5)).sum() < 0.1
    assert 0.5 * np.abs(softmax(logits / 0.5) - softmax(logits)).sum() > 0.2  # the check can tell them apart
    np.testing.assert_array_equal(sample(prompt[:64], 3, temperature=0.5, seed=1)[0],
                                  sample(prompt[:64], 3, temperature=0.5, seed=1)[0])
    assert not np.array_equal(sample(prompt[:64], 3, temperature=0.5, seed=1)[0],
                              sample(prompt[:64], 3, temperature=0.5, seed=2)[0])
    assert np.all(sample(prompt[:4], 1)[0][:, 0] == np.argmax(logits))  # temperature 0: greedy


def test_a_vision_workdir_is_refused_where_a_language_model_is_needed(tmp_path):
    (tmp_path / "run_config.json").write_text(json.dumps({"trains": "student", "config": {"domain": "vision"}}))
    with pytest.raises(ValueError, match="language"):
        train.load_trained_model(str(tmp_path), "language")


def test_language_config_errors_name_the_field(tmp_path):
    c = tiny_config(tmp_path)
    c.student.vocab_size = VOCAB + 1
    with pytest.raises(ValueError, match=r"student\.vocab_size"):
        config_lib.validate(c)
    c = tiny_config(tmp_path)
    c.loss.mode = "hard"
    with pytest.raises(ValueError, match=r"loss\.mode"):
        config_lib.validate(c)
    c.loss.mode = "kl"  # the earlier name of "soft"
    config_lib.validate(c)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_language_steps_lower_for_accelerators(tmp_path, platform):
    c = tiny_config(tmp_path)
    built = train.create_trainer(c, sharding.make_mesh(c.mesh), train_size=64)
    batch = token_batch(built.trainer.mesh)
    exported = jax.export.export(built.trainer.jit_train_step, platforms=[platform])(
        built.state, built.teacher_params, batch)
    assert exported.platforms == (platform,)
    evaluated = jax.export.export(built.trainer.jit_eval_step, platforms=[platform])(
        built.state["params"]["model"], batch)
    assert evaluated.platforms == (platform,)
    # The language student's SSD scan has no kernel: XLA on every platform, no custom call, no host callback.
    result = lower.lower(c, platform)
    assert (result.kernel, result.custom_calls, result.problems) == ("xla", (), ()), result


SHARDED_SCRIPT = textwrap.dedent("""
    import json, pathlib, sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    from test_lm_train import tiny_config, token_batch
    from cab_jax import sharding, train
    out = {{}}
    for name, devices, mesh_cfg in [("one", jax.devices()[:1], (1, 1, 1)), ("eight", jax.devices(), (2, 2, 2))]:
        c = tiny_config(pathlib.Path({tmp!r}))
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_cfg
        mesh = sharding.make_mesh(c.mesh, devices)
        built = train.create_trainer(c, mesh, train_size=64)
        state, losses = built.state, []
        for step in range(3):
            state, metrics = built.trainer.jit_train_step(state, built.teacher_params, token_batch(mesh, step))
            losses.append(float(metrics["loss"]))
        kernel = state["params"]["model"]["layers"]["mixer"]["in_proj"]["kernel"]
        out[name] = {{"losses": losses, "kernel": np.asarray(kernel).tolist(),
                     "shards": list(kernel.sharding.shard_shape(kernel.shape))}}
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_sharded_language_step_on_8_devices_equals_1_device(tmp_path):
    env = multiprocess_job.cpu_env(devices=8)
    script = SHARDED_SCRIPT.format(tests=str(ROOT / "tests"), tmp=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    np.testing.assert_allclose(out["eight"]["losses"], out["one"]["losses"], rtol=2e-5)
    np.testing.assert_allclose(out["eight"]["kernel"], out["one"]["kernel"], rtol=1e-4, atol=1e-6)
    assert out["eight"]["shards"] != out["one"]["shards"]  # the parameter really is split on the mesh


# configs/phi_mamba.py's models shrunk to two layers of width 32 on 16-token sequences: the recipe's everything else
# (its optimizer, loss, bfloat16, FSDP mesh, initialisation from the teacher's attention)
PHI_MAMBA_SHRINK = {
    "data": dict(vocab_size=VOCAB, seq_len=SEQ, synthetic_size=32),
    "teacher": dict(vocab_size=VOCAB, hidden_size=32, depth=2, num_heads=2, intermediate_size=64),
    "student": dict(vocab_size=VOCAB, d_model=32, depth=2, d_state=16, n_qk_heads=2, n_v_heads=2,
                    intermediate_size=64, chunk_size=8),
    "train": dict(steps=2, batch_size=8),
}


def test_the_language_recipe_clips_the_gradient_at_global_norm_1(tmp_path):
    """README: the language recipe clips gradients at 1. The optimizer of a configs/phi_mamba.py run (shrunk), two
    steps from the same state: after a first gradient of global norm 0.5, a second gradient of norm 10 moves the
    parameters exactly as the same direction at norm 1 does, and one of norm 0.8 (not clipped) differently. (Adam's
    first step does not depend on the gradient's scale, so the clip shows only from the second step on.)"""
    c = phi_mamba_config.get_config("synthetic=True")
    for section, fields in PHI_MAMBA_SHRINK.items():
        c[section].update(fields)
    c.data.data_dir = str(tmp_path / "tfds")
    trainer, state, _ = train.abstract_setup(c, sharding.make_mesh(c.mesh))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state["params"])
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(0), 2 * len(leaves))

    def direction(keys):  # a random gradient of global norm 1
        g = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
        return jax.tree.unflatten(treedef, [x / optax.global_norm(g) for x in g])

    first, second = direction(keys[: len(leaves)]), direction(keys[len(leaves):])

    def second_update(norm: float) -> np.ndarray:
        opt_state = trainer.tx.init(params)
        _, opt_state = trainer.tx.update(jax.tree.map(lambda g: 0.5 * g, first), opt_state, params)
        updates, _ = trainer.tx.update(jax.tree.map(lambda g: norm * g, second), opt_state, params)
        return np.concatenate([np.ravel(u) for u in jax.tree.leaves(updates)])

    at_1, at_10, at_08 = second_update(1.0), second_update(10.0), second_update(0.8)
    apart = lambda u: float(np.linalg.norm(u - at_1) / np.linalg.norm(at_1))
    assert np.linalg.norm(at_1) > 0 and apart(at_10) < 1e-5 and apart(at_08) > 1e-2, (apart(at_10), apart(at_08))


@pytest.mark.slow
def test_the_phi_mamba_recipe_trains_through_main_on_synthetic_tokens(tmp_path):
    """README's `python -m cab_jax.main --config=configs/phi_mamba.py:synthetic=True`, its models shrunk by
    overrides (PHI_MAMBA_SHRINK): the student starts from the random teacher's attention, trains two steps with
    every term of the cab loss in bfloat16, and ends with a held-out perplexity."""
    overrides = [f"--config.{section}.{field}={value}"
                 for section, fields in PHI_MAMBA_SHRINK.items() for field, value in fields.items()]
    proc = subprocess.run([sys.executable, "-m", "cab_jax.main", "--config=configs/phi_mamba.py:synthetic=True",
                           f"--workdir={tmp_path}", f"--config.data.data_dir={tmp_path / 'tfds'}", *overrides],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Student initialised from the teacher's attention" in proc.stderr
    run = json.loads((tmp_path / "run_config.json").read_text())
    assert (run["trains"], run["config"]["dtype"], run["config"]["loss"]["mode"]) == ("student", "bfloat16", "cab")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if r["split"] == "train"]
    assert trained[-1]["step"] == 2 and all(np.isfinite(trained[-1][k]) for k in ("ce", "kl", "bridge")), trained
    result = json.loads((tmp_path / "results.json").read_text())
    perplexity = result["metrics"]["perplexity"]
    assert result["step"] == 2 and np.isfinite(perplexity) and perplexity > 1, result

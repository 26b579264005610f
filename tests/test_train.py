"""Trainer: learning happens, sharding does not change the math, and the frozen teacher stays out of checkpoints."""

import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import multiprocess_job
import numpy as np
import pytest
from flax import nnx

from cab_jax import checkpoint, domains, lower, sharding, train
from cab_jax.errors import ConfigError
from cab_jax.kernels.selective_scan import lowering_for

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "configs"))
import demo as demo_config  # noqa: E402


def small_config(tmp_path, mode="cab", **train_overrides):
    c = demo_config.get_config()
    c.task = "distill"
    c.data.data_dir = str(tmp_path / "tfds")
    c.loss.mode = mode
    c.teacher.update(dict(embed_dim=32, depth=2, num_heads=2))
    c.student.update(dict(embed_dim=32, depth=4, d_state=4))
    c.bridge.hidden = 16
    c.train.update({**dict(steps=6, batch_size=16, log_every=1, checkpoint_every=3, eval_batch_size=120),
                    **train_overrides})
    c.teacher.train.update(dict(steps=4, batch_size=16, log_every=1, eval_batch_size=120))
    return c


def build_trainer(c, mesh):
    """The student's Trainer (with bridge and random frozen teacher), its initial state and teacher params."""
    c.data.synthetic = True
    return train.create_trainer(c, mesh, train_size=1024)


def test_loss_goes_down_on_a_fixed_batch(tmp_path):
    c = small_config(tmp_path, mixup_alpha=0.0, base_lr=2e-3, warmup_epochs=0.0)
    mesh = sharding.make_mesh(c.mesh)
    trainer, state, teacher = build_trainer(c, mesh)
    rng = np.random.default_rng(0)
    batch = sharding.global_batch({"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
                                   "label": rng.integers(0, 10, 16).astype(np.int32)}, mesh)
    losses = {}
    for _ in range(15):
        state, metrics = trainer.jit_train_step(state, teacher, batch)
        losses.setdefault("first", metrics)
        losses["last"] = metrics
    first, last = jax.device_get(losses["first"]), jax.device_get(losses["last"])
    assert last["loss"] < 0.7 * first["loss"]
    assert last["kl"] < first["kl"] and last["bridge"] < first["bridge"]
    for m in (first, last):  # the original's vision CAB loss: KL + 3 x bridge, no CE
        assert "ce" not in m
        np.testing.assert_allclose(m["loss"], m["kl"] + 3.0 * m["bridge"], rtol=1e-6)


def test_a_bfloat16_train_step_keeps_float32_state_and_follows_the_float32_step(tmp_path):
    """README: dtype=bfloat16 computes in bfloat16 (the bridge's maps too) with float32 parameters and optimizer
    state. Five steps on one batch from the same initial state: every parameter and AdamW moment stays float32, the
    losses stay within 1 % of the float32 run's (under 0.05 % measured) and go down as they do."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(16, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 16).astype(np.int32)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        c = small_config(tmp_path, mixup_alpha=0.0, base_lr=2e-3, warmup_epochs=0.0)
        c.dtype = dtype
        mesh = sharding.make_mesh(c.mesh)
        trainer, state, teacher = build_trainer(c, mesh)
        assert domains.for_config(c).build_bridge(nnx.Rngs(0)).layers.b_to_k.layers[0].dtype == np.dtype(dtype)
        batch = sharding.global_batch({"image": images, "label": labels}, mesh)
        losses = []
        for _ in range(5):
            state, metrics = trainer.jit_train_step(state, teacher, batch)
            losses.append(float(metrics["loss"]))
        dtypes = {x.dtype for x in jax.tree.leaves((state["params"], state["opt_state"])) if x.size > 1}
        runs[dtype] = (np.asarray(losses), dtypes)
    (loss32, _), (loss16, dtypes16) = runs["float32"], runs["bfloat16"]
    assert dtypes16 == {np.dtype(np.float32)}, dtypes16
    np.testing.assert_allclose(loss16, loss32, rtol=0.01)
    assert loss16[-1] < loss16[0]


def test_dtype_bfloat16_runs_the_domain_built_teacher_and_student_in_bfloat16():
    """README: ``dtype=bfloat16`` runs the teacher and the student in bfloat16 with float32 parameters. On the demo's
    teacher and student as the domain builds them, every matmul against a weight (a 2-D operand) and the patch
    embedding's convolution take bfloat16 operands, from float32 parameters (float32 with dtype=float32)."""
    from test_bridge import all_eqns

    def weight_ops(jaxpr):
        for eqn in all_eqns(jaxpr):
            if eqn.primitive.name == "conv_general_dilated" or (
                    eqn.primitive.name == "dot_general" and 2 in {v.aval.ndim for v in eqn.invars}):
                yield tuple(v.aval.dtype for v in eqn.invars)

    def forward_jaxpr(domain, build):
        model = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
        assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {np.dtype(np.float32)}
        graph, state = nnx.split(model)
        images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
        return jax.make_jaxpr(lambda s, x: domain.forward(nnx.merge(graph, s), x))(state, images).jaxpr

    for dtype in ("bfloat16", "float32"):
        c = demo_config.get_config()
        c.task, c.dtype = "distill", dtype
        domain = domains.for_config(c)
        for build in (domain.build_teacher, domain.build_student):
            ops = list(weight_ops(forward_jaxpr(domain, build)))
            assert len(ops) >= 5 and set(ops) == {(np.dtype(dtype),) * 2}, (dtype, build.__name__, set(ops))


def test_the_train_step_donates_its_state(tmp_path):
    """README: the jitted train step donates its state: XLA aliases the state's buffers to the new state's (every
    parameter, moment and counter), and the state passed in is deleted after the call."""
    c = small_config(tmp_path)
    trainer, state, teacher = build_trainer(c, sharding.make_mesh(c.mesh))
    batch = sharding.global_batch({"image": np.zeros((16, 32, 32, 3), np.float32),
                                   "label": np.zeros(16, np.int32)}, trainer.mesh)
    compiled = trainer.jit_train_step.lower(state, teacher, batch).compile()
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    assert compiled.memory_analysis().alias_size_in_bytes >= 0.99 * state_bytes
    trainer.jit_train_step(state, teacher, batch)
    assert all(x.is_deleted() for x in jax.tree.leaves(state["params"]))


def test_attention_transfer_trains_the_students_maps_towards_the_teachers(tmp_path):
    """The attention-transfer mode: KL plus 3 x the squared error of the student's implicit attention to the
    teacher's, no bridge. The map term alone (KL weighted 0) trains the student's maps towards the teacher's."""
    c = small_config(tmp_path, "attention_transfer", mixup_alpha=0.0, base_lr=2e-3, warmup_epochs=0.0, steps=40)
    c.loss.kl_weight = 0.0
    mesh = sharding.make_mesh(c.mesh)
    trainer, state, teacher = build_trainer(c, mesh)
    assert trainer.bridge is None and "bridge" not in state["params"]
    rng = np.random.default_rng(0)
    batch = sharding.global_batch({"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
                                   "label": rng.integers(0, 10, 16).astype(np.int32)}, mesh)
    first = None
    for _ in range(15):
        state, metrics = trainer.jit_train_step(state, teacher, batch)
        first = first or jax.device_get(metrics)
    last = jax.device_get(metrics)
    assert "attention" in first and "bridge" not in first
    assert last["attention"] < 0.7 * first["attention"], (first["attention"], last["attention"])
    np.testing.assert_allclose(last["loss"], 3.0 * last["attention"], rtol=1e-5)


def test_detach_student_leaves_the_bridge_term_to_the_bridges(tmp_path):
    """README: ``bridge.detach_student`` trains only the bridges: the bridge term alone (KL weighted 0) moves the
    student's x_proj (B and C come from it) and the bridge maps, and with the flag only the maps."""
    def grads(detach: bool) -> tuple[float, float]:
        c = small_config(tmp_path, mixup_alpha=0.0)
        c.loss.kl_weight, c.bridge.detach_student = 0.0, detach
        mesh = sharding.make_mesh(c.mesh)
        trainer, state, teacher = build_trainer(c, mesh)
        rng = np.random.default_rng(0)
        batch = sharding.global_batch({"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
                                       "label": rng.integers(0, 10, 16).astype(np.int32)}, mesh)
        inputs, targets = trainer.domain.prepare(None, batch, trainer.job.train)
        teacher_out = trainer.teacher.module(teacher)(inputs)
        g = jax.grad(lambda p: train.loss_fn(trainer, p, inputs, targets, teacher_out, None)[0])(state["params"])
        biggest = lambda tree: max(float(jnp.abs(x).max()) for x in jax.tree.leaves(tree))
        return biggest(g["model"]["layers"]["mixer"]["fwd"]["x_proj"]), biggest(g["bridge"])

    (student, bridge), (detached_student, detached_bridge) = grads(False), grads(True)
    assert student > 0 and bridge > 0 and detached_bridge > 0
    assert detached_student == 0


def test_ema_weights_follow_the_parameters_by_the_decay(tmp_path):
    """With ``train.ema_decay`` d, after each step ema = d * ema + (1 - d) * the new parameters (starting from the
    initial parameters), and only the student's and bridge's parameters have one."""
    c = small_config(tmp_path, mixup_alpha=0.0, ema_decay=0.75)
    mesh = sharding.make_mesh(c.mesh)
    trainer, state, teacher = build_trainer(c, mesh)
    rng = np.random.default_rng(0)
    batch = sharding.global_batch({"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
                                   "label": rng.integers(0, 10, 16).astype(np.int32)}, mesh)
    expected = jax.device_get(state["params"])
    assert jax.tree.structure(state["ema"]) == jax.tree.structure(state["params"])
    for _ in range(2):
        state, _ = trainer.jit_train_step(state, teacher, batch)
        params = jax.device_get(state["params"])
        expected = jax.tree.map(lambda e, p: 0.75 * e + 0.25 * p, expected, params)
        for got, want in zip(jax.tree.leaves(jax.device_get(state["ema"])), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    moved = [np.max(np.abs(e - p)) for e, p in zip(jax.tree.leaves(expected), jax.tree.leaves(params), strict=True)]
    assert max(moved) > 1e-4  # the parameters moved away from their average: the check above can tell them apart


def test_pallas_scan_train_step_matches_associative(tmp_path, monkeypatch):
    """The whole CAB step with the Pallas kernels (interpreted on CPU) follows the associative scan's run:
    same losses (KL and bridge too) and same parameters after two updates, SSM parameters included. The
    kernels run with the block sizes of ``student.scan_blocks``."""
    from cab_jax.kernels.selective_scan import BlockSizes, pallas_gpu_triton

    launched, kernel = [], pallas_gpu_triton.scan
    monkeypatch.setattr(pallas_gpu_triton, "scan",
                        lambda dirs, z, cfg: launched.append(cfg.blocks) or kernel(dirs, z, cfg))
    results = {}
    for impl in ("associative", "pallas"):
        c = small_config(tmp_path, mixup_alpha=0.0, cutmix_alpha=0.0)
        c.student.scan_impl = impl
        c.student.scan_blocks = "4,16,1,1,2"  # ignored by the associative scan
        mesh = sharding.make_mesh(c.mesh)
        trainer, state, teacher = build_trainer(c, mesh)
        rng = np.random.default_rng(0)
        batch = sharding.global_batch({"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
                                       "label": rng.integers(0, 10, 16).astype(np.int32)}, mesh)
        metrics = []
        for _ in range(2):
            state, m = trainer.jit_train_step(state, teacher, batch)
            metrics.append(jax.device_get(m))
        results[impl] = metrics, jax.device_get(state["params"])
    (m_assoc, p_assoc), (m_pallas, p_pallas) = results["associative"], results["pallas"]
    for a, b in zip(m_assoc, m_pallas, strict=True):
        for key in ("loss", "kl", "bridge", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    ssm_leaves = 0
    for path, a in jax.tree_util.tree_leaves_with_path(p_assoc):
        b = p_pallas
        for k in path:
            b = b[k.key]
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
        ssm_leaves += "A_log" in jax.tree_util.keystr(path)
    assert ssm_leaves > 0
    assert launched and set(launched) == {BlockSizes(chunk=4, block_d=16, save_every=2, num_warps=1)}


SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    from test_train import build_trainer, small_config
    from cab_jax import domains, sharding, train
    import pathlib
    assert len(jax.devices()) == 8, jax.devices()
    out = {{}}
    for name, devices, mesh_cfg in [("one", jax.devices()[:1], (1, 1, 1)), ("eight", jax.devices(), (2, 2, 2))]:
        c = small_config(pathlib.Path({tmp!r}))
        c.student.scan_impl = {scan_impl!r}
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_cfg
        c.student.embed_dim = c.teacher.embed_dim = 32
        mesh = sharding.make_mesh(c.mesh, devices)
        trainer, state, teacher = build_trainer(c, mesh)
        rng = np.random.default_rng(0)
        losses = []
        for step in range(3):
            batch = sharding.global_batch({{"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
                                           "label": rng.integers(0, 10, 16).astype(np.int32)}}, mesh)
            state, metrics = trainer.jit_train_step(state, teacher, batch)
            losses.append(float(metrics["loss"]))
        kernel = state["params"]["model"]["layers"]["mixer"]["in_proj"]["kernel"]  # (depth, embed, 2 * inner)
        # The initialisation itself (before the state is placed) already writes each device's shard only.
        _, (initial,), _ = train.init_modules(lambda rngs: (domains.for_config(c).build_student(rngs),), 0, mesh)
        initial = initial["layers"]["mixer"]["in_proj"]["kernel"]
        out[name] = {{"losses": losses, "kernel": np.asarray(kernel).tolist(),
                     "shard_shape": list(kernel.sharding.shard_shape(kernel.shape)),
                     "init_shard_shape": list(initial.sharding.shard_shape(initial.shape))}}
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
@pytest.mark.parametrize("scan_impl", ["associative", "pallas"])
def test_sharded_step_on_8_devices_equals_1_device(tmp_path, scan_impl):
    """With "pallas" the kernels run per device on their (batch, d_inner) shard (shard_map) and the
    gradients that sum over the split axes are all-reduced: the step must still equal one device's."""
    env = multiprocess_job.cpu_env(devices=8)
    script = SHARDED_SCRIPT.format(tests=str(ROOT / "tests"), tmp=str(tmp_path), scan_impl=scan_impl)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    one, eight = result["one"], result["eight"]
    depth, embed, inner = one["shard_shape"]
    assert eight["shard_shape"] == [depth, embed // 2, inner // 2], \
        "the 2x2x2 mesh should shard in_proj over fsdp and tensor, and never its layer axis"
    assert eight["init_shard_shape"] == eight["shard_shape"] and one["init_shard_shape"] == one["shard_shape"]
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(eight["kernel"]), np.array(one["kernel"]), rtol=1e-4, atol=1e-6)


def test_teacher_is_not_saved_with_the_student(tmp_path):
    c = small_config(tmp_path, steps=2)
    c.data.synthetic = True  # random teacher allowed
    train.train_and_evaluate(c, str(tmp_path / "run"))
    import orbax.checkpoint as ocp
    step_dir = next(p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    meta = ocp.PyTreeCheckpointer().metadata(step_dir / "state")
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
    assert set(tree["params"]) == {"model", "bridge"}
    domain = domains.for_config(c)
    teacher_leaves = jax.tree.leaves(nnx.state(domain.build_teacher(nnx.Rngs(0))))
    saved = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree["params"], is_leaf=lambda x: hasattr(x, "shape")))
    student = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(domain.build_student(nnx.Rngs(0)))))
    bridge = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(domain.build_bridge(nnx.Rngs(0)))))
    assert saved == student + bridge and teacher_leaves


def test_a_signal_during_the_final_save_stops_the_run_and_the_rerun_only_evaluates(tmp_path, monkeypatch):
    c = small_config(tmp_path, steps=2)
    c.data.synthetic = True
    real_wait = checkpoint.RunCheckpointer.wait

    def wait_then_preempted(self):
        real_wait(self)
        os.kill(os.getpid(), signal.SIGTERM)  # the StopRequest handler takes it (the loop's context is still open)

    monkeypatch.setattr(checkpoint.RunCheckpointer, "wait", wait_then_preempted)
    stopped = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert stopped.stopped_early and stopped.steps == 2 and not stopped.metrics
    monkeypatch.setattr(checkpoint.RunCheckpointer, "wait", real_wait)
    finished = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert not finished.stopped_early and finished.resumed_at == 2 and "top1" in finished.metrics


def test_every_logged_metric_is_a_json_line_and_a_tensorboard_scalar(tmp_path):
    """What metrics.jsonl holds, TensorBoard's own event reader reads back from the workdir (tags split/name)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    c = small_config(tmp_path, steps=3)
    c.data.synthetic = True
    train.train_and_evaluate(c, str(tmp_path / "run"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    expected = {(f"{r['split']}/{k}", r["step"]): v
                for r in records for k, v in r.items() if k not in ("step", "split")}
    got = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    # README: the log says how long each step waited for its batch (data_wait_ms), beside the throughput
    assert {tag for tag, _ in expected} >= {"train/loss", "train/bridge", "train/images_per_s", "train/data_wait_ms",
                                            "eval/top1"}
    assert all(r["data_wait_ms"] >= 0 for r in records if r["split"] == "train")
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-6)


def test_the_eval_step_alone_too_large_for_the_device_stops_before_training(tmp_path, monkeypatch):
    """README: before the first step both the train and the eval step are compiled and XLA's estimate of their memory
    is compared with the device's. An eval batch (1,024 images) whose step needs more than the limit while the train
    step (16 images) fits: the check names config.train.eval_batch_size."""
    c = small_config(tmp_path, mode="vanilla", eval_batch_size=1024)
    trainer, state, teacher = build_trainer(c, sharding.make_mesh(c.mesh))
    rng = np.random.default_rng(0)

    def batch(n):
        return sharding.global_batch({"image": rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
                                      "label": rng.integers(0, 10, n).astype(np.int32),
                                      "mask": np.ones(n, np.float32)}, trainer.mesh)

    train_batch, eval_batch = batch(16), batch(1024)
    train_batch.pop("mask")
    monkeypatch.delenv("CAB_JAX_DEVICE_MEMORY_GIB", raising=False)
    steps = train.compile_steps(trainer, state, teacher, train_batch, eval_batch)  # the host's memory: both fit
    train_need, eval_need = train.step_memory_bytes(steps.train), train.step_memory_bytes(steps.eval)
    assert eval_need > 2 * train_need, (train_need, eval_need)
    monkeypatch.setenv("CAB_JAX_DEVICE_MEMORY_GIB", str((train_need + eval_need) / 2 / 2**30))
    with pytest.raises(ConfigError, match=r"^config\.train\.eval_batch_size: the eval step needs about"):
        train.compile_steps(trainer, state, teacher, train_batch, eval_batch)


def test_without_the_variable_a_cpu_device_has_the_hosts_memory(monkeypatch):
    """README: the memory check's limit on CPU is the host's memory (/proc/meminfo's MemTotal, shared by the process's
    CPU devices) unless CAB_JAX_DEVICE_MEMORY_GIB lowers it."""
    meminfo = pathlib.Path("/proc/meminfo")
    if jax.local_devices()[0].platform != "cpu" or not meminfo.exists():
        pytest.skip("a Linux host's CPU devices")
    total = int(re.search(r"^MemTotal:\s+(\d+) kB$", meminfo.read_text(), re.M).group(1)) * 1024
    monkeypatch.delenv("CAB_JAX_DEVICE_MEMORY_GIB", raising=False)
    assert train.device_memory_bytes() == total // jax.local_device_count()
    monkeypatch.setenv("CAB_JAX_DEVICE_MEMORY_GIB", "1.5")
    assert train.device_memory_bytes() == 1.5 * 2**30

@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_learning_rate_warms_up_linearly_then_decays_to_min_lr(decay):
    """Against the schedule written out (timm's: linear warmup from warmup_lr to the peak, then cosine or linear to
    min_lr at the last step)."""
    from cab_jax import config as config_lib

    t = config_lib.vision_train(warmup_lr=1e-6, min_lr=1e-5, lr_decay=decay)
    sched = config_lib.Schedule(total_steps=110, warmup_steps=10, steps_per_epoch=10, peak_lr=1e-3)
    lr = train.learning_rate_fn(t, sched)

    def expected(step):
        if step < 10:
            return 1e-6 + (1e-3 - 1e-6) * step / 10
        frac = (step - 10) / 100
        shape = 0.5 * (1 + np.cos(np.pi * frac)) if decay == "cosine" else 1 - frac
        return 1e-5 + (1e-3 - 1e-5) * shape

    steps = [0, 5, 10, 35, 60, 85, 109, 110]
    np.testing.assert_allclose([float(lr(s)) for s in steps], [expected(s) for s in steps], rtol=1e-5)


def test_the_metrics_writer_does_not_import_torch(tmp_path):
    """tensorboardX imports torch (seconds) when it is installed; the writer hides it during that import, and torch
    still imports afterwards."""
    pytest.importorskip("torch")
    script = textwrap.dedent(f"""
        import sys
        from etils import epath
        from cab_jax import train
        writer = train.MetricsWriter(epath.Path({str(tmp_path)!r}))
        writer.write(1, "train", {{"loss": 1.0}})
        writer.close()
        assert "torch" not in sys.modules, "torch was imported"
        import torch
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=multiprocess_job.ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(tmp_path.glob("events.out.tfevents.*"))


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (42.4, "42s"), (185, "3m05s"), (3600, "1h00m"),
                                          (7650, "2h07m"), (3 * 86400 + 4 * 3600 + 59, "3d04h")])
def test_remaining_time_reads_like_a_clock(seconds, text):
    assert train.format_duration(seconds) == text


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_progress_bar_with_the_log_lines_above_it(monkeypatch):
    logged = []  # (absl's logger stops reaching pytest's capture once an absl app ran in the worker)
    monkeypatch.setattr(train.logging, "info", lambda *args: logged.append((args, terminal.getvalue())))
    terminal = Terminal()
    progress = train.ProgressBar("student", total=10, done=4, stream=terminal)  # resumed at step 4
    for _ in range(3):
        progress.step()
    progress.log("[student %d/%d] loss=%s", 7, 10, "0.5")
    progress.close()
    assert re.search(r"student:\s+70%.*\| 7/10 ", terminal.getvalue()), terminal.getvalue()
    (args, shown), = logged
    assert args == ("[student %d/%d] loss=%s", 7, 10, "0.5") and shown.endswith("\r")  # the bar was cleared first
    elsewhere = io.StringIO()  # not a terminal: no bar
    quiet = train.ProgressBar("student", total=10, done=0, stream=elsewhere)
    quiet.step()
    quiet.close()
    assert elsewhere.getvalue() == ""


def test_distill_without_teacher_weights_on_real_data_fails_clearly(tmp_path):
    c = small_config(tmp_path)
    with pytest.raises(ValueError, match=r"teacher\.init_from"):
        train.train_and_evaluate(c, str(tmp_path / "run"))


def test_mixup_and_cutmix_targets_are_distributions():
    c = demo_config.get_config().train
    c.mixup_alpha, c.cutmix_alpha, c.mixup_switch_prob = 0.8, 1.0, 0.5
    images = jnp.arange(4 * 8 * 8 * 3, dtype=jnp.float32).reshape(4, 8, 8, 3)
    labels = jnp.array([0, 1, 2, 3])
    seen_cut = seen_mix = False
    for seed in range(12):
        mixed, targets = domains.mix_batch(jax.random.key(seed), images, labels, 5, c)
        np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
        lam = float(targets[0, 0] - c.label_smoothing / 5) / (1 - c.label_smoothing)
        is_pair = jnp.isclose(mixed, images) | jnp.isclose(mixed, images[::-1])
        if bool(jnp.all(is_pair)) and not bool(jnp.allclose(mixed, images)):
            seen_cut = True  # pixels come from one image or the other: CutMix; lam is the kept area
            kept = float(jnp.mean(jnp.isclose(mixed[0], images[0]) & ~jnp.isclose(images[0], images[3])))
            assert lam == pytest.approx(kept, abs=1e-5)
        elif not bool(jnp.allclose(mixed, images)):
            seen_mix = True
            np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-4)
    assert seen_cut and seen_mix


def test_decay_mask():
    """Decay on weight matrices only; a stacked layer's parameters count by their per-layer shape."""
    params = {"pos_embed": jnp.zeros((1, 3, 4)), "blk": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4),
              "A_log": jnp.zeros((4, 2)), "D": jnp.zeros(4)}, "cls_token": jnp.zeros((1, 1, 4)),
              "layers": {"kernel": jnp.zeros((3, 4, 4)), "bias": jnp.zeros((3, 4)), "D": jnp.zeros((3, 4)),
                         "A_log": jnp.zeros((3, 4, 2))}}
    axes = {"blk": {"kernel": ("embed", "mlp"), "bias": ("mlp",)},
            "layers": {"kernel": ("layers", "embed", "mlp"), "bias": ("layers", "mlp"), "D": ("layers", "inner"),
                       "A_log": ("layers", "inner", None)}}
    mask = train.decay_mask(params, axes)
    assert mask == {"pos_embed": False, "cls_token": False,
                    "blk": {"kernel": True, "bias": False, "A_log": False, "D": False},
                    "layers": {"kernel": True, "bias": False, "D": False, "A_log": False}}


def test_decay_mask_of_the_real_models(tmp_path):
    """In the built Vim student and bridge, exactly the matrices decay: in_proj, x_proj, dt_proj, out_proj, the
    conv kernels (per layer (d_conv, d_inner)), the patch embedding, the head and the bridge kernels."""
    c = small_config(tmp_path)
    state = build_trainer(c, sharding.make_mesh(c.mesh)).state
    axes = {"model": sharding.logical_axes(domains.for_config(c).build_student(nnx.Rngs(0))),
            "bridge": sharding.logical_axes(domains.for_config(c).build_bridge(nnx.Rngs(0)))}
    flat = jax.tree_util.tree_flatten_with_path(train.decay_mask(state["params"], axes))[0]
    decayed = {jax.tree_util.keystr(path) for path, decays in flat if decays}
    assert "['model']['layers']['mixer']['in_proj']['kernel']" in decayed
    assert "['model']['layers']['mixer']['fwd']['conv_kernel']" in decayed
    assert not any(name in path for path in decayed for name in ("bias", "'D'", "A_log", "scale", "pos_embed"))
    assert any("['bridge']" in path for path in decayed)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_train_and_eval_steps_lower_for_accelerators_with_their_scan_kernel(tmp_path, platform):
    """The same jitted steps export for TPU and GPU from this CPU machine with the scan kernel each platform runs
    (not the CPU's associative scan): what a pod or GPU host compiles."""
    c = small_config(tmp_path)
    result = lower.lower(c, platform)
    assert result.problems == () and result.kernel in lower.KERNEL_TARGETS, result
    assert result.calls == 2  # the forward keeping its states for the gradient, the backward (no remat here)
    c = lower.lowering_config(c)
    mesh = sharding.make_mesh(c.mesh)
    with lowering_for(platform):
        trainer, state, _ = train.abstract_setup(c, mesh)
        batch = {**domains.for_config(c).train_batch_spec(16), "mask": jax.ShapeDtypeStruct((16,), np.float32)}
        evaluated = jax.export.export(trainer.jit_eval_step, platforms=[platform], disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call(t) for t in lower.KERNEL_TARGETS.values()])(
            state["params"]["model"], batch)
    assert evaluated.platforms == (platform,)
    assert evaluated.mlir_module().count(f"@{lower.KERNEL_TARGETS[result.kernel]}") == 1

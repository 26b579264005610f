"""Reading weights safely, the ``python -m cab_jax.convert`` command line, and ``init_from`` with PyTorch weights."""

import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from absl import flags
from flax import nnx

from cab_jax import checkpoint, domains, sharding, train
from cab_jax.convert import __main__ as convert_cli
from cab_jax.convert import io, mapping, vim, weights
from cab_jax.convert.__main__ import MODELS, vision_model
from cab_jax.errors import UserError
from cab_jax.models import registry
from configs import demo

ROOT = pathlib.Path(__file__).parents[1]


class NotATensor:
    """Any class: pickling an instance stores a reference to code that weights_only loading refuses."""

    def __reduce__(self):
        return (print, ("this would run on load",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "payload": NotATensor()}, path)
    with pytest.raises(ValueError, match="refused to load"):
        io.load_state_dict(path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_files_fail_clearly(tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    io.save_state_dict({"a": np.ones((64, 64), np.float32)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a readable"):
        io.load_state_dict(path)


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"unknown weights format '\.npz'"):
        io.load_state_dict(tmp_path / "w.npz")
    with pytest.raises(FileNotFoundError, match="no weights at"):
        io.load_state_dict(tmp_path / "absent.pth")
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        io.load_state_dict(tmp_path)


def test_wrapped_training_checkpoint_is_unwrapped(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"w": torch.arange(3.0)}, "epoch": 7}, path)
    np.testing.assert_array_equal(io.load_state_dict(path)["w"], [0.0, 1.0, 2.0])


def random_vim_tensors(model) -> dict:
    """Original-layout tensors of ``model``, a randomly initialised Vim."""
    return vim.export_vim(nnx.state(model).to_pure_dict())


def cli(*args):
    proc = subprocess.run([sys.executable, "-m", "cab_jax.convert", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    return proc


@pytest.mark.slow
def test_cli_imports_and_exports_vim_losslessly(tmp_path):
    sizes = ("--model=vim_tiny", "--image_size=32", "--patch_size=16", "--num_classes=10")
    assert MODELS["vim_tiny"] == ("vim", "tiny")
    model = vision_model("vim_tiny", 32, 16, 10)  # abstract
    fields = {**registry.size_fields("vim", "tiny"), "num_classes": 10, "img_size": 32, "patch_size": 16}
    tensors = random_vim_tensors(registry.build("vim", **fields, rngs=nnx.Rngs(1)))
    assert {k: v.shape for k, v in mapping.flatten(nnx.state(model).to_pure_dict()).items()} == \
        {k: v.shape for k, v in mapping.flatten(vim.import_vim(tensors, nnx.state(model).to_pure_dict())).items()}
    io.save_state_dict(tensors, tmp_path / "vim.pth")

    proc = cli(f"--src={tmp_path / 'vim.pth'}", "--format=vim", f"--out={tmp_path / 'ours'}", *sizes)
    assert proc.returncode == 0, proc.stderr[-2000:]
    params = checkpoint.load_model_params(tmp_path / "ours", nnx.state(model).to_pure_dict())
    assert {k: v.shape for k, v in vim.export_vim(params).items()} == {k: v.shape for k, v in tensors.items()}

    proc = cli("--export", f"--src={tmp_path / 'ours'}", "--format=vim", f"--out={tmp_path / 'back.safetensors'}",
               *sizes)
    assert proc.returncode == 0, proc.stderr[-2000:]
    back = io.load_state_dict(tmp_path / "back.safetensors")
    assert set(back) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_cli_rejects_a_format_that_does_not_fit_the_model(tmp_path):
    proc = cli(f"--src={tmp_path / 'x.pth'}", "--format=vim", "--model=deit_small", f"--out={tmp_path / 'o'}")
    assert proc.returncode != 0
    assert "does not fit --model=deit_small" in proc.stderr


def small_config(tmp_path):
    c = demo.get_config()
    c.task = "distill"
    c.data.synthetic = True
    c.data.data_dir = str(tmp_path / "tfds")
    c.teacher.update(dict(embed_dim=32, depth=2, num_heads=2))
    c.student.update(dict(embed_dim=32, depth=2, d_state=4))
    c.train.update(dict(batch_size=8, steps=2))
    return c


def test_student_init_from_original_vim_weights(tmp_path):
    c = small_config(tmp_path)
    tensors = random_vim_tensors(domains.for_config(c).build_student(nnx.Rngs(1)))
    io.save_state_dict(tensors, tmp_path / "student.safetensors")
    c.student.init_from = str(tmp_path / "student.safetensors")
    built = train.create_trainer(c, sharding.make_mesh(c.mesh), train_size=64)
    started = vim.export_vim(jax.device_get(built.state["params"]["model"]))
    for name, value in tensors.items():
        np.testing.assert_array_equal(started[name], value, err_msg=name)


def test_cab_training_checkpoint_gives_its_student(tmp_path):
    """The CAB repo saves the whole DualViT2Vim (student.*, teacher.*, aligner.*) under "model"."""
    c = small_config(tmp_path)
    domain = domains.for_config(c)
    tensors = random_vim_tensors(domain.build_student(nnx.Rngs(1)))
    whole = {**{f"student.{k}": torch.from_numpy(v) for k, v in tensors.items()},
             "teacher.cls_token": torch.zeros(1, 1, 8), "aligner.proj_B.0.0.weight": torch.zeros(128, 4)}
    torch.save({"model": whole, "epoch": 3}, tmp_path / "cab.pth")
    params = weights.import_pytorch(tmp_path / "cab.pth", nnx.eval_shape(lambda: domain.build_student(nnx.Rngs(0))))
    for name, value in vim.export_vim(params).items():
        np.testing.assert_array_equal(value, tensors[name], err_msg=name)


def test_teacher_init_from_a_converted_checkpoint(tmp_path):
    """README: teacher.init_from takes what ``python -m cab_jax.convert`` writes (``checkpoint.save_model_params``,
    its output), and the run's frozen teacher holds exactly those parameters."""
    c = small_config(tmp_path)
    teacher = domains.for_config(c).build_teacher(nnx.Rngs(7))
    params = jax.tree.map(np.asarray, nnx.state(teacher).to_pure_dict())
    checkpoint.save_model_params(tmp_path / "converted", params)
    c.teacher.init_from = str(tmp_path / "converted")
    built = train.create_trainer(c, sharding.make_mesh(c.mesh), train_size=64)
    loaded, expected = mapping.flatten(jax.device_get(built.teacher_params)), mapping.flatten(params)
    assert set(loaded) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)


def test_teacher_init_from_hugging_face_directory(tmp_path):
    c = small_config(tmp_path)
    t = c.teacher
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=t.embed_dim, num_hidden_layers=t.depth, num_attention_heads=t.num_heads,
        intermediate_size=int(t.embed_dim * t.mlp_ratio), image_size=c.data.image_size, patch_size=t.patch_size,
        num_labels=c.data.num_classes, layer_norm_eps=1e-6, qkv_bias=True))
    hf.save_pretrained(tmp_path / "hf")
    c.teacher.init_from = str(tmp_path / "hf")
    built = train.create_trainer(c, sharding.make_mesh(c.mesh), train_size=64)
    loaded = mapping.flatten(jax.device_get(built.teacher_params))
    teacher = nnx.eval_shape(lambda: domains.for_config(c).build_teacher(nnx.Rngs(0)))
    expected = mapping.flatten(weights.import_pytorch(tmp_path / "hf", teacher))
    assert set(loaded) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)
    q0 = io.load_state_dict(tmp_path / "hf")["vit.encoder.layer.0.attention.attention.query.weight"]
    np.testing.assert_array_equal(loaded["blocks.attn.q.kernel"][0], q0.T)  # layer 0 of the stacked blocks
    q1 = io.load_state_dict(tmp_path / "hf")["vit.encoder.layer.1.attention.attention.query.weight"]
    np.testing.assert_array_equal(loaded["blocks.attn.q.kernel"][1], q1.T)


def test_bfloat16_safetensors_are_read_as_float32(tmp_path):
    """Many released checkpoints are bfloat16, which NumPy does not count as a floating dtype."""
    from safetensors.torch import save_file

    weight = torch.randn(3, 5).to(torch.bfloat16)
    save_file({"w": weight, "n": torch.arange(4)}, str(tmp_path / "w.safetensors"))
    loaded = io.load_state_dict(tmp_path / "w.safetensors")
    assert loaded["w"].dtype == np.float32 and loaded["n"].dtype == np.int64
    np.testing.assert_array_equal(loaded["w"], weight.float().numpy())


def cli_in_process(*args):
    """``python -m cab_jax.convert ...`` in this process (a subprocess costs seconds of imports); a UserError is
    what the command prints as its one line with exit status 2."""
    try:
        flags.FLAGS(["convert", *args])
        convert_cli.main([])
    finally:
        flags.FLAGS.unparse_flags()


def test_cli_phi_1_5_is_phi_1_5s_size_and_refuses_another_checkpoint_naming_both_sizes(tmp_path):
    """README: `convert --src=/hf/phi-1_5 --format=hf --model=phi_1_5`. The named size is microsoft/phi-1_5's (its
    config.json: 51,200 tokens, width 2,048, 24 layers of 32 heads, MLP 8,192); a smaller PhiForCausalLM directory
    given as phi_1_5 is refused, the message naming the checkpoint's size and phi_1_5's, and nothing is written."""
    hf = transformers.PhiForCausalLM(transformers.PhiConfig(
        vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128))
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(UserError) as info:
        cli_in_process(f"--src={tmp_path / 'hf'}", "--format=hf", "--model=phi_1_5", f"--out={tmp_path / 'ours'}")
    message = str(info.value)
    assert "checkpoint has vocab_size 97, hidden_size 64, depth 3" in message, message
    assert "the model expects vocab_size 51200, hidden_size 2048, depth 24, intermediate_size 8192, num_heads 32" \
        in message, message
    assert not (tmp_path / "ours").exists()


def test_cli_exports_a_training_runs_student_to_a_pth_file(tmp_path, monkeypatch):
    """README: `convert --export --src=WORKDIR --format=vim --model=vim_small --out=student.pth`. WORKDIR is a
    2-step distillation run; its student is the small test size, which the command is given in place of a named
    size's (test_cli_imports_and_exports_vim_losslessly runs a named size, with a converted checkpoint and a
    .safetensors output). The .pth loads with torch.load(weights_only=True) as the original layout's tensors, and
    imports back to exactly the run's trained student."""
    c = small_config(tmp_path)
    c.loss.mode = "vanilla"
    train.train_and_evaluate(c, str(tmp_path / "run"))
    student = nnx.eval_shape(lambda: domains.for_config(c).build_student(nnx.Rngs(0)))
    monkeypatch.setattr(convert_cli, "vision_model", lambda *args: student)
    cli_in_process("--export", f"--src={tmp_path / 'run'}", "--format=vim", "--model=vim_small",
                   f"--out={tmp_path / 'student.pth'}")
    exported = torch.load(tmp_path / "student.pth", weights_only=True)
    assert set(exported) == set(random_vim_tensors(domains.for_config(c).build_student(nnx.Rngs(1))))
    assert all(isinstance(v, torch.Tensor) for v in exported.values())
    _, trains, trained = train.load_trained_model(str(tmp_path / "run"), "vision")
    assert trains == "student"
    back = mapping.flatten(weights.import_pytorch(tmp_path / "student.pth", student, "vim"))
    run = mapping.flatten(jax.device_get(nnx.state(trained).to_pure_dict()))
    assert set(back) == set(run)
    for name, value in run.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)

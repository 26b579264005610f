"""Importing PyTorch DeiT / ViT teachers (timm and Hugging Face layouts) into our Flax ViT: parity of logits and
every layer's attention q / k with the PyTorch model, position-embedding resizing, and error reports."""

import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from cab_jax import checkpoint
from cab_jax.convert import deit, weights
from cab_jax.convert.io import hf_config, load_state_dict, save_state_dict
from cab_jax.convert.mapping import ConversionError, flatten
from cab_jax.convert.pos_embed import resize_pos_embed
from cab_jax.models import registry

DIM, DEPTH, HEADS, IMAGE, PATCH, CLASSES = 64, 2, 4, 32, 8, 10
TOL = 1e-4


def config(dim=DIM, depth=DEPTH, heads=HEADS, image=IMAGE, patch=PATCH, classes=CLASSES):
    """The fields of our ViT teacher (for ``registry.build("vit", **config())``)."""
    return dict(embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4.0, img_size=image, patch_size=patch,
                num_classes=classes)


def teacher_target(c):
    """Our dotted parameter name -> shape for the ViT with fields ``c`` (built abstractly; blocks stacked)."""
    return {k: tuple(v.shape) for k, v in flatten(nnx.state(registry.abstract("vit", **c)).to_pure_dict()).items()}


def our_forward(c, params, images_nchw):
    """Our teacher with ``params`` on NCHW images: (logits, [(q, k)] per layer) as NumPy; the model's stacked
    (depth, batch, heads, tokens, head_dim) q and k are split into their layers."""
    model = registry.build("vit", **c, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    with jax.default_matmul_precision("highest"):
        logits, (q, k) = model(np.asarray(images_nchw).transpose(0, 2, 3, 1))
    q, k = np.asarray(q), np.asarray(k)
    assert q.shape[0] == k.shape[0] == c["depth"]
    return np.asarray(logits), list(zip(q, k, strict=True))


def randomize(module, seed, scale=0.1):
    """Every parameter ~ N(0, scale²), LayerNorm scales ~ 1 + N(0, scale²): no zero biases or unit norms hide a
    wrong mapping."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            for name, p in sub.named_parameters(recurse=False):
                one = isinstance(sub, torch.nn.LayerNorm) and name == "weight"
                p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if one else 0.0))
    return module.eval()


def images(n=2, size=IMAGE, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


def max_diffs(ours, ref):
    """(max |logits diff|, max |q diff| over layers, max |k diff| over layers)."""
    (logits, qks), (ref_logits, ref_qks) = ours, ref
    assert len(qks) == len(ref_qks)
    for (q, k), (rq, rk) in zip(qks, ref_qks, strict=True):
        assert q.shape == rq.shape and k.shape == rk.shape
    return (float(np.abs(logits - ref_logits).max()),
            max(float(np.abs(q - rq).max()) for (q, _), (rq, _) in zip(qks, ref_qks, strict=True)),
            max(float(np.abs(k - rk).max()) for (_, k), (_, rk) in zip(qks, ref_qks, strict=True)))


def assert_parity(ours, ref, label):
    diffs = max_diffs(ours, ref)
    print(f"{label}: max abs diff logits {diffs[0]:.2e}, q {diffs[1]:.2e}, k {diffs[2]:.2e}")
    assert max(diffs) <= TOL, (label, diffs)


def heads_of(t, heads=HEADS):
    """(batch, tokens, dim) -> (batch, heads, tokens, head_dim)."""
    b, n, d = t.shape
    return t.reshape(b, n, heads, d // heads).permute(0, 2, 1, 3)


# --------------------------------------------------------------------------------------------------------------
# A reference DeiT in timm's layout (names, shapes, fused qkv, exact GELU, LayerNorm eps 1e-6).


class TimmAttention(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d)), (q, k)


class TimmMlp(torch.nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class TimmBlock(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.attn = TimmAttention(dim, heads)
        self.norm2 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TimmMlp(dim, 4 * dim)

    def forward(self, x):
        y, qk = self.attn(self.norm1(x))
        x = x + y
        return x + self.mlp(self.norm2(x)), qk


class TimmDeiT(torch.nn.Module):
    def __init__(self, dim=DIM, depth=DEPTH, heads=HEADS, image=IMAGE, patch=PATCH, classes=CLASSES,
                 distilled=False):
        super().__init__()
        prefix = 2 if distilled else 1
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, dim))
        if distilled:
            self.dist_token = torch.nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, prefix + (image // patch) ** 2, dim))
        self.blocks = torch.nn.ModuleList([TimmBlock(dim, heads) for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(dim, eps=1e-6)
        self.head = torch.nn.Linear(dim, classes)
        if distilled:
            self.head_dist = torch.nn.Linear(dim, classes)
        self.distilled = distilled

    def forward(self, x, use_dist=True):
        """(cls-head logits, [(q, k)]); ``use_dist=False`` runs a distilled model without its distillation token
        (what the conversion keeps)."""
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        if self.distilled and use_dist:
            x = torch.cat([cls, self.dist_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        else:
            pos = torch.cat([self.pos_embed[:, :1], self.pos_embed[:, 1 + self.distilled:]], 1)
            x = torch.cat([cls, x], 1) + pos
        qks = []
        for block in self.blocks:
            x, qk = block(x)
            qks.append(qk)
        return self.head(self.norm(x)[:, 0]), qks


def torch_run(model, x, **kwargs):
    with torch.no_grad():
        logits, qks = model(torch.from_numpy(x), **kwargs)
    return logits.numpy(), [(q.numpy(), k.numpy()) for q, k in qks]


def timm_state_dict(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["pth", "pth_wrapped", "safetensors"])
def test_timm_layout_matches_pytorch(tmp_path, kind):
    model = randomize(TimmDeiT(), seed=1)
    sd = timm_state_dict(model)
    path = tmp_path / ("w.safetensors" if kind == "safetensors" else "w.pth")
    if kind == "pth":
        torch.save(model.state_dict(), path)
    elif kind == "pth_wrapped":
        torch.save({"model": model.state_dict(), "epoch": 3}, path)
    else:
        save_state_dict(sd, path)
    c = config()
    params = deit.import_teacher(load_state_dict(path), "timm", teacher_target(c), num_heads=HEADS)
    x = images()
    assert_parity(our_forward(c, params, x), torch_run(model, x), f"timm {kind}")


def test_timm_distilled_drops_the_distillation_token(monkeypatch):
    model = randomize(TimmDeiT(distilled=True), seed=2)
    warnings = []
    monkeypatch.setattr(deit.logging, "warning", lambda msg, *args: warnings.append(msg % args))
    c = config()
    params = deit.import_teacher(timm_state_dict(model), "timm", teacher_target(c))
    assert len(warnings) == 1 and "dist_token" in warnings[0] and "head_dist" in warnings[0]
    x = images()
    ours = our_forward(c, params, x)
    # Exact against the same network run without its distillation token (what the conversion keeps) ...
    assert_parity(ours, torch_run(model, x, use_dist=False), "timm distilled (token dropped)")
    # ... and only approximately the distilled network itself: the token takes part in every attention layer.
    full = torch_run(model, x)[0]
    print(f"timm distilled vs the full model (with its token): max abs logits diff {np.abs(ours[0] - full).max():.3f}")


# --------------------------------------------------------------------------------------------------------------
# Hugging Face transformers.


def hf_model(cls, config_cls, seed):
    cfg = config_cls(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * DIM,
                     image_size=IMAGE, patch_size=PATCH, num_labels=CLASSES, layer_norm_eps=1e-6, hidden_act="gelu",
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return randomize(cls(cfg), seed)


def hf_qk_hooks(model):
    """Forward hooks storing every layer's query and key projections in a dict keyed (layer, "q_proj" / "k_proj");
    returns (that dict, the hook handles)."""
    found, handles = {}, []
    for name, module in model.named_modules():
        for proj in ("q_proj", "k_proj"):
            if name.endswith("attention." + proj):
                layer = int(name.split("layers.")[1].split(".")[0])
                handles.append(module.register_forward_hook(
                    lambda m, inp, out, key=(layer, proj): found.__setitem__(key, heads_of(out).detach().numpy())))
    assert len(handles) == 2 * DEPTH
    return found, handles


def hf_run(model, x, drop_dist=False):
    """(logits, [(q, k)]) of a Hugging Face classifier; ``drop_dist``: a DeiT run by hand without its
    distillation token."""
    found, handles = hf_qk_hooks(model)
    pixels = torch.from_numpy(x)
    with torch.no_grad():
        if drop_dist:
            base = model.deit
            emb = base.embeddings
            tokens = emb.patch_embeddings(pixels)
            pos = emb.position_embeddings
            h = torch.cat([emb.cls_token.expand(len(x), -1, -1), tokens], 1) + torch.cat([pos[:, :1], pos[:, 2:]], 1)
            for layer in base.layers:
                h = layer(h)
            head = getattr(model, "classifier", None) or model.cls_classifier
            logits = head(base.layernorm(h)[:, 0])
        else:
            out = model(pixel_values=pixels)
            logits = getattr(out, "cls_logits", None)
            logits = out.logits if logits is None else logits
    for handle in handles:
        handle.remove()
    return logits.numpy(), [(found[(i, "q_proj")], found[(i, "k_proj")]) for i in range(DEPTH)]


def test_hf_vit_matches_pytorch(tmp_path):
    model = hf_model(transformers.ViTForImageClassification, transformers.ViTConfig, seed=3)
    model.save_pretrained(tmp_path)
    sd = load_state_dict(tmp_path)
    assert any(".encoder.layer.0.attention.attention.query.weight" in k for k in sd)  # the checkpoint layout
    c = config()
    params = deit.import_teacher(sd, "hf", teacher_target(c), hf_config(tmp_path), num_heads=HEADS)
    x = images()
    ref = hf_run(model, x)
    assert_parity(our_forward(c, params, x), ref, "hf ViT (save_pretrained)")
    # A Hugging Face directory converts as "hf" when no format is given (and the head count is the model's).
    jax.tree.map(np.testing.assert_array_equal, weights.import_pytorch(tmp_path, registry.abstract("vit", **c)),
                 params)
    q0 = sd["vit.encoder.layer.1.attention.attention.query.weight"]
    np.testing.assert_array_equal(params["blocks"]["attn"]["q"]["kernel"][1], q0.T)  # layer 1 of the stack
    # transformers >= 5 module names, as model.state_dict() gives them in memory.
    live = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert any(".layers.0.attention.q_proj.weight" in k for k in live)
    params = deit.import_teacher(live, "hf", teacher_target(c), num_heads=HEADS)
    assert_parity(our_forward(c, params, x), ref, "hf ViT (module names)")


@pytest.mark.parametrize("cls_name", ["DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"])
def test_hf_deit_matches_pytorch_without_distillation_token(tmp_path, monkeypatch, cls_name):
    model = hf_model(getattr(transformers, cls_name), transformers.DeiTConfig, seed=4)
    model.save_pretrained(tmp_path)
    warnings = []
    monkeypatch.setattr(deit.logging, "warning", lambda msg, *args: warnings.append(msg % args))
    c = config()
    params = deit.import_teacher(load_state_dict(tmp_path), "hf", teacher_target(c), hf_config(tmp_path),
                                 num_heads=HEADS)
    assert len(warnings) == 1 and "distillation_token" in warnings[0]
    x = images()
    ours = our_forward(c, params, x)
    assert_parity(ours, hf_run(model, x, drop_dist=True), f"hf {cls_name} (token dropped)")
    full = hf_run(model, x)[0]
    print(f"hf {cls_name} vs the full model: max abs logits diff {np.abs(ours[0] - full).max():.3f}")


# --------------------------------------------------------------------------------------------------------------
# Position-embedding resizing.


def test_resize_pos_embed_unit():
    rng = np.random.default_rng(0)
    pos = rng.normal(size=(1, 1 + 16, 8)).astype(np.float32)
    same = resize_pos_embed(pos, 4)
    assert np.array_equal(same, pos) and same is not pos
    bigger = resize_pos_embed(pos, 6)
    assert bigger.shape == (1, 1 + 36, 8)
    np.testing.assert_array_equal(bigger[:, 0], pos[:, 0])
    two = np.concatenate([pos[:, :1], pos], axis=1)  # two prefix tokens are both kept
    resized = resize_pos_embed(two, 3, n_prefix=2)
    assert resized.shape == (1, 2 + 9, 8)
    np.testing.assert_array_equal(resized[:, :2], two[:, :2])
    # A constant stays constant.
    const = np.concatenate([pos[:, :1], np.full((1, 16, 8), 0.5, np.float32)], axis=1)
    np.testing.assert_allclose(resize_pos_embed(const, 7)[:, 1:], 0.5, atol=1e-6)
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(pos[:, :-1], 4)
    pos_big = rng.normal(size=(1, 1 + 36, 8)).astype(np.float32)  # shrinking works too
    assert resize_pos_embed(pos_big, 4).shape == (1, 17, 8)


@pytest.mark.parametrize("new_grid", [7, 10, 16, 24])
def test_resize_pos_embed_matches_torch_antialiased_bicubic_as_timm_resamples(new_grid):
    """timm resamples a position embedding with F.interpolate(mode="bicubic", antialias=True, align_corners=False)
    (resample_abs_pos_embed's defaults): the same numbers, growing and shrinking the 14 x 14 grid. Bilinear, or
    torch's bicubic without antialias (a = -0.75), differ by 0.1-0.3 here."""
    pos = np.random.default_rng(1).normal(size=(1, 1 + 14 * 14, 8)).astype(np.float32)
    image = torch.from_numpy(pos[0, 1:].reshape(14, 14, 8)).permute(2, 0, 1)[None]
    want = torch.nn.functional.interpolate(image, size=(new_grid, new_grid), mode="bicubic", align_corners=False,
                                           antialias=True)[0].permute(1, 2, 0).reshape(-1, 8).numpy()
    got = resize_pos_embed(pos, new_grid)
    np.testing.assert_allclose(got[0, 1:], want, rtol=0, atol=5e-6)
    np.testing.assert_array_equal(got[:, 0], pos[:, 0])


def smooth_image(size, n=2):
    """A low-frequency colour image sampled at pixel centres of a ``size`` grid (same picture at any size)."""
    t = (np.arange(size) + 0.5) / size
    yy, xx = np.meshgrid(t, t, indexing="ij")
    chans = [np.sin(2 * np.pi * (0.6 * xx + 0.3 * yy) + c + s) + 0.5 * np.cos(np.pi * (xx - 0.7 * yy) * (1 + s))
             for s in range(n) for c in range(3)]
    return np.stack(chans).reshape(n, 3, size, size).astype(np.float32)


def smooth_pos_embed(grid, dim, rng):
    """A position embedding made of low-frequency waves over the grid, as trained ViTs' embeddings look."""
    t = (np.arange(grid) + 0.5) / grid
    yy, xx = np.meshgrid(t, t, indexing="ij")
    fx, fy, phase = rng.uniform(0, 1.0, (3, dim))
    waves = np.sin(2 * np.pi * (fx * xx[..., None] + fy * yy[..., None]) + 2 * np.pi * phase)
    return np.concatenate([rng.normal(size=(1, dim)), waves.reshape(grid * grid, dim)])[None].astype(np.float32)


def test_resized_teacher_runs_and_follows_the_original_on_smooth_images():
    model = randomize(TimmDeiT(), seed=5)
    with torch.no_grad():
        model.pos_embed.copy_(torch.from_numpy(smooth_pos_embed(IMAGE // PATCH, DIM, np.random.default_rng(0))))
    sd = timm_state_dict(model)
    c32, c48 = config(), config(image=48)
    params32 = deit.import_teacher(sd, "timm", teacher_target(c32))
    assert np.array_equal(params32["pos_embed"], sd["pos_embed"])  # identity when the grid matches
    params48 = deit.import_teacher(sd, "timm", teacher_target(c48))
    assert params48["pos_embed"].shape == (1, 1 + 36, DIM)
    np.testing.assert_array_equal(params48["pos_embed"][:, 0], sd["pos_embed"][:, 0])

    ref = torch_run(model, smooth_image(IMAGE))[0]
    logits48, qks = our_forward(c48, params48, smooth_image(48))
    assert np.isfinite(logits48).all() and qks[0][0].shape == (2, HEADS, 37, DIM // HEADS)
    diff = np.abs(logits48 - ref).max()
    # Control: the same 48 px teacher with its patch position rows shuffled, i.e. positions carry no meaning.
    perm = np.random.default_rng(1).permutation(36)
    shuffled = dict(params48, pos_embed=np.concatenate([params48["pos_embed"][:, :1],
                                                        params48["pos_embed"][:, 1 + perm]], axis=1))
    control = np.abs(our_forward(c48, shuffled, smooth_image(48))[0] - ref).max()
    # The two resolutions cut the picture into different patches (each 8 px patch spans 1/4 of the side at 32 px,
    # 1/6 at 48 px), so the logits cannot agree exactly; on a smooth picture with a smooth position embedding they
    # should stay within a small fraction of the logits' spread, and clearly closer than with the positions
    # scrambled (0.05 vs 0.15 at these seeds, logit std 0.84).
    spread = ref.std()
    print(f"resized 32->48 px: max abs logits diff {diff:.3f}; shuffled positions {control:.3f}; "
          f"logit std {spread:.3f}")
    assert diff < 0.25 * spread and diff < 0.5 * control


# --------------------------------------------------------------------------------------------------------------
# Errors.


def test_deit_small_into_deit_tiny_names_both_sizes():
    small = {name: np.zeros(shape, np.float32) for name, shape in timm_shapes(384, 12, 1000).items()}
    tiny = teacher_target(config(dim=192, depth=12, heads=3, image=224, patch=16, classes=1000))
    with pytest.raises(ConversionError) as e:
        deit.import_teacher(small, "timm", tiny)
    msg = str(e.value)
    print(msg)
    assert "embed_dim 384, depth 12" in msg and "DeiT-S" in msg
    assert "embed_dim 192, depth 12" in msg and "DeiT-T" in msg


def timm_shapes(dim, depth, classes, grid=14, patch=16):
    """timm DeiT tensor shapes without building the model."""
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + grid * grid, dim),
              "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
              "norm.weight": (dim,), "norm.bias": (dim,), "head.weight": (classes, dim), "head.bias": (classes,)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,), b + "norm2.weight": (dim,),
                       b + "norm2.bias": (dim,), b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                       b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                       b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                       b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,)})
    return shapes


def zeros_timm():
    """An all-zero timm checkpoint of the test size."""
    shapes = timm_shapes(DIM, DEPTH, CLASSES, grid=IMAGE // PATCH, patch=PATCH)
    return {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}


def test_missing_and_unexpected_keys_are_listed():
    sd = zeros_timm()
    for key in ("blocks.1.mlp.fc2.bias", "blocks.0.norm1.weight", "norm.bias"):  # every one is named, in order
        del sd[key]
    sd["blocks.0.attn.extra_scale"] = np.zeros((DIM,), np.float32)
    sd["head.extra"] = np.zeros((DIM,), np.float32)
    sd["blocks.0.mlp.fc1.bias"] = np.zeros((128,), np.float32)  # mis-shaped, both of them named
    sd["norm.weight"] = np.zeros((DIM + 1,), np.float32)
    with pytest.raises(ConversionError) as e:
        deit.import_teacher(sd, "timm", teacher_target(config()))
    msg = str(e.value)
    assert "missing in the checkpoint: ['blocks.0.norm1.weight', 'blocks.1.mlp.fc2.bias', 'norm.bias']" in msg
    assert "unexpected in the checkpoint: ['blocks.0.attn.extra_scale', 'head.extra']" in msg
    assert "blocks.0.mlp.fc1.bias (128,)" in msg and "expected (256,)" in msg, msg
    assert "norm.weight (65,)" in msg and "expected (64,)" in msg, msg


def test_head_count_and_activation_checked_against_the_hf_config():
    sd = zeros_timm()
    hf = {f"vit.embeddings.{k}": v for k, v in sd.items() if k == "cls_token"}  # enough for the size check
    with pytest.raises(ConversionError, match=r"num_heads 8.*num_heads 4"):
        deit.import_teacher(hf, "hf", teacher_target(config()), {"num_attention_heads": 8}, num_heads=HEADS)
    with pytest.raises(ConversionError, match="exact GELU"):
        deit.import_teacher(hf, "hf", teacher_target(config()), {"hidden_act": "gelu_new"})


def test_unknown_or_wrong_format(tmp_path):
    with pytest.raises(ValueError, match="unknown checkpoint format 'keras'"):
        deit.import_teacher({}, "keras", teacher_target(config()))
    sd = zeros_timm()
    with pytest.raises(ConversionError, match="fmt='timm'"):
        deit.import_teacher(sd, "hf", teacher_target(config()))
    with pytest.raises(ConversionError, match="fmt='hf'"):
        deit.import_teacher({"vit.embeddings.cls_token": sd["cls_token"]}, "timm", teacher_target(config()))
    # The format, when not given (deit.detect_format is gone): "hf" for a Hugging Face directory (see
    # test_hf_vit_matches_pytorch), else a ViT's first format, timm.
    model = registry.abstract("vit", **config())
    assert weights.formats(model) == deit.FORMATS == ("timm", "hf")
    save_state_dict(sd, tmp_path / "timm.safetensors")
    params = weights.import_pytorch(tmp_path / "timm.safetensors", model)
    expected = deit.import_teacher(sd, "timm", teacher_target(config()), num_heads=HEADS)
    assert flatten(params).keys() == flatten(expected).keys()
    jax.tree.map(np.testing.assert_array_equal, params, expected)
    save_state_dict({"deit.embeddings.cls_token": sd["cls_token"]}, tmp_path / "hf_names.safetensors")
    with pytest.raises(ConversionError, match="fmt='hf'"):  # a weights file: timm, not guessed from the names
        weights.import_pytorch(tmp_path / "hf_names.safetensors", model)
    with pytest.raises(ValueError, match=r"format 'vim' does not fit a ViT; expected one of \('timm', 'hf'\)"):
        weights.import_pytorch(tmp_path / "timm.safetensors", model, "vim")


def test_not_a_square_grid():
    sd = zeros_timm()
    sd["pos_embed"] = np.zeros((1, 1 + 15, DIM), np.float32)
    with pytest.raises(ConversionError, match="square"):
        deit.import_teacher(sd, "timm", teacher_target(config()))


def convert_deit_tiny(src, fmt, out):
    """Runs ``python -m cab_jax.convert --format=FMT --model=deit_tiny`` (32 px, 10 classes) on ``src``: (the
    model's config fields, what it wrote under ``out``, flat)."""
    proc = subprocess.run([sys.executable, "-m", "cab_jax.convert", f"--src={src}", f"--format={fmt}",
                           "--model=deit_tiny", "--image_size=32", "--patch_size=16", "--num_classes=10",
                           f"--out={out}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    c = config(dim=192, depth=12, heads=3, image=32, patch=16, classes=10)
    target = nnx.state(registry.abstract("vit", **c)).to_pure_dict()
    return c, flatten(checkpoint.load_model_params(out, target))


@pytest.mark.slow
def test_command_line_imports_a_timm_deit(tmp_path):
    """README: ``python -m cab_jax.convert --format=timm --model=deit_tiny ... --out=DIR`` writes our checkpoint
    (DeiT-Ti's widths and depth, here at 32 px for 10 classes) holding exactly what the library import gives."""
    rng = np.random.default_rng(0)
    tensors = {name: rng.normal(size=shape).astype(np.float32)
               for name, shape in timm_shapes(192, 12, 10, grid=2, patch=16).items()}
    save_state_dict(tensors, tmp_path / "deit.pth")
    c, loaded = convert_deit_tiny(tmp_path / "deit.pth", "timm", tmp_path / "ours")
    expected = flatten(deit.import_teacher(tensors, "timm", teacher_target(c)))
    assert set(loaded) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(np.asarray(loaded[name]), value, err_msg=name)


@pytest.mark.slow
def test_command_line_imports_a_hugging_face_deit_directory(tmp_path):
    """README: ``python -m cab_jax.convert --src=HF_DIR --format=hf --model=deit_small --out=DIR`` reads a Hugging
    Face ViT directory (config.json + weights; DeiT-Ti's widths and depth here, at 32 px for 10 classes) and writes
    exactly what the library import of that directory gives."""
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, image_size=32,
        patch_size=16, num_labels=10, layer_norm_eps=1e-6, qkv_bias=True))
    hf.save_pretrained(tmp_path / "hf")
    c, loaded = convert_deit_tiny(tmp_path / "hf", "hf", tmp_path / "ours")
    expected = flatten(weights.import_pytorch(tmp_path / "hf", registry.abstract("vit", **c)))
    assert set(loaded) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(np.asarray(loaded[name]), value, err_msg=name)
    q = load_state_dict(tmp_path / "hf")["vit.encoder.layer.5.attention.attention.query.weight"]
    np.testing.assert_array_equal(np.asarray(loaded["blocks.attn.q.kernel"][5]), q.T)


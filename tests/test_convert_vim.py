"""Vim students to and from the original hustvl/Vim PyTorch layout, against a PyTorch reference forward.

The reference below mirrors ``vim/models_mamba.py`` (``VisionMamba`` with RMSNorm, residual in float32, middle
cls token, absolute position embedding, ``bimamba_type="v2"``, ``if_devide_out=True``) and its Mamba mixer
(``mamba_inner_fn_no_out_proj`` on ``xz`` and on ``xz.flip(-1)``), with a sequential selective scan in float64,
so that its ``state_dict()`` carries exactly the original names.
"""

from __future__ import annotations

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from cab_jax.convert import load_state_dict, mapping, save_state_dict
from cab_jax.convert import vim as convert_vim
from cab_jax.convert.mapping import ConversionError, flatten, unflatten
from cab_jax.convert.vim import export_vim, import_vim
from cab_jax.models import registry

EMBED, DEPTH, D_STATE, IMAGE, PATCH, CLASSES = 32, 2, 8, 32, 8, 10


# ----------------------------------------------------------------------------------------------------------------
# PyTorch reference with the original module names.


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def selective_scan(u, delta, A, B, C, D, z, delta_bias):
    """u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l) -> (b, d, l), sequentially (selective_scan_ref)."""
    delta = F.softplus(delta + delta_bias[:, None])
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1) + D[:, None] * u
    return y * F.silu(z)


class Mamba(nn.Module):
    """mamba_simple.Mamba of Vim's mamba-1p1p1 fork (parameters in its registration order)."""

    def __init__(self, d_model: int, d_state: int, d_conv: int = 4, expand: int = 2, bimamba: bool = True):
        super().__init__()
        self.d_inner, self.d_state, self.d_conv = expand * d_model, d_state, d_conv
        self.dt_rank, self.bimamba = math.ceil(d_model / 16), bimamba
        d_inner = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.zeros(d_inner, d_state))
        self.D = nn.Parameter(torch.ones(d_inner))
        if bimamba:
            self.A_b_log = nn.Parameter(torch.zeros(d_inner, d_state))
            self.conv1d_b = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
            self.x_proj_b = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
            self.dt_proj_b = nn.Linear(self.dt_rank, d_inner, bias=True)
            self.D_b = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def _inner(self, xz, conv1d, x_proj, dt_proj, A_log, D):
        """mamba_inner_fn_no_out_proj: xz (b, 2 d_inner, l) -> y (b, d_inner, l), B, C (b, n, l)."""
        x, z = xz.chunk(2, dim=1)
        x = F.silu(conv1d(x)[..., : xz.shape[-1]])
        x_dbl = torch.einsum("bdl,ed->bel", x, x_proj.weight)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=1)
        delta = torch.einsum("brl,dr->bdl", dt, dt_proj.weight)
        return selective_scan(x, delta, -torch.exp(A_log), B, C, D, z, dt_proj.bias), B, C

    def forward(self, hidden):
        xz = torch.einsum("bld,ed->bel", hidden, self.in_proj.weight)
        out, B, C = self._inner(xz, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        self.B, self.C = B.transpose(1, 2), C.transpose(1, 2)  # (b, l, n)
        if self.bimamba:
            out_b, B_b, C_b = self._inner(xz.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b,
                                          self.A_b_log, self.D_b)
            # In the original's scan order (flipped); flipped back to token order to compare with ours.
            self.B_b, self.C_b = B_b.flip(-1).transpose(1, 2), C_b.flip(-1).transpose(1, 2)
            out = (out + out_b.flip(-1)) / 2
        return F.linear(out.transpose(1, 2), self.out_proj.weight)


class Block(nn.Module):
    def __init__(self, dim: int, mixer: Mamba):
        super().__init__()
        self.mixer = mixer
        self.norm = RMSNorm(dim)

    def forward(self, hidden, residual):
        residual = hidden if residual is None else residual + hidden
        return self.mixer(self.norm(residual)), residual


class VisionMamba(nn.Module):
    def __init__(self, img_size=IMAGE, patch_size=PATCH, embed_dim=EMBED, depth=DEPTH, d_state=D_STATE,
                 num_classes=CLASSES, bimamba=True):
        super().__init__()
        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.head = nn.Linear(embed_dim, num_classes)
        self.layers = nn.ModuleList([Block(embed_dim, Mamba(embed_dim, d_state, bimamba=bimamba))
                                     for _ in range(depth)])
        self.norm_f = RMSNorm(embed_dim)

    def forward(self, x):
        x = self.patch_embed(x)
        position = x.shape[1] // 2
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((x[:, :position], cls, x[:, position:]), dim=1) + self.pos_embed
        hidden, residual = x, None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        return self.head(self.norm_f(residual + hidden)[:, position])


def random_reference(bimamba: bool = True, seed: int = 0, **sizes) -> VisionMamba:
    """A reference Vim with every parameter random and away from its init (A_log, D, dt bias, norms too)."""
    torch.manual_seed(seed)
    model = VisionMamba(bimamba=bimamba, **sizes)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape)
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("A_log", "A_b_log"):
                p.copy_(math.log(2.0) + 0.5 * r)  # A = -exp(A_log) in about -(0.7 .. 5)
            elif leaf in ("D", "D_b"):
                p.copy_(1.0 + 0.5 * r)
            elif name.endswith("norm.weight") or name == "norm_f.weight":
                p.copy_(1.0 + 0.2 * r)
            elif name.endswith("dt_proj.bias") or name.endswith("dt_proj_b.bias"):
                p.copy_(-2.0 + 0.5 * r)  # softplus: dt ~ 0.13
            elif name in ("cls_token", "pos_embed"):
                p.copy_(0.5 * r)
            elif p.ndim == 1:
                p.copy_(0.1 * r)
            else:  # weights: unit-variance outputs
                p.copy_(r / math.sqrt(p[0].numel()))
    return model


def config(bidirectional: bool = True, embed_dim: int = EMBED):
    """The fields of our Vim student (for ``registry.build("vim", **config())``), CAB's A init as in the demo."""
    return dict(embed_dim=embed_dim, depth=DEPTH, d_state=D_STATE, d_conv=4, expand=2, patch_size=PATCH,
                img_size=IMAGE, num_classes=CLASSES, bidirectional=bidirectional, a_init="cab", remat=False)


def ours(c):
    """(model, its pure parameter dict (layers stacked), dotted name -> shape)."""
    model = registry.build("vim", **c, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model))
    return model, params, {k: tuple(v.shape) for k, v in flatten(params).items()}


def load_into(model, params):
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def state_dict_numpy(module: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    return random_reference()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_import_matches_reference_forward(reference, tmp_path, suffix):
    path = tmp_path / f"vim{suffix}"
    save_state_dict(state_dict_numpy(reference), path)
    model, _, shapes = ours(config())
    model = load_into(model, import_vim(load_state_dict(path), shapes))

    images = np.random.default_rng(0).normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)
    ref = copy.deepcopy(reference).double()
    with torch.no_grad():
        want = ref(torch.from_numpy(images).permute(0, 3, 1, 2).double()).numpy()
    with jax.default_matmul_precision("highest"):
        logits, projections = model(jnp.asarray(images))
    assert np.abs(want).max() > 0.1  # a forward that actually carries signal
    np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=0)
    for name in ("B", "C", "B_b", "C_b"):  # stacked over layers: (depth, batch, tokens, d_state)
        assert getattr(projections, name).shape == (DEPTH, 2, (IMAGE // PATCH) ** 2 + 1, D_STATE), name
    for i, layer in enumerate(ref.layers):
        for name in ("B", "C", "B_b", "C_b"):
            np.testing.assert_allclose(np.asarray(getattr(projections, name)[i]), getattr(layer.mixer, name).numpy(),
                                       atol=1e-4, rtol=0, err_msg=f"layer {i} {name}")


def test_unidirectional_import_matches_reference_forward():
    reference = random_reference(bimamba=False, seed=1)
    assert not any("_b" in k for k in reference.state_dict())
    model, _, shapes = ours(config(bidirectional=False))
    model = load_into(model, import_vim(state_dict_numpy(reference), shapes))
    images = np.random.default_rng(1).normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)
    ref = copy.deepcopy(reference).double()
    with torch.no_grad():
        want = ref(torch.from_numpy(images).permute(0, 3, 1, 2).double()).numpy()
    with jax.default_matmul_precision("highest"):
        logits, projections = model(jnp.asarray(images))
    np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=0)
    assert projections.B.shape[0] == DEPTH and projections.B_b is None and projections.C_b is None
    np.testing.assert_allclose(np.asarray(projections.B[-1]), ref.layers[-1].mixer.B.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_export_round_trip_and_loads_into_reference(tmp_path, bidirectional):
    _, params, shapes = ours(config(bidirectional=bidirectional))
    exported = export_vim(params)
    reference = VisionMamba(bimamba=bidirectional)
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in exported.items()} == want
    assert all(v.dtype == np.float32 for v in exported.values())

    path = tmp_path / "exported.safetensors"
    save_state_dict(exported, path)
    back = import_vim(load_state_dict(path), shapes)
    flat, flat_back = flatten(params), flatten(back)
    assert flat.keys() == flat_back.keys()
    for k in flat:
        np.testing.assert_array_equal(np.asarray(flat[k]), flat_back[k], err_msg=k)

    reference.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in exported.items()}, strict=True)
    for k, v in reference.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), exported[k], err_msg=k)


def test_export_then_reference_forward_matches_ours(reference):
    """An exported model in the reference computes the same logits as ours (the other direction of parity)."""
    model, params, _ = ours(config())
    # Our init keeps D = 1, the norms at 1 and A_log constant; perturb them so the comparison covers them.
    flat = flatten(params)
    rng = np.random.default_rng(2)
    for k in flat:
        noise = rng.normal(size=flat[k].shape).astype(np.float32)
        if k.endswith(".A_log"):  # from the cab init's A_log = -20 (A ~ 0) to A in about -(0.7 .. 5)
            flat[k] = np.float32(math.log(2.0)) + 0.5 * noise
        elif k.endswith((".D", "dt_proj.bias", "norm.scale", "norm_f.scale")):
            flat[k] = np.asarray(flat[k]) + 0.3 * noise
    params = unflatten(flat)
    model = load_into(model, params)
    ref = VisionMamba()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in export_vim(params).items()}, strict=True)
    images = np.random.default_rng(3).normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref.double()(torch.from_numpy(images).permute(0, 3, 1, 2).double()).numpy()
    with jax.default_matmul_precision("highest"):
        logits, _ = model(jnp.asarray(images))
    np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=0)


def test_wrong_size_names_both():
    big = state_dict_numpy(random_reference(embed_dim=64))
    _, _, shapes = ours(config())
    with pytest.raises(ConversionError, match=r"embed_dim: 64 in the checkpoint, 32 in the model"):
        import_vim(big, shapes)


def test_missing_and_unexpected_keys_are_listed(reference):
    _, _, shapes = ours(config())
    state = state_dict_numpy(reference)
    del state["layers.1.mixer.conv1d_b.weight"]
    state["layers.0.mixer.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as err:
        import_vim(state, shapes)
    assert "layers.1.mixer.conv1d_b.weight" in str(err.value)
    assert "layers.0.mixer.extra.weight" in str(err.value)
    # Export: a tree without its stacked layers is named, not exported as a Vim of depth 0.
    _, params, _ = ours(config())
    with pytest.raises(ConversionError, match="expected stacked layers"):
        export_vim({k: v for k, v in params.items() if k != "layers"})


def test_rope_checkpoint_refused_and_direction_mismatch_named(reference):
    _, _, shapes = ours(config())
    state = state_dict_numpy(reference)
    rope = {**state, "rope.freqs_cos": np.ones((16, 4), np.float32), "rope.freqs_sin": np.zeros((16, 4), np.float32)}
    with pytest.raises(ConversionError, match="if_rope=True"):
        import_vim(rope, shapes)
    _, _, uni_shapes = ours(config(bidirectional=False))
    with pytest.raises(ConversionError, match=r"bidirectional: True in the checkpoint, False in the model"):
        import_vim(state, uni_shapes)


def test_double_cls_token_and_stride_8_checkpoints_are_refused(reference):
    """README: Vim variants our model lacks are refused. Vim's use_double_cls_token checkpoints hold
    cls_token_head / cls_token_tail and two extra positions; a stride-8 patch embedding (same 16 x 16 kernel,
    overlapping patches) shows as more patch positions than the model's grid."""
    _, _, shapes = ours(config())
    state = state_dict_numpy(reference)
    double = {k: v for k, v in state.items() if k != "cls_token"}
    double["cls_token_head"] = double["cls_token_tail"] = state["cls_token"]
    double["pos_embed"] = np.concatenate([state["pos_embed"], state["pos_embed"][:, :1]], axis=1)
    with pytest.raises(ConversionError, match=r"use_double_cls_token=True Vim \(it has \['cls_token_head', "
                                              r"'cls_token_tail'\]\)"):
        import_vim(double, shapes)
    grid = IMAGE // PATCH
    strided = dict(state, pos_embed=np.zeros((1, (2 * grid - 1) ** 2 + 1, EMBED), np.float32))
    with pytest.raises(ConversionError, match=rf"num_patches: {(2 * grid - 1) ** 2} in the checkpoint, "
                                              rf"{grid ** 2} in the model \(.*stride-8"):
        import_vim(strided, shapes)


# ----------------------------------------------------------------------------------------------------------------
# The stacked layout: our models hold layer i of every per-layer parameter at index i of one stacked array.


def test_stack_and_unstack_are_exact_inverses_and_layer_i_is_index_i(reference):
    """``mapping.stack`` / ``unstack`` / ``unstack_shapes`` convert exactly between our stacked parameters and the
    per-layer view the rule tables use, and a converted stacked parameter holds layer i's tensor at index i."""
    _, params, shapes = ours(config())
    flat = flatten(params)
    assert flat["layers.mixer.fwd.A_log"].shape[0] == DEPTH  # the model stacks its layers
    per_layer = mapping.unstack(flat, convert_vim.STACKED)
    assert mapping.unstack_shapes(shapes, convert_vim.STACKED) == {k: v.shape for k, v in per_layer.items()}
    assert not any(k.startswith("layers.") and not k.split(".")[1].isdigit() for k in per_layer)
    for name, value in flat.items():
        if name.startswith("layers."):
            rest = name[len("layers."):]
            for i in range(DEPTH):
                np.testing.assert_array_equal(per_layer[f"layers.{i}.{rest}"], value[i], err_msg=f"{name}[{i}]")
        else:
            np.testing.assert_array_equal(per_layer[name], value, err_msg=name)  # outside the stack: as it was
    restacked = mapping.stack(per_layer, convert_vim.STACKED)
    assert restacked.keys() == flat.keys()
    for name, value in flat.items():
        assert restacked[name].shape == value.shape and restacked[name].dtype == value.dtype, name
        np.testing.assert_array_equal(restacked[name], np.asarray(value), err_msg=name)
    # Per-layer tensors that differ in every layer land in order, whatever order the dict holds them in.
    layers = {f"blocks.{i}.w": np.full((2, 3), i, np.float32) for i in reversed(range(4))}
    stacked = mapping.stack({**layers, "norm.scale": np.ones(3, np.float32)}, ("blocks",))
    assert stacked.keys() == {"blocks.w", "norm.scale"}
    np.testing.assert_array_equal(stacked["blocks.w"], np.arange(4, dtype=np.float32)[:, None, None] * np.ones((2, 3)))
    assert mapping.unstack(stacked, ("blocks",)).keys() == {*layers, "norm.scale"}
    with pytest.raises(ConversionError, match=r"blocks\.w: layers \[0, 2\] are not 0\.\.1"):
        mapping.stack({"blocks.0.w": np.zeros(2), "blocks.2.w": np.zeros(2)}, ("blocks",))

    # Import: every stacked parameter's layer i is the rule's transform of the checkpoint's layer-i tensor.
    state = state_dict_numpy(reference)
    imported = flatten(import_vim(state, shapes))
    assert {k: v.shape for k, v in imported.items()} == shapes
    per_layer = mapping.unstack(imported, convert_vim.STACKED)
    table = convert_vim.rules(DEPTH, True)
    assert {r.ours for r in table} == set(per_layer)
    for rule in table:
        np.testing.assert_array_equal(per_layer[rule.ours], rule.to_ours(state[rule.theirs]), err_msg=rule.ours)
    layer1 = imported["layers.mixer.bwd.conv_kernel"][1]
    np.testing.assert_array_equal(layer1, state["layers.1.mixer.conv1d_b.weight"][:, 0, :].T)
    # Export: layer i of the stack goes to the checkpoint's layer-i names.
    exported = export_vim(params)
    for i in range(DEPTH):
        np.testing.assert_array_equal(exported[f"layers.{i}.mixer.in_proj.weight"],
                                      np.asarray(params["layers"]["mixer"]["in_proj"]["kernel"][i]).T)
        np.testing.assert_array_equal(exported[f"layers.{i}.mixer.A_b_log"],
                                      np.asarray(params["layers"]["mixer"]["bwd"]["A_log"][i]))

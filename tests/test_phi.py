"""Phi teacher: parity with transformers' PhiForCausalLM (logits and every layer's rotated q, k), Hugging Face
import/export, size errors, KV-cache decoding against the full forward, bfloat16.

torch and transformers are imported only by the conversion and parity tests (through ``hf_model`` and
``torch_forward``), which skip without them; the model's own tests (KV cache, bfloat16, remat, phi-1.5's size and
axes) run on randomly perturbed parameters of our Phi and need neither (README: torch is only for the
checkpoint-conversion tests; tests/test_layout.py checks that no test module imports it at module level)."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cab_jax import checkpoint, sharding
from cab_jax.convert import io, mapping, weights
from cab_jax.convert import phi as convert_phi
from cab_jax.convert.mapping import ConversionError
from cab_jax.models import registry
from cab_jax.models.phi import PHI_SIZES, PhiSize

SIZE = PhiSize(vocab_size=97, hidden_size=64, depth=3, num_heads=4, intermediate_size=128)
LENGTH = 37  # awkward: not a multiple of anything
# Jitted once per module (compiled per model dtype and shapes); eager NNX calls are slow on CPU.
forward = nnx.jit(lambda m, t: m(t))
step = nnx.jit(lambda m, t, c: m.decode(t, c))


def hf_model(size: PhiSize = SIZE, seed: int = 0):
    """A random float32 transformers.PhiForCausalLM in eval mode; every parameter perturbed so biases and norms
    matter."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.PhiConfig(
        vocab_size=size.vocab_size, hidden_size=size.hidden_size, num_hidden_layers=size.depth,
        num_attention_heads=size.num_heads, intermediate_size=size.intermediate_size,
        partial_rotary_factor=size.partial_rotary_factor, rope_theta=size.rope_theta,
        layer_norm_eps=size.layer_norm_eps, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.PhiForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def torch_model():
    return hf_model()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, torch_model):
    path = tmp_path_factory.mktemp("phi_hf")
    torch_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, SIZE.vocab_size, (2, LENGTH)).astype(np.int32)


def abstract_target(size: PhiSize) -> dict:
    """Our dotted parameter name -> shape (layers stacked) for a Phi of ``size``."""
    model = registry.abstract("phi", **dataclasses.asdict(size))
    return {k: tuple(v.shape) for k, v in mapping.flatten(nnx.to_pure_dict(nnx.state(model))).items()}


def our_model(params: dict, size: PhiSize = SIZE, dtype=jnp.float32):
    """Our Phi holding ``params`` (built abstractly: no random initialisation)."""
    model = registry.abstract("phi", **dataclasses.asdict(size), dtype=dtype)
    nnx.update(model, jax.tree.map(jnp.asarray, params))
    return model


def torch_forward(model, tokens: np.ndarray) -> tuple[np.ndarray, list]:
    """Logits and each layer's (q, k) of a transformers.PhiForCausalLM as CAB's output_QK gives them: projections
    captured by hooks, then the original's own partial rotary (``apply_rotary_pos_emb`` with the model's cos/sin),
    no 1/sqrt(d) scale."""
    import torch
    from transformers.models.phi import modeling_phi

    captured = {}
    hooks = [getattr(layer.self_attn, name).register_forward_hook(
        lambda mod, inp, out, key=(i, name): captured.__setitem__(key, out))
        for i, layer in enumerate(model.model.layers) for name in ("q_proj", "k_proj")]
    ids = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        logits = model(ids).logits.numpy()
        batch, length = tokens.shape
        cos, sin = model.model.rotary_emb(model.model.embed_tokens(ids), torch.arange(length)[None])
        qks = []
        for i, _ in enumerate(model.model.layers):
            q, k = (captured[i, n].view(batch, length, SIZE.num_heads, -1).transpose(1, 2)
                    for n in ("q_proj", "k_proj"))
            rot = cos.shape[-1]
            q_rot, k_rot = modeling_phi.apply_rotary_pos_emb(q[..., :rot], k[..., :rot], cos, sin)
            qks.append((torch.cat([q_rot, q[..., rot:]], -1).numpy(), torch.cat([k_rot, k[..., rot:]], -1).numpy()))
    for hook in hooks:
        hook.remove()
    return logits, qks


def convert(path) -> dict:
    return convert_phi.import_phi(io.load_state_dict(path), abstract_target(SIZE), io.hf_config(path), size=SIZE)


@pytest.mark.parametrize("serialization", ["safetensors", "bin"])
def test_logits_and_qk_match_transformers(tmp_path, torch_model, hf_dir, tokens, serialization):
    import torch

    path = hf_dir
    if serialization == "bin":  # pytorch_model.bin, read with torch.load(weights_only=True)
        path = tmp_path / "bin"
        path.mkdir()
        (path / "config.json").write_text((hf_dir / "config.json").read_text())
        torch.save(torch_model.state_dict(), path / "pytorch_model.bin")
    logits, qks = forward(our_model(convert(path)), jnp.asarray(tokens))
    want_logits, want_qks = torch_forward(torch_model, tokens)
    assert logits.dtype == jnp.float32 and logits.shape == (2, LENGTH, SIZE.vocab_size)
    np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=0)
    q, k = qks  # stacked over layers
    assert q.shape == k.shape == (SIZE.depth, 2, SIZE.num_heads, LENGTH, SIZE.hidden_size // SIZE.num_heads)
    assert len(want_qks) == SIZE.depth
    for i, (want_q, want_k) in enumerate(want_qks):
        np.testing.assert_allclose(q[i], want_q, atol=1e-5, rtol=0, err_msg=f"layer {i} q")
        np.testing.assert_allclose(k[i], want_k, atol=1e-5, rtol=0, err_msg=f"layer {i} k")


def test_export_round_trip_is_bitwise_and_loads_in_transformers(tmp_path, torch_model, hf_dir, tokens):
    import torch
    import transformers

    params = convert(hf_dir)
    tensors = convert_phi.export_phi(params)
    original = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    assert sorted(tensors) == sorted(original)
    for name, value in tensors.items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)
    again = convert_phi.import_phi(tensors, abstract_target(SIZE), size=SIZE)
    jax.tree.map(np.testing.assert_array_equal, again, params)

    convert_phi.save_hf_dir(params, SIZE, tmp_path / "out")
    reloaded = transformers.PhiForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    with torch.no_grad():
        want = reloaded(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(torch_forward(torch_model, tokens)[0], want, atol=0, rtol=0)


@pytest.mark.parametrize("field, value, expected", [
    ("depth", 2, "differs in depth"), ("hidden_size", 32, "differs in hidden_size"),
    ("num_heads", 8, "differs in num_heads"), ("partial_rotary_factor", 1.0, "differs in partial_rotary_factor")])
def test_wrong_size_names_both_sizes(hf_dir, field, value, expected):
    want = dataclasses.replace(SIZE, **{field: value})
    with pytest.raises(ConversionError, match=expected) as info:
        convert_phi.import_phi(io.load_state_dict(hf_dir), abstract_target(want), io.hf_config(hf_dir), size=want)
    assert f"{field} {getattr(SIZE, field)}" in str(info.value) and f"{field} {value}" in str(info.value)


@pytest.mark.parametrize("change, message", [
    ({"qk_layernorm": True}, "qk_layernorm"), ({"num_key_value_heads": 2}, "grouped-query"),
    ({"hidden_act": "gelu"}, "hidden_act"), ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling")])
def test_unsupported_variants_are_refused(hf_dir, change, message):
    cfg = {**io.hf_config(hf_dir), **change}
    with pytest.raises(ConversionError, match=message):
        convert_phi.import_phi(io.load_state_dict(hf_dir), abstract_target(SIZE), cfg, size=SIZE)


def test_missing_and_legacy_keys_are_reported(hf_dir):
    source = io.load_state_dict(hf_dir)
    partial = {k: v for k, v in source.items() if k != "model.layers.1.mlp.fc2.bias"}
    with pytest.raises(ConversionError, match=r"missing in the checkpoint: \['model.layers.1.mlp.fc2.bias'\]"):
        convert_phi.import_phi(partial, abstract_target(SIZE))
    with pytest.raises(ConversionError, match="MixFormer"):
        convert_phi.import_phi({"layers.0.wte.weight": np.zeros((97, 64), np.float32)}, abstract_target(SIZE))
    # Export: a tree without stacked layers, or with a parameter that has no rule, is named, not a KeyError.
    params = convert(hf_dir)
    with pytest.raises(ConversionError, match=r"expected stacked layers.*got None"):
        convert_phi.export_phi({k: v for k, v in params.items() if k != "layers"})
    per_layer = mapping.unflatten(mapping.unstack(mapping.flatten(params), convert_phi.STACKED))  # not stacked
    with pytest.raises(ConversionError, match=r"expected stacked layers.*got None"):
        convert_phi.export_phi(per_layer)
    extra = {**params, "layers": {**params["layers"], "extra": np.zeros((SIZE.depth, 3), np.float32)}}
    with pytest.raises(ConversionError, match=r"unexpected \['layers.0.extra', 'layers.1.extra', 'layers.2.extra'\]"):
        convert_phi.export_phi(extra)


def test_init_from_hf_dir_through_weights(hf_dir):
    """``teacher.init_from=<HF dir>``: the configured Phi teacher is filled; another model is refused."""
    teacher = registry.abstract("phi", **dataclasses.asdict(SIZE))
    assert weights.formats(teacher) == ("hf",)
    like = nnx.to_pure_dict(nnx.state(our_model(convert(hf_dir))))
    params = weights.load_model_weights(hf_dir, teacher, like)
    jax.tree.map(np.testing.assert_array_equal, params, like)
    source = io.load_state_dict(hf_dir)
    np.testing.assert_array_equal(params["layers"]["attn"]["q"]["kernel"][2],  # layer 2 of the stack
                                  source["model.layers.2.self_attn.q_proj.weight"].T)
    with pytest.raises(ValueError, match="Hugging Face"):
        weights.import_pytorch(hf_dir, teacher, "timm")
    with pytest.raises(ConversionError, match="configured teacher is a Linear"):
        weights.import_pytorch(hf_dir, nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(ConversionError, match="configured teacher is a ViT"):
        weights.import_pytorch(hf_dir, registry.abstract("vit", "tiny", num_classes=10, img_size=32, patch_size=16))


def test_phi_1_5_config_and_logical_axes():
    """microsoft/phi-1_5's config.json (transformers 4.37 style: RoPE fields at the top level, no kv-head count)
    gives our phi_1_5 size; every parameter of that model carries the expected logical axes."""
    hub_config = {"architectures": ["PhiForCausalLM"], "model_type": "phi", "vocab_size": 51200, "hidden_size": 2048,
                  "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
                  "num_key_value_heads": None, "hidden_act": "gelu_new", "layer_norm_eps": 1e-05,
                  "partial_rotary_factor": 0.5, "rope_theta": 10000.0, "rope_scaling": None, "qk_layernorm": False,
                  "tie_word_embeddings": False, "max_position_embeddings": 2048}
    assert convert_phi.size_from_hf_config(hub_config) == PHI_SIZES["phi_1_5"]
    assert registry.size_fields("phi", "phi_1_5") == dataclasses.asdict(PHI_SIZES["phi_1_5"])
    model = registry.abstract("phi", "phi_1_5", depth=2)  # 2 of the 24 layers: fast
    assert model.size == dataclasses.replace(PHI_SIZES["phi_1_5"], depth=2)
    axes = mapping.flatten(sharding.logical_axes(model))
    expected = {"embed.embedding": ("vocab", "embed"), "lm_head.kernel": ("embed", "vocab"), "lm_head.bias": ("vocab",),
                "final_layernorm.scale": ("embed",), "final_layernorm.bias": ("embed",)}
    p, L = "layers", "layers"  # the stacked layers: one parameter each, with a leading "layers" axis
    expected |= {f"{p}.input_layernorm.scale": (L, "embed"), f"{p}.input_layernorm.bias": (L, "embed"),
                 **{f"{p}.attn.{n}.kernel": (L, "embed", "heads") for n in "qkv"},
                 **{f"{p}.attn.{n}.bias": (L, "heads") for n in "qkv"},
                 f"{p}.attn.dense.kernel": (L, "heads", "embed"), f"{p}.attn.dense.bias": (L, "embed"),
                 f"{p}.mlp.fc1.kernel": (L, "embed", "mlp"), f"{p}.mlp.fc1.bias": (L, "mlp"),
                 f"{p}.mlp.fc2.kernel": (L, "mlp", "embed"), f"{p}.mlp.fc2.bias": (L, "embed")}
    assert axes == expected
    shapes = {k: v.shape for k, v in mapping.flatten(nnx.to_pure_dict(nnx.state(model))).items()}
    assert all(shape[0] == 2 for k, shape in shapes.items() if k.startswith("layers."))
    sizes = {k: int(np.prod(shape)) for k, shape in shapes.items()}
    per_layer = sum(n for k, n in sizes.items() if k.startswith("layers.")) // 2
    outside = sum(n for k, n in sizes.items() if not k.startswith("layers."))
    assert outside + 24 * per_layer == 1_418_270_720  # phi-1.5's parameter count (1.42e9 with the untied head)


@pytest.fixture(scope="module")
def params():
    """Our Phi's parameters, each perturbed (as ``hf_model`` perturbs transformers') so biases and norms matter."""
    rng = np.random.default_rng(0)
    built = nnx.to_pure_dict(nnx.state(registry.build("phi", **dataclasses.asdict(SIZE), rngs=nnx.Rngs(0))))
    return jax.tree.map(lambda p: np.asarray(p) + 0.1 * rng.standard_normal(p.shape).astype(np.float32), built)


@pytest.fixture(scope="module")
def model(params):
    return our_model(params)


PROMPT, MAX_LENGTH = 5, LENGTH + 3  # shared by the decoding tests, so each compiles the same two steps


def test_kv_cache_decoding_matches_full_forward(model, tokens):
    full, _ = forward(model, jnp.asarray(tokens))
    empty = model.init_cache(2, MAX_LENGTH)
    head_dim = SIZE.hidden_size // SIZE.num_heads
    assert empty.keys.shape == empty.values.shape == (SIZE.depth, 2, SIZE.num_heads, MAX_LENGTH, head_dim)
    logits, cache = step(model, jnp.asarray(tokens[:, :PROMPT]), empty)
    steps = [logits]
    for i in range(PROMPT, LENGTH):
        logits, cache = step(model, jnp.asarray(tokens[:, i:i + 1]), cache)
        steps.append(logits)
    assert int(cache.length) == LENGTH
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5, rtol=0)


def test_greedy_decoding_with_cache_equals_recomputed_argmax(model, tokens):
    new = 12
    logits, cache = step(model, jnp.asarray(tokens[:, :PROMPT]), model.init_cache(2, MAX_LENGTH))
    cached = tokens[:, :PROMPT]
    for _ in range(new):
        nxt = np.asarray(jnp.argmax(logits[:, -1], axis=-1), np.int32)[:, None]
        cached = np.concatenate([cached, nxt], axis=1)
        logits, cache = step(model, jnp.asarray(nxt), cache)
    # The full forward over the whole sequence so far, each step (zero-padded to one shape: the model is causal,
    # so the padding after position t cannot change the logits at t).
    recomputed = np.zeros((2, LENGTH), np.int32)
    recomputed[:, :PROMPT] = tokens[:, :PROMPT]
    for t in range(PROMPT, PROMPT + new):
        full, _ = forward(model, jnp.asarray(recomputed))
        recomputed[:, t] = np.asarray(jnp.argmax(full[:, t - 1], axis=-1))
    np.testing.assert_array_equal(cached, recomputed[:, :PROMPT + new])


def test_decoding_past_the_cache_is_an_error(model, tokens):
    cache = model.init_cache(2, MAX_LENGTH)
    with pytest.raises(ValueError, match=f"do not fit a KV cache of max_length {MAX_LENGTH}"):
        model.decode(jnp.zeros((2, MAX_LENGTH + 1), jnp.int32), cache)
    cache = dataclasses.replace(cache, length=jnp.int32(MAX_LENGTH - 2))
    with pytest.raises(ValueError, match=rf"positions 38\.\.42 are beyond the KV cache's max_length {MAX_LENGTH}"):
        model.decode(jnp.asarray(tokens[:, :PROMPT]), cache)
    logits, _ = step(model, jnp.asarray(tokens[:, :PROMPT]), cache)
    assert np.isnan(np.asarray(logits)).all()  # under jit the length is not known: NaN logits, not silent garbage


def test_bfloat16_forward_stays_close_to_float32(params, tokens):
    want, want_qks = forward(our_model(params), jnp.asarray(tokens))
    logits, qks = forward(our_model(params, dtype=jnp.bfloat16), jnp.asarray(tokens))
    (q, k), (_, want_k) = qks, want_qks  # stacked over layers
    assert logits.dtype == jnp.float32 and q.dtype == k.dtype == jnp.bfloat16
    scale = float(jnp.abs(want).max())
    # bfloat16 keeps 8 mantissa bits; through 3 layers the logits stay within 5 % of their largest magnitude.
    assert float(jnp.abs(logits - want).max()) <= 0.05 * scale
    np.testing.assert_array_less(jnp.abs(k[-1].astype(jnp.float32) - want_k[-1]),  # the last layer's k
                                 0.05 * float(jnp.abs(want_k[-1]).max()))


def test_cli_import_and_export(tmp_path, hf_dir, torch_model):
    from test_convert_cli import cli_in_process  # a conversion test module: it imports torch

    cli = functools.partial(cli_in_process, "--format=hf", "--model=phi_custom")

    cli(f"--src={hf_dir}", f"--out={tmp_path / 'ours'}")
    assert json.loads((tmp_path / "ours" / "phi_size.json").read_text()) == dataclasses.asdict(SIZE)
    params = checkpoint.load_model_params(tmp_path / "ours", jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, jnp.float32), mapping.unflatten(abstract_target(SIZE)),
        is_leaf=lambda x: isinstance(x, tuple)))
    jax.tree.map(np.testing.assert_array_equal, params, convert(hf_dir))
    cli("--export", f"--src={tmp_path / 'ours'}", f"--out={tmp_path / 'back'}")
    back = io.load_state_dict(tmp_path / "back")
    for name, value in torch_model.state_dict().items():
        np.testing.assert_array_equal(back[name], value.numpy(), err_msg=name)
    assert convert_phi.size_from_hf_config(io.hf_config(tmp_path / "back")) == SIZE


def test_remat_gives_the_same_logits_qk_and_gradients(tokens):
    """``remat`` only changes what the backward pass keeps, never the values."""
    models = [registry.build("phi", **dataclasses.asdict(SIZE), remat=remat, rngs=nnx.Rngs(3))
              for remat in (False, True)]

    def loss(model):
        logits, (q, k) = model(jnp.asarray(tokens))  # q, k stacked: (depth, batch, heads, length, head_dim)
        return jnp.mean(logits**2) + jnp.sum(jnp.mean(q * k, axis=(1, 2, 3, 4)))  # the sum of per-layer means

    (plain, plain_grads), (remat, remat_grads) = [nnx.value_and_grad(loss)(m) for m in models]
    assert float(remat) == pytest.approx(float(plain), rel=1e-6)
    for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(remat_grads), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)

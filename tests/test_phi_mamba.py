"""Phi-Mamba student: the discrete Mamba-2 mixer against a float64 NumPy loop, cached decoding against the full
forward, init from a Phi teacher's attention (an exact linear-attention identity), stacked layers (equal to an
unrolled build; the scanned forward of Phi-Mamba and of the Phi teacher equal to a Python loop over the layers),
dtypes, remat and errors."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_bridge import all_eqns

from cab_jax.models import registry
from cab_jax.models.layers import dense, layer_norm
from cab_jax.models.mamba2 import DiscreteMamba2, Mamba2Cache, torch_linear
from cab_jax.models.phi import Phi, PhiBlock, normal_02
from cab_jax.models.phi_mamba import PhiMamba, PhiMambaBlock, init_from_attention

VOCAB, D_MODEL, DEPTH = 50, 32, 2


def small(**kwargs) -> PhiMamba:
    """Grouped heads (4 value heads read 2 B/C heads), chunk 8 so that test lengths span several chunks."""
    args = dict(vocab_size=VOCAB, d_model=D_MODEL, depth=DEPTH, d_state=8, n_qk_heads=2, n_v_heads=4, chunk_size=8,
                rngs=nnx.Rngs(0))
    return registry.build("phi_mamba", **{**args, **kwargs})


def tokens(batch: int, length: int, seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)


def randomise(module: nnx.Module, seed: int, scale: float = 0.3) -> None:
    """Replace the parameters that init to constants (D, z_bias, norms, biases) by random values (NumPy: no
    per-shape compilation)."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Param) and path[-1] in ("D", "z_bias", "bias", "scale"):
            base = 1.0 if path[-1] in ("D", "scale") else 0.0
            var.set_value(jnp.asarray(base + scale * rng.standard_normal(var[...].shape), var[...].dtype))


forward = nnx.jit(lambda model, toks: model(toks))
decode = nnx.jit(lambda model, toks, cache: model.decode(toks, cache))


def layer(stacked: nnx.Module, i: int) -> nnx.Module:
    """Layer i of stacked layers as a module of its own (every parameter's index i)."""
    graphdef, state = nnx.split(stacked)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x[i], state))


# ------------------------------------------------------------------------------------------ NumPy reference


def silu(v: np.ndarray) -> np.ndarray:
    return v / (1.0 + np.exp(-v))


def mixer_numpy(m: DiscreteMamba2, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The discrete Mamba-2 mixer, token by token and head by head, in float64 from m's parameters."""
    p = lambda v: np.asarray(v[...], np.float64)
    h = np.asarray(hidden, np.float64)
    batch, length, _ = h.shape
    qk = m.n_qk_heads * m.d_state
    proj = h @ p(m.in_proj.kernel)
    xbc, z, a = proj[..., : m.conv_dim], proj[..., m.conv_dim : m.conv_dim + m.d_inner], proj[..., -m.n_v_heads :]
    kernel, conv = p(m.conv_kernel), np.zeros_like(xbc)
    for t in range(length):
        for i in range(m.d_conv):  # tap i multiplies the token d_conv - 1 - i steps back
            if (s := t - (m.d_conv - 1 - i)) >= 0:
                conv[:, t] += xbc[:, s] * kernel[i]
    conv += p(m.conv_bias)
    if m.conv_activation == "silu":
        conv = silu(conv)
    x = conv[..., : m.d_inner].reshape(batch, length, m.n_v_heads, m.head_dim)
    B = conv[..., m.d_inner : m.d_inner + qk].reshape(batch, length, m.n_qk_heads, m.d_state)
    C = conv[..., m.d_inner + qk :].reshape(batch, length, m.n_qk_heads, m.d_state)
    decay = np.exp(-np.log1p(np.exp(a)))  # exp(-softplus(a))
    ratio, D = m.n_v_heads // m.n_qk_heads, p(m.D)
    state = np.zeros((batch, m.n_v_heads, m.head_dim, m.d_state))
    y = np.zeros_like(x)
    for t in range(length):
        for head in range(m.n_v_heads):
            g = head // ratio
            state[:, head] = (decay[:, t, head, None, None] * state[:, head]
                              + x[:, t, head, :, None] * B[:, t, g, None, :])
            y[:, t, head] = np.einsum("bpn,bn->bp", state[:, head], C[:, t, g]) + D[head] * x[:, t, head]
    y = y.reshape(batch, length, m.d_inner) * silu(z + p(m.z_bias))
    return y @ p(m.out_proj.kernel), B, C


@pytest.mark.parametrize("conv_activation,ssd_impl,dtype,expand", [
    ("identity", "chunked", jnp.float32, 1), ("silu", "reference", jnp.float32, 2),
    ("identity", "auto", jnp.bfloat16, 1)])
def test_mixer_matches_numpy(conv_activation, ssd_impl, dtype, expand):
    """4 value heads reading 2 B/C heads (grouped), length 37 with chunks of 16 (two full chunks and a partial one)."""
    mixer = DiscreteMamba2(D_MODEL, d_state=8, n_qk_heads=2, n_v_heads=4, expand=expand, d_conv=4,
                           conv_activation=conv_activation, ssd_impl=ssd_impl, chunk_size=16, dtype=dtype,
                           rngs=nnx.Rngs(3))
    randomise(mixer, seed=4)
    hidden = jnp.asarray(np.random.default_rng(5).standard_normal((2, 37, D_MODEL)), jnp.float32)
    with jax.default_matmul_precision("highest"):  # float32 matmuls (GPUs default to TF32)
        out, B, C = nnx.jit(lambda m, h: m(h))(mixer, hidden)
    want, want_B, want_C = mixer_numpy(mixer, hidden)
    assert out.shape == (2, 37, D_MODEL) and B.shape == C.shape == (2, 37, 2, 8)
    assert out.dtype == B.dtype == dtype
    tol = 1e-4 if dtype == jnp.float32 else 0.03
    for got, ref in ((out, want), (B, want_B), (C, want_C)):
        np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=0, atol=tol * np.max(np.abs(ref)))


@pytest.mark.parametrize("ssd_impl", ["chunked", "reference"])
def test_the_mixer_feeds_x_to_the_scan_as_it_is_not_divided_and_multiplied_by_dt(ssd_impl):
    """README: the mixer computes the decayed update as B x directly, not (x / dt) * dt. The forward pass, the
    prefill and the one-token decoding step divide nothing (no div, no negative power: dt = softplus(a) only enters as
    the decay exp(-dt)); the mixer's values are test_mixer_matches_numpy's."""
    mixer = DiscreteMamba2(D_MODEL, d_state=8, n_qk_heads=2, n_v_heads=4, chunk_size=8, ssd_impl=ssd_impl,
                           rngs=nnx.Rngs(0))
    hidden = jnp.ones((2, 12, D_MODEL))
    cache = mixer.init_cache(2)
    paths = {"forward": jax.make_jaxpr(lambda h: mixer(h))(hidden),
             "prefill": jax.make_jaxpr(lambda h, c: mixer.decode(h, c))(hidden, cache),
             "step": jax.make_jaxpr(lambda h, c: mixer.decode(h, c))(hidden[:, :1], cache)}
    for path, jaxpr in paths.items():
        used = {eqn.primitive.name for eqn in all_eqns(jaxpr.jaxpr)}
        assert {"exp", "dot_general"} <= used and not used & {"div", "pow", "integer_pow", "rsqrt"}, (path, used)


# ----------------------------------------------------------------------------------------------- decoding


def test_decode_matches_full_forward():
    """Prefill pieces of 2 tokens (fewer than the d_conv - 1 cached conv inputs) and 11 and 11 tokens (several
    partial chunks of 8), then one token at a time: every position's logits equal the full forward's."""
    model = small()
    randomise(model, seed=6)
    toks = tokens(2, 30)
    want, _ = forward(model, toks)
    cache = model.init_cache(2, max_length=999)
    got = []
    for start, stop in [(0, 2), (2, 13), (13, 24), *((t, t + 1) for t in range(24, 30))]:
        logits, cache = decode(model, toks[:, start:stop], cache)
        assert logits.shape == (2, stop - start, VOCAB) and logits.dtype == jnp.float32
        got.append(logits)
    np.testing.assert_allclose(np.concatenate(got, axis=1), want, rtol=0, atol=1e-5 * np.max(np.abs(want)))
    # Constant-size cache: the last d_conv - 1 conv inputs and a float32 state per layer, stacked over layers.
    assert isinstance(cache, Mamba2Cache)
    assert cache.conv.shape == (DEPTH, 2, 3, D_MODEL + 2 * 2 * 8) and cache.conv.dtype == jnp.float32
    assert cache.ssm.shape == (DEPTH, 2, 4, 8, 8) and cache.ssm.dtype == jnp.float32
    assert not np.allclose(cache.ssm[0], cache.ssm[1])  # each layer its own state


def test_greedy_decoding_equals_argmax_of_full_forward():
    """Greedy generation with the cache picks, at every step, the argmax of the full forward recomputed over the
    sequence so far (computed on a fixed-length buffer: the model is causal, so the zero tail is invisible)."""
    model = small()
    randomise(model, seed=7)
    prompt, length = tokens(2, 11, seed=8), 30  # the shapes of the test above: no new compilation
    buffer = jnp.zeros((2, length), jnp.int32).at[:, :11].set(prompt)
    logits, cache = decode(model, prompt, model.init_cache(2))
    for t in range(11, length):
        cached_next = jnp.argmax(logits[:, -1], axis=-1)
        full_next = jnp.argmax(forward(model, buffer)[0][:, t - 1], axis=-1)
        np.testing.assert_array_equal(cached_next, full_next)
        buffer = buffer.at[:, t].set(full_next)
        logits, cache = decode(model, full_next[:, None], cache)


# ------------------------------------------------------------------------------------ init from attention


STUDENT = dict(vocab_size=VOCAB, d_model=D_MODEL, depth=DEPTH, d_state=8, n_qk_heads=4, n_v_heads=4,
               intermediate_size=96, chunk_size=8)


@functools.cache
def _teacher_and_student() -> tuple[Phi, PhiMamba]:
    teacher = registry.build("phi", vocab_size=VOCAB, hidden_size=D_MODEL, depth=DEPTH, num_heads=4,
                             intermediate_size=96, rngs=nnx.Rngs(10))
    randomise(teacher, seed=11)
    student = registry.build("phi_mamba", **STUDENT, rngs=nnx.Rngs(12))
    randomise(student, seed=13)
    return teacher, student


def teacher_and_student() -> tuple[Phi, PhiMamba]:
    """A Phi teacher (4 heads of 8) and a student that fits it, with random biases and norms; fresh copies."""
    return tuple(nnx.clone(m) for m in _teacher_and_student())


def test_init_from_attention_copies_bitwise():
    teacher, student = teacher_and_student()
    before = nnx.clone(student)
    init_from_attention(student, teacher)
    eq = lambda a, b: np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))
    eq(student.embed.embedding, teacher.embed.embedding)
    eq(student.lm_head.kernel, teacher.lm_head.kernel)
    eq(student.lm_head.bias, teacher.lm_head.bias)
    eq(student.final_layernorm.scale, teacher.final_layernorm.scale)
    eq(student.final_layernorm.bias, teacher.final_layernorm.bias)
    assert student.layers.mixer.in_proj.kernel.shape[0] == DEPTH
    for i in range(DEPTH):  # layer i: index i of every stacked parameter
        s, t, old = layer(student.layers, i), layer(teacher.layers, i), layer(before.layers, i)
        eq(s.input_layernorm.scale, t.input_layernorm.scale)
        eq(s.input_layernorm.bias, t.input_layernorm.bias)
        for fc in ("fc1", "fc2"):
            eq(getattr(s.mlp, fc).kernel, getattr(t.mlp, fc).kernel)
            eq(getattr(s.mlp, fc).bias, getattr(t.mlp, fc).bias)
        kernel, d = s.mixer.in_proj.kernel[...], D_MODEL
        eq(kernel[:, :d], t.attn.v.kernel)
        eq(kernel[:, d : 2 * d], t.attn.k.kernel)
        eq(kernel[:, 2 * d : 3 * d], t.attn.q.kernel)
        eq(kernel[:, 3 * d :], old.mixer.in_proj.kernel[...][:, 3 * d :])  # z and decay columns keep their init
        eq(s.mixer.out_proj.kernel, t.attn.dense.kernel)
        for name in ("conv_kernel", "conv_bias", "D", "z_bias"):
            eq(getattr(s.mixer, name), getattr(old.mixer, name))
    # The layers differ, so the copy did not put one layer's weights everywhere.
    assert not np.array_equal(student.layers.mlp.fc1.kernel[...][0], student.layers.mlp.fc1.kernel[...][1])
    # Fresh buffers, not shared with the teacher (a donated student must not delete the teacher's weights).
    assert student.embed.embedding[...].unsafe_buffer_pointer() != teacher.embed.embedding[...].unsafe_buffer_pointer()


def test_init_from_attention_without_embeddings_keeps_them():
    teacher, student = teacher_and_student()
    before = nnx.clone(student)
    init_from_attention(student, teacher, embeddings=False)
    for get in (lambda m: m.embed.embedding, lambda m: m.lm_head.kernel, lambda m: m.final_layernorm.scale):
        np.testing.assert_array_equal(get(student)[...], get(before)[...])
    np.testing.assert_array_equal(student.layers.mlp.fc1.kernel[...][1], teacher.layers.mlp.fc1.kernel[...][1])


def test_init_from_attention_mixer_is_decayed_linear_attention_of_the_teacher():
    """After the copy, with the convolution made the identity (last tap 1, others 0, bias 0), D = 0, the decay
    columns of in_proj zeroed (a = 0, so every step decays by exp(-softplus(0)) = 1/2) and the gate made a constant
    (z columns zeroed, z_bias = 1, gate silu(1)), the mixer is, per head h,

        out_t = W_dense^T [ silu(1) * sum_{s<=t} 2^-(t-s) (q_t . k_s) v_s ]_heads

    with q = x W_q, k = x W_k, v = x W_v the teacher's projections of the same input, without their biases and
    without rotary: B_s = k_s and C_t = q_t, so h_t C_t = sum_s 2^-(t-s) v_s (k_s . q_t). The returned B and C are
    the teacher's k and q exactly."""
    teacher, student = teacher_and_student()
    init_from_attention(student, teacher)
    mixer, attn = layer(student.layers, 1).mixer, layer(teacher.layers, 1).attn
    kernel = np.zeros((4, mixer.conv_dim), np.float32)
    kernel[-1] = 1.0
    mixer.conv_kernel.set_value(jnp.asarray(kernel))
    mixer.conv_bias.set_value(jnp.zeros_like(mixer.conv_bias[...]))
    mixer.D.set_value(jnp.zeros_like(mixer.D[...]))
    mixer.z_bias.set_value(jnp.ones_like(mixer.z_bias[...]))
    mixer.in_proj.kernel.set_value(mixer.in_proj.kernel[...].at[:, mixer.conv_dim :].set(0.0))
    x = jnp.asarray(np.random.default_rng(14).standard_normal((2, 13, D_MODEL)), jnp.float32)
    with jax.default_matmul_precision("highest"):
        out, B, C = nnx.jit(lambda m, h: m(h))(mixer, x)

    p = lambda v: np.asarray(v[...], np.float64)
    xs = np.asarray(x, np.float64)
    heads = lambda t: t.reshape(2, 13, 4, 8)
    q, k, v = heads(xs @ p(attn.q.kernel)), heads(xs @ p(attn.k.kernel)), heads(xs @ p(attn.v.kernel))
    t_idx = np.arange(13)
    weight = np.where(t_idx[:, None] >= t_idx[None, :], 0.5 ** (t_idx[:, None] - t_idx[None, :]), 0.0)
    scores = np.einsum("bthd,bshd->bhts", q, k) * weight
    attention = np.einsum("bhts,bshd->bthd", scores, v).reshape(2, 13, D_MODEL)
    want = (attention * silu(1.0)) @ p(attn.dense.kernel)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5 * np.max(np.abs(want)))
    np.testing.assert_allclose(B, k, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(C, q, rtol=1e-5, atol=1e-6)


def test_init_from_attention_rejects_misfits():
    teacher, _ = teacher_and_student()
    student = registry.abstract("phi_mamba", **{**STUDENT, "d_state": 4, "n_qk_heads": 8, "n_v_heads": 8, "depth": 3})
    misfits = (r"depth: student 3, teacher 2.*n_qk_heads / num_heads: student 8, teacher 4.*"
               r"n_v_heads / num_heads: student 8, teacher 4.*d_state / teacher head_dim: student 4, teacher 8")
    with pytest.raises(ValueError, match=misfits):
        init_from_attention(student, teacher)


# ------------------------------------------------------------------------------------------- stacked layers


PHI = dict(vocab_size=VOCAB, hidden_size=D_MODEL, depth=3, num_heads=4, intermediate_size=96)


def unrolled_build(family: str, seed: int) -> tuple[list[nnx.Module], nnx.Linear]:
    """The model's layers built one by one from Rngs(seed) in the model's order of construction (the embedding
    first, each Phi-Mamba mixer before its block's norm and MLP), and the LM head built after them."""
    rngs = nnx.Rngs(seed)
    if family == "phi":
        nnx.Embed(VOCAB, D_MODEL, embedding_init=normal_02, rngs=rngs)
        layers = [PhiBlock(D_MODEL, 4, 96, 4, 10000.0, 1e-5, rngs=rngs, dtype=jnp.float32) for _ in range(3)]
        layer_norm(D_MODEL, 1e-5, rngs=rngs, dtype=jnp.float32)
        return layers, dense(D_MODEL, VOCAB, ("embed", "vocab"), rngs=rngs, kernel_init=normal_02)
    nnx.Embed(VOCAB, D_MODEL, embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
    layers = [PhiMambaBlock(D_MODEL, 4 * D_MODEL, 1e-5,
                            DiscreteMamba2(D_MODEL, d_state=8, n_qk_heads=2, n_v_heads=4, chunk_size=8, rngs=rngs),
                            rngs=rngs, dtype=jnp.float32)
              for _ in range(3)]
    layer_norm(D_MODEL, 1e-5, rngs=rngs, dtype=jnp.float32)
    return layers, torch_linear(D_MODEL, VOCAB, ("embed", "vocab"), rngs=rngs)


@pytest.mark.parametrize("family", ["phi", "phi_mamba"])
def test_stacked_layers_equal_an_unrolled_build(family):
    model = registry.build("phi", **PHI, rngs=nnx.Rngs(4)) if family == "phi" else small(depth=3, rngs=nnx.Rngs(4))
    unrolled, head = unrolled_build(family, seed=4)
    got = {path: v for path, v in nnx.iter_graph(model.layers) if isinstance(v, nnx.Variable)}
    assert len(got) > 10
    for i, module in enumerate(unrolled):
        want = {path: v for path, v in nnx.iter_graph(module) if isinstance(v, nnx.Variable)}
        assert got.keys() == want.keys()
        for path, var in want.items():
            assert got[path][...].shape == (3, *var[...].shape), path
            np.testing.assert_array_equal(got[path][...][i], var[...], err_msg=str((i, path)))
            assert got[path].get_metadata()["logical_axes"] == ("layers", *var.get_metadata()["logical_axes"])
    np.testing.assert_array_equal(model.lm_head.kernel[...], head.kernel[...])  # the same draws after the layers
    np.testing.assert_array_equal(model.lm_head.bias[...], head.bias[...])
    kernels = [v[...] for path, v in got.items() if path[-1] == "kernel"]
    assert kernels and all(not np.array_equal(k[0], k[1]) for k in kernels)  # each layer drew its own


@nnx.jit
def phi_loop(model: Phi, toks: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Phi's forward as a Python loop over its layers (layer i: index i of the stacked parameters)."""
    x, positions = model.embed(toks), jnp.arange(toks.shape[1])
    qs, ks = [], []
    for i in range(model.size.depth):
        block = layer(model.layers, i)
        h = block.input_layernorm(x)
        y, (q, k), _ = block.attn(h, positions)
        x = x + y + block.mlp(h)
        qs.append(q)
        ks.append(k)
    return model.lm_head(model.final_layernorm(x)), (jnp.stack(qs), jnp.stack(ks))


@nnx.jit
def phi_mamba_loop(model: PhiMamba, toks: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Phi-Mamba's forward as a Python loop over its layers."""
    x = model.embed(toks)
    Bs, Cs = [], []
    for i in range(model.depth):
        block = layer(model.layers, i)
        h = block.input_layernorm(x)
        y, B, C = block.mixer(h)
        x = x + y + block.mlp(h)
        Bs.append(B)
        Cs.append(C)
    return model.lm_head(model.final_layernorm(x)), (jnp.stack(Bs), jnp.stack(Cs))


@pytest.mark.parametrize("family", ["phi", "phi_mamba"])
def test_scanned_forward_equals_python_loop(family):
    """Logits and every layer's (q, k) (Phi) or (B, C) (Phi-Mamba), stacked in layer order."""
    if family == "phi":
        model, loop = registry.build("phi", **PHI, rngs=nnx.Rngs(4)), phi_loop
    else:
        model, loop = small(), phi_mamba_loop
    randomise(model, seed=9)
    toks = tokens(2, 30)
    logits, (a, b) = forward(model, toks)
    want_logits, (want_a, want_b) = loop(model, toks)
    assert a.shape[0] == b.shape[0] == want_a.shape[0] and logits.shape == (2, 30, VOCAB)
    scale = np.max(np.abs(want_logits))
    np.testing.assert_allclose(logits, want_logits, rtol=0, atol=1e-5 * scale)
    for got, want in ((a, want_a), (b, want_b)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))
        assert not np.allclose(want[0], want[1])  # the layers' outputs differ: order matters


# ---------------------------------------------------------------------------------- dtypes, remat, errors


def test_bfloat16_forward_close_to_float32_and_decode_close_to_forward():
    toks = tokens(2, 30)
    logits32, bc32 = forward(small(), toks)
    model16 = small(dtype=jnp.bfloat16)
    logits16, bc16 = forward(model16, toks)
    assert logits32.shape == (2, 30, VOCAB) and logits16.dtype == logits32.dtype == jnp.float32
    (B16, C16), (B32, C32) = bc16, bc32
    assert B16.shape == C16.shape == B32.shape == C32.shape == (DEPTH, 2, 30, 2, 8)  # stacked over layers
    assert B16.dtype == C16.dtype == jnp.bfloat16
    # bfloat16 keeps ~3 significant digits per op; 5 % of the largest value bounds its drift over 2 layers.
    for got, want in [(logits16, logits32), *zip(jax.tree.leaves(bc16), jax.tree.leaves(bc32), strict=True)]:
        assert np.all(np.isfinite(np.asarray(got, np.float32)))
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0, atol=0.05 * np.max(np.abs(want)))
    # bfloat16 decoding (chunked prefill from a cached state, then ssd_step) stays as close to the bfloat16 forward.
    cache = model16.init_cache(2)
    assert cache.conv.dtype == jnp.bfloat16 and cache.ssm.dtype == jnp.float32
    assert cache.conv.shape[0] == cache.ssm.shape[0] == DEPTH
    got = []
    for start, stop in [(0, 11), (11, 22), (22, 23), (23, 24)]:
        logits, cache = decode(model16, toks[:, start:stop], cache)
        got.append(logits)
    np.testing.assert_allclose(np.concatenate(got, axis=1), logits16[:, :24], rtol=0,
                               atol=0.05 * np.max(np.abs(logits16)))


def test_remat_same_values_and_gradients():
    toks = tokens(2, 13)

    def loss_fn(model):
        logits, bc = model(toks)
        ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), toks[:, 1:, None], axis=-1))
        B, C = bc  # (depth, batch, length, heads, d_state): the sum over layers of each layer's mean
        return ce + 0.1 * jnp.sum(jnp.mean(B**2, axis=(1, 2, 3, 4)) + jnp.mean(C**2, axis=(1, 2, 3, 4))), logits

    results = []
    for remat in (False, True):
        model = small(depth=1, remat=remat, ssd_impl="reference")  # the reference compiles faster
        randomise(model, seed=15)
        (loss, logits), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model)
        results.append((loss, logits, jax.tree.leaves(grads)))
    (loss0, logits0, g0), (loss1, logits1, g1) = results
    np.testing.assert_allclose(logits1, logits0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
    assert len(g0) == len(g1) > 0 and all(np.max(np.abs(g)) > 0 for g in g0)
    for a, b in zip(g0, g1, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    (dict(d_model=30, n_v_heads=4, n_qk_heads=2), r"d_inner = expand \* d_model = 1 \* 30 = 30 .* n_v_heads 4"),
    (dict(d_model=32, n_v_heads=4, n_qk_heads=3), r"n_v_heads 4 is not a multiple of n_qk_heads 3"),
    (dict(d_model=32, n_v_heads=4, n_qk_heads=2, conv_activation="relu"), r"conv_activation 'relu'"),
    (dict(d_model=32, n_v_heads=4, n_qk_heads=2, ssd_impl="pallas"), r"ssd_impl 'pallas'"),
])
def test_shape_and_option_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small(**kwargs)


def test_bad_tokens_and_cache_raise():
    model = small()
    with pytest.raises(ValueError, match=r"expected integer tokens \(batch, length >= 1\), got float32 \(2, 3\)"):
        model(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"cache has 1 layers, the model 2"):
        model.decode(jnp.zeros((2, 1), jnp.int32), jax.tree.map(lambda c: c[:1], model.init_cache(2)))


def test_every_parameter_has_logical_axes():
    model = small()
    params = list(nnx.iter_graph(model))
    checked = 0
    for path, var in params:
        if isinstance(var, nnx.Param):
            axes = var.get_metadata().get("logical_axes")
            assert axes is not None and len(axes) == var[...].ndim, (path, axes)
            assert (axes[0] == "layers") == (path[0] == "layers"), (path, axes)  # stacked: a leading layer axis
            checked += 1
    assert checked > 10


def test_phi_mamba_1_5_shapes_and_size():
    """The paper's student (24 x 2048, d_state 64, 32 heads): ~1.5 B parameters, in_proj of 2048 -> 8224."""
    size = lambda m: sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
    one, two = (registry.abstract("phi_mamba", "phi_mamba_1_5", depth=d) for d in (1, 2))
    assert one.layers.mixer.in_proj.kernel.shape == (1, 2048, 2 * 2048 + 2 * 32 * 64 + 32)
    assert two.layers.mixer.in_proj.kernel.shape == (2, 2048, 2 * 2048 + 2 * 32 * 64 + 32)
    assert one.layers.mixer.conv_kernel.shape == (1, 4, 2048 + 2 * 32 * 64)
    assert one.layers.mlp.fc1.kernel.shape == (1, 2048, 4 * 2048)
    total = size(one) + 23 * (size(two) - size(one))
    assert 1.4e9 < total < 1.6e9, total

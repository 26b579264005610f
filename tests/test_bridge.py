"""Tests of the attention bridge: layer maps, kernel maps, teacher targets (cls moved to the middle), the bridged
layers' maps stacked (equal to an unrolled build) and the bridge loss on stacked per-layer inputs against a
layer-by-layer float64 NumPy computation written from the method's description."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cab_jax.bridge import AttentionBridge, LayerBridge, apply_kernel_map, layer_map, teacher_targets
from cab_jax.models.mamba import SSMProjections

BATCH, HEADS, HEAD_DIM, TOKENS, D_STATE, HIDDEN = 2, 2, 4, 5, 8, 16
D_TEACHER = HEADS * HEAD_DIM
CLS = TOKENS // 2  # the student's cls position


def f64(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


# ---------------------------------------------------------------------------------------------- layer map


def test_layer_map_proportional():
    assert layer_map(24, 12, "proportional") == tuple(t for i in range(12) for t in (i, i))
    assert layer_map(12, 12, "proportional") == tuple(range(12))
    assert layer_map(4, 12, "proportional") == (0, 3, 6, 9)  # floor(l * T / S)
    assert layer_map(3, 2, "proportional") == (0, 0, 1)


def test_layer_map_last_and_explicit():
    assert layer_map(5, 12, "last") == (11,) * 5
    mapping = layer_map(4, 3, [0, -1, np.int64(2), 2])
    assert mapping == (0, -1, 2, 2)
    assert all(type(g) is int for g in mapping)


@pytest.mark.parametrize(
    "spec,match",
    [
        ([0, 1, 2], "3 entries.*4"),  # wrong length
        ([0, 1, 2, 3], r"\[0, 3\)"),  # teacher layer out of range
        ([0, 1, -2, 2], r"\[0, 3\)"),  # below -1
        ([-1, -1, -1, -1], "at least one layer"),
        ("nearest", "unknown layer map"),
    ],
)
def test_layer_map_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        layer_map(4, 3, spec)


# --------------------------------------------------------------------------------------------- kernel maps


def np_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def random_tokens(seed: int = 0) -> jax.Array:
    return 3.0 * jax.random.normal(jax.random.key(seed), (BATCH, TOKENS, D_TEACHER))


def test_kernel_map_softmax_axes():
    x = random_tokens()
    q = f64(apply_kernel_map(x, "softmax", token_axis=False))
    k = f64(apply_kernel_map(x, "softmax", token_axis=True))
    np.testing.assert_allclose(q.sum(-1), 1.0, rtol=1e-5)  # queries: over features
    np.testing.assert_allclose(k.sum(-2), 1.0, rtol=1e-5)  # keys: over tokens
    np.testing.assert_allclose(q, np_softmax(f64(x), -1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(k, np_softmax(f64(x), -2), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("token_axis", [False, True])
def test_kernel_map_relu_exp_none(token_axis):
    x = random_tokens(1)
    relu = f64(apply_kernel_map(x, "relu", token_axis))
    assert relu.min() >= 0.0 and (relu == 0).any()
    np.testing.assert_array_equal(relu, np.maximum(f64(x), 0.0))
    np.testing.assert_allclose(apply_kernel_map(x, "exp", token_axis), np.exp(f64(x)), rtol=1e-6)
    np.testing.assert_array_equal(apply_kernel_map(x, "none", token_axis), x)


def test_kernel_map_output_is_float32_and_unknown_raises():
    x = random_tokens().astype(jnp.bfloat16)
    for kind in ("softmax", "relu", "exp", "none"):
        assert apply_kernel_map(x, kind, token_axis=True).dtype == jnp.float32
    with pytest.raises(ValueError, match="unknown kernel map"):
        apply_kernel_map(x, "sigmoid", token_axis=False)
    with pytest.raises(ValueError, match="unknown kernel map"):
        AttentionBridge(student_depth=2, teacher_depth=1, d_in=D_STATE, d_teacher=D_TEACHER,
                        kernel_map="sigmoid", rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------------------- teacher targets


def labelled_qk() -> np.ndarray:
    """(batch, heads, tokens, head_dim) whose value encodes its indices: b*1000 + h*100 + n*10 + d."""
    b, h, n, d = np.meshgrid(*(np.arange(s) for s in (BATCH, HEADS, TOKENS, HEAD_DIM)), indexing="ij")
    return (b * 1000 + h * 100 + n * 10 + d).astype(np.float32)


def flatten_np(t: np.ndarray) -> np.ndarray:
    """(batch, heads, tokens, head_dim) -> (batch, tokens, heads*head_dim), feature index h*head_dim + d."""
    out = np.empty((t.shape[0], t.shape[2], t.shape[1] * t.shape[3]), t.dtype)
    for h in range(t.shape[1]):
        out[:, :, h * t.shape[3]:(h + 1) * t.shape[3]] = t[:, h]
    return out


@pytest.mark.parametrize("cls_position", [0, CLS, TOKENS - 1])
def test_teacher_targets_move_cls_and_keep_order(cls_position):
    q = labelled_qk()
    k = q + 0.5
    tq, tk = teacher_targets(jnp.asarray(q), jnp.asarray(k), "none", cls_position)
    assert tq.shape == tk.shape == (BATCH, TOKENS, D_TEACHER)
    for target, src in ((tq, q), (tk, k)):
        flat = flatten_np(src)
        np.testing.assert_array_equal(flat, src.transpose(0, 2, 1, 3).reshape(BATCH, TOKENS, D_TEACHER))
        target = np.asarray(target)
        np.testing.assert_array_equal(target[:, cls_position], flat[:, 0])  # the teacher's cls token
        others = np.delete(np.arange(TOKENS), cls_position)
        np.testing.assert_array_equal(target[:, others], flat[:, 1:])  # patches in their original order


def test_teacher_targets_apply_the_kernel_map_per_role():
    key_q, key_k = jax.random.split(jax.random.key(3))
    q = jax.random.normal(key_q, (BATCH, HEADS, TOKENS, HEAD_DIM))
    k = jax.random.normal(key_k, (BATCH, HEADS, TOKENS, HEAD_DIM))
    tq, tk = teacher_targets(q, k, "softmax", CLS)
    np.testing.assert_allclose(f64(tq).sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(f64(tk).sum(-2), 1.0, rtol=1e-5)
    assert not np.allclose(f64(tq).sum(-2), 1.0)


# --------------------------------------------------------------------------------------------- bridge loss


def np_net(net, x: np.ndarray, j: int) -> np.ndarray:
    """Bridged layer j's BridgeNet (index j of each stacked parameter of ``net``) in NumPy: Linear, then (the
    attention form) h += softmax(q k^T / sqrt(width)) v with q, k, v = Linear(SiLU(h)) per example, then (SiLU,
    Linear) for each further layer."""
    first, *rest = net.layers
    h = x @ f64(first.kernel[...])[j] + f64(first.bias[...])[j]
    if net.attention is not None:
        a = h / (1.0 + np.exp(-h))
        q, k, v = np.split(a @ f64(net.attention.kernel[...])[j] + f64(net.attention.bias[...])[j], 3, axis=-1)
        for b in range(h.shape[0]):
            h[b] = h[b] + np_softmax(q[b] @ k[b].T / np.sqrt(q.shape[-1]), -1) @ v[b]
    for layer in rest:
        h = h / (1.0 + np.exp(-h))  # SiLU
        h = h @ f64(layer.kernel[...])[j] + f64(layer.bias[...])[j]
    return h


def np_targets(t: np.ndarray, kernel_map: str, role: str, cls_position: int) -> np.ndarray:
    flat = t.transpose(0, 2, 1, 3).reshape(t.shape[0], t.shape[2], -1)
    order = [*range(1, cls_position + 1), 0, *range(cls_position + 1, t.shape[2])]
    flat = flat[:, order]
    if kernel_map == "softmax":
        return np_softmax(flat, -1 if role == "q" else -2)
    return {"relu": lambda v: np.maximum(v, 0.0), "exp": np.exp, "none": lambda v: v}[kernel_map](flat)


def np_bridge_loss(bridge: AttentionBridge, mapping, projections, teacher_qk, kernel_map, cls_position):
    """Layer by layer: student layer l with teacher layer g = mapping[l] >= 0 uses the j-th stacked set of maps,
    j counting the bridged layers before l; the loss is the mean over bridged layers."""
    mse = lambda a, b: np.mean((a - b) ** 2)
    nets = bridge.layers
    q_all, k_all = f64(teacher_qk[0]), f64(teacher_qk[1])
    losses = []
    for layer, g in enumerate(mapping):
        if g < 0:
            continue
        j = len(losses)
        B, C = f64(projections.B[layer]), f64(projections.C[layer])
        q = np_targets(q_all[g], kernel_map, "q", cls_position)
        k = np_targets(k_all[g], kernel_map, "k", cls_position)
        loss = mse(np_net(nets.b_to_k, B, j), k) + mse(np_net(nets.c_to_q, C, j), q)
        if projections.B_b is not None:
            loss += mse(np_net(nets.b_to_k_b, f64(projections.B_b[layer]), j), k)
            loss += mse(np_net(nets.c_to_q_b, f64(projections.C_b[layer]), j), q)
        losses.append(loss)
    return np.mean(losses)


def random_inputs(student_depth: int, teacher_depth: int, bidirectional: bool = True, tokens: int = TOKENS,
                  seed: int = 0) -> tuple[SSMProjections, tuple[jax.Array, jax.Array]]:
    """Stacked student projections, each (student_depth, batch, tokens, d_state), and stacked teacher (q, k),
    each (teacher_depth, batch, heads, tokens, head_dim). Layer l's values are scaled by l + 1, so that a layer
    paired with the wrong maps or targets changes the loss markedly."""
    keys = iter(jax.random.split(jax.random.key(seed), 6))
    shape = (student_depth, BATCH, tokens, D_STATE)
    scale = jnp.arange(1.0, student_depth + 1.0)[:, None, None, None]
    b, c, b_b, c_b = (scale * jax.random.normal(next(keys), shape) for _ in range(4))
    projections = SSMProjections(b, c, b_b, c_b) if bidirectional else SSMProjections(b, c)
    qk_shape = (teacher_depth, BATCH, HEADS, TOKENS, HEAD_DIM)
    scale = jnp.arange(1.0, teacher_depth + 1.0)[:, None, None, None, None]
    q, k = (scale * jax.random.normal(next(keys), qk_shape) for _ in range(2))
    return projections, (q, k)


def layer_slice(projections: SSMProjections, index) -> SSMProjections:
    return jax.tree.map(lambda t: t[index], projections)


def make_bridge(student_depth, teacher_depth, **kw) -> AttentionBridge:
    seed = kw.pop("seed", 0)
    return AttentionBridge(student_depth=student_depth, teacher_depth=teacher_depth, d_in=D_STATE,
                           d_teacher=D_TEACHER, hidden=HIDDEN, rngs=nnx.Rngs(seed), **kw)


def randomise(bridge: AttentionBridge, seed: int = 1) -> AttentionBridge:
    """Kernels N(0, 1/fan_in) and biases N(0, 0.25) in place of the init (std 0.02 kernels, zero biases, whose
    near-zero outputs would leave the loss nearly the targets' mean square, whatever the maps and inputs)."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(bridge):
        if isinstance(var, nnx.Param):
            scale = var.shape[-2] ** -0.5 if path[-1] == "kernel" else 0.5
            var.set_value(jnp.asarray(scale * rng.standard_normal(var.shape), jnp.float32))
    return bridge


@pytest.mark.parametrize(
    "kind,kernel_map,bidirectional,layers,mapping",
    [
        ("mlp", "softmax", True, "proportional", (0, 0, 1, 1)),  # every teacher layer taught twice
        ("linear", "none", True, "proportional", (0, 0, 1, 1)),
        ("mlp", "exp", False, "last", (1, 1, 1, 1)),
        ("mlp", "relu", True, [1, -1, 0, -1], (1, -1, 0, -1)),  # skips layers, teacher layers out of order
        ("mlp", "softmax", True, [-1, 1, 1, 0], (-1, 1, 1, 0)),  # skips the first, reuses a teacher layer
        ("mlp", "none", True, "first", (0, 1, -1, -1)),  # first-aligned: layers past the teacher's unbridged
        ("mlp", "relu", True, "every_other", (0, -1, 1, -1)),
        ("mlp2", "softmax", True, "proportional", (0, 0, 1, 1)),  # two hidden layers
        ("mlp3", "none", False, "proportional", (0, 0, 1, 1)),
        ("attention", "softmax", True, "proportional", (0, 0, 1, 1)),
    ],
)
def test_bridge_loss_matches_numpy(kind, kernel_map, bidirectional, layers, mapping):
    hidden_layers = int(kind[3:] or 1) if kind.startswith("mlp") else 1
    bridge = randomise(make_bridge(4, 2, kind=kind[:3] if kind.startswith("mlp") else kind, kernel_map=kernel_map,
                                   bidirectional=bidirectional, layers=layers, hidden_layers=hidden_layers))
    assert len(bridge.layers.b_to_k.layers) == (1 if kind == "linear" else hidden_layers + 1)
    assert (bridge.layers.b_to_k.attention is not None) == (kind == "attention")
    projections, teacher_qk = random_inputs(4, 2, bidirectional)
    assert bridge.mapping == mapping
    assert bridge.student_layers == tuple(i for i, g in enumerate(mapping) if g >= 0)
    loss = bridge(projections, teacher_qk, CLS)
    assert loss.shape == () and loss.dtype == jnp.float32
    expected = np_bridge_loss(bridge, mapping, projections, teacher_qk, kernel_map, CLS)
    np.testing.assert_allclose(loss, expected, rtol=2e-5)
    # The comparison above tells pairings apart: each student layer's projections with another layer's maps, or
    # with another teacher layer's targets, give a loss further off than 10x its tolerance.
    roll = lambda tree: jax.tree.map(lambda t: jnp.roll(t, 1, axis=0), tree)
    for other in (np_bridge_loss(bridge, mapping, roll(projections), teacher_qk, kernel_map, CLS),
                  np_bridge_loss(bridge, mapping, projections, roll(teacher_qk), kernel_map, CLS)):
        assert abs(other - expected) > 2e-4 * expected


@pytest.mark.parametrize("layers", ["proportional", [1, -1, 0, -1]])
def test_stacked_bridge_equals_an_unrolled_build(layers):
    """The bridged layers' maps, stacked, are those of LayerBridges built one by one from the same Rngs, one per
    bridged student layer (none for a skipped one), with "layers" in front of their logical axes."""
    bridge = make_bridge(4, 2, layers=layers, seed=3)
    rngs = nnx.Rngs(3)
    unrolled = [LayerBridge(D_STATE, D_TEACHER, HIDDEN, "mlp", True, rngs=rngs) for _ in bridge.student_layers]
    assert len(unrolled) == (4 if layers == "proportional" else 2)
    got = {path: v for path, v in nnx.iter_graph(bridge.layers) if isinstance(v, nnx.Variable)}
    assert len(got) == 4 * 2 * 2  # four maps of two linear layers with kernel and bias
    for i, module in enumerate(unrolled):
        want = {path: v for path, v in nnx.iter_graph(module) if isinstance(v, nnx.Variable)}
        assert got.keys() == want.keys()
        for path, var in want.items():
            assert got[path][...].shape == (len(unrolled), *var[...].shape)
            np.testing.assert_array_equal(got[path][...][i], var[...], err_msg=str((i, path)))
            assert got[path].get_metadata()["logical_axes"] == ("layers", *var.get_metadata()["logical_axes"])
    assert not np.array_equal(got[("b_to_k", "layers", 0, "kernel")][...][0],
                              got[("b_to_k", "layers", 0, "kernel")][...][1])


def test_bridge_skips_unmapped_layers():
    bridge = make_bridge(4, 2, layers=[1, -1, 0, -1], kernel_map="none")
    assert bridge.student_layers == (0, 2)  # maps only for the bridged layers
    assert bridge.layers.b_to_k.layers[0].kernel.shape == (2, D_STATE, HIDDEN)
    projections, teacher_qk = random_inputs(4, 2)
    loss = bridge(projections, teacher_qk, CLS)
    # Changing a skipped layer's projections changes nothing; changing a bridged one does.
    changed = jax.tree.map(lambda t: t.at[1].add(5.0), projections)
    np.testing.assert_array_equal(bridge(changed, teacher_qk, CLS), loss)
    changed = jax.tree.map(lambda t: t.at[2].add(5.0), changed)
    assert abs(float(bridge(changed, teacher_qk, CLS)) - float(loss)) > 1e-3
    # Likewise for a teacher layer no student layer learns (teacher layer 1 of a 3-layer teacher here).
    bridge = make_bridge(4, 3, layers=[0, -1, 2, 2], kernel_map="none")
    projections, (q, k) = random_inputs(4, 3)
    loss = bridge(projections, (q, k), CLS)
    np.testing.assert_array_equal(bridge(projections, (q.at[1].add(5.0), k.at[1].add(5.0)), CLS), loss)
    assert abs(float(bridge(projections, (q.at[2].add(5.0), k), CLS)) - float(loss)) > 1e-3


def test_bridge_kinds_and_shapes():
    mlp = make_bridge(2, 2, kind="mlp").layers
    linear = make_bridge(2, 2, kind="linear").layers
    for net in (mlp.b_to_k, mlp.c_to_q, mlp.b_to_k_b, mlp.c_to_q_b):  # stacked over the 2 bridged layers
        assert [layer.kernel.shape for layer in net.layers] == [(2, D_STATE, HIDDEN), (2, HIDDEN, D_TEACHER)]
    for net in (linear.b_to_k, linear.c_to_q, linear.b_to_k_b, linear.c_to_q_b):
        assert [layer.kernel.shape for layer in net.layers] == [(2, D_STATE, D_TEACHER)]
    uni = make_bridge(2, 2, bidirectional=False).layers
    assert uni.b_to_k_b is None and uni.c_to_q_b is None
    with pytest.raises(ValueError, match="unknown bridge kind"):
        make_bridge(2, 2, kind="transformer")


def test_only_the_attention_form_looks_at_other_tokens():
    """A bridge's prediction for token t: the MLP's depends on token t's projections alone, the attention form's on
    every token's (a change at one token moves every token's prediction)."""
    projections, _ = random_inputs(1, 1)
    x = projections.B[0]
    moved = x.at[:, 3].add(1.0)
    for kind, others_move in (("mlp", False), ("attention", True)):
        net = randomise(make_bridge(1, 1, kind=kind)).layers.b_to_k
        one = nnx.merge(*nnx.split(jax.tree.map(lambda v: v[0], net)))  # the stacked maps of the one layer
        change = jnp.abs(one(moved) - one(x)).max(axis=-1)  # (batch, tokens)
        assert bool(jnp.all(change[:, 3] > 1e-3))
        assert bool(jnp.all(jnp.delete(change, 3, axis=1) > 1e-6)) == others_move, kind


def test_bridge_shape_errors():
    bridge = make_bridge(4, 2)
    projections, teacher_qk = random_inputs(4, 2, tokens=TOKENS + 1)
    with pytest.raises(ValueError, match="tokens"):
        bridge(projections, teacher_qk, CLS)
    projections, teacher_qk = random_inputs(4, 2)
    with pytest.raises(ValueError, match="4 student layers, got 3"):
        bridge(layer_slice(projections, slice(0, 3)), teacher_qk, CLS)
    # A teacher of another depth (a dynamic index past the end would silently read its last layer).
    for depth in (1, 3):
        _, other = random_inputs(4, depth)
        with pytest.raises(ValueError, match=f"teacher of 2 layers, got \\(q, k\\) of {depth} and {depth} layers"):
            bridge(projections, other, CLS)


def test_bridge_takes_numpy_inputs():
    """Host arrays (as a data pipeline or a test gives them) give the same loss as device arrays."""
    bridge = make_bridge(4, 2, layers=[1, -1, 0, 0])
    projections, (q, k) = random_inputs(4, 2)
    loss = bridge(projections, (q, k), CLS)
    host = jax.tree.map(np.asarray, projections)
    np.testing.assert_array_equal(bridge(host, (np.asarray(q), np.asarray(k)), CLS), loss)


def test_bridge_gradients():
    bridge = make_bridge(4, 2, layers=[1, -1, 0, 0])
    projections, teacher_qk = random_inputs(4, 2)

    grads = jax.grad(lambda p: bridge(p, teacher_qk, CLS))(projections)
    for layer in range(4):
        norms = [float(jnp.max(jnp.abs(t[layer]))) for t in grads]
        if layer == 1:
            assert norms == [0.0] * 4  # skipped layer
        else:
            assert all(n > 0 for n in norms)  # B, C, B_b and C_b all receive a gradient

    param_grads = nnx.grad(lambda b: b(projections, teacher_qk, CLS))(bridge)
    leaves = jax.tree.leaves(param_grads)
    # Every bridged layer's maps (index j of every stacked parameter) receive a gradient.
    assert leaves and all(float(jnp.max(jnp.abs(g[j]))) > 0 for g in leaves for j in range(3))


def jnp_bridge_loss(params: dict, mapping, projections, teacher_qk, kernel_map, cls_position, bidirectional=True):
    """``np_bridge_loss`` in jnp on a pure-dict of the stacked maps, differentiable by plain autodiff: the
    reference for the bridge's fused gradients."""

    def net(p, x, j):
        first, *rest = (p["layers"][i] for i in sorted(p["layers"]))
        h = x.reshape(*x.shape[:2], -1) @ first["kernel"][j] + first["bias"][j]
        for layer in rest:
            h = jax.nn.silu(h) @ layer["kernel"][j] + layer["bias"][j]
        return h

    mse = lambda a, b: jnp.mean((a - b) ** 2)
    losses = []
    for layer, g in enumerate(mapping):
        if g < 0:
            continue
        j = len(losses)
        q, k = teacher_targets(teacher_qk[0][g], teacher_qk[1][g], kernel_map, cls_position)
        loss = mse(net(params["b_to_k"], projections.B[layer], j), k) + mse(net(params["c_to_q"],
                                                                            projections.C[layer], j), q)
        if bidirectional:
            loss += mse(net(params["b_to_k_b"], projections.B_b[layer], j), k)
            loss += mse(net(params["c_to_q_b"], projections.C_b[layer], j), q)
        losses.append(loss)
    return jnp.mean(jnp.stack(losses))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("layers,bidirectional", [("proportional", True), ([1, -1, 0, 0], True),
                                                  ([-1, 1, 1, 0], False)])
def test_bridge_gradients_equal_plain_autodiff(dtype, layers, bidirectional):
    """The bridge computes each layer's gradients in its forward pass and only scales them in the backward one;
    they must equal plain autodiff of the same loss, w.r.t. the maps and the projections, scaled by the
    cotangent (the loss weight), also under jit and for bfloat16 projections."""
    bridge = randomise(make_bridge(4, 2, layers=layers, bidirectional=bidirectional))
    projections, teacher_qk = random_inputs(4, 2, bidirectional)
    projections = jax.tree.map(lambda t: t.astype(dtype), projections)
    graphdef, state = nnx.split(bridge)
    params = state.to_pure_dict()

    def ours(params, projections):
        s = jax.tree.map(lambda x: x, state)
        nnx.replace_by_pure_dict(s, params)
        return 3.0 * nnx.merge(graphdef, s)(projections, teacher_qk, CLS)

    reference = lambda params, projections: 3.0 * jnp_bridge_loss(
        params["layers"], bridge.mapping, jax.tree.map(lambda t: t.astype(jnp.float32), projections), teacher_qk,
        bridge.kernel_map, CLS, bidirectional)
    (loss, grads), (ref_loss, ref_grads) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, projections)
                                            for f in (ours, reference))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    flat, ref_flat = jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)
    assert len(flat) == len(ref_flat)
    for (path, g), r in zip(flat, ref_flat, strict=True):
        assert g.dtype == r.dtype, jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=tol,
                                   atol=tol * float(jnp.max(jnp.abs(r.astype(jnp.float32)))),
                                   err_msg=jax.tree_util.keystr(path))


def test_bridge_gradients_match_finite_differences():
    """Directional derivatives of the bridge loss (w.r.t. the maps and the projections together, along random
    directions of unit norm) from its gradients equal central differences of the loss itself (the bridge computes
    in float32: a step of 1e-3 keeps both truncation and rounding errors well below the tolerance)."""
    bridge = randomise(make_bridge(3, 2, layers=[1, -1, 0]))
    projections, teacher_qk = random_inputs(3, 2)
    graphdef, state = nnx.split(bridge)
    params = state.to_pure_dict()

    def loss(params, projections):
        s = jax.tree.map(lambda x: x, state)
        nnx.replace_by_pure_dict(s, params)
        return nnx.merge(graphdef, s)(projections, teacher_qk, CLS)

    def moved(direction, eps):
        return jax.tree.map(lambda x, v: x + eps * v, (params, projections), direction)

    def unit(tree):
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))
        return jax.tree.map(lambda x: x / norm, tree)

    grads = jax.grad(loss, argnums=(0, 1))(params, projections)
    rng = np.random.default_rng(0)
    for _ in range(3):  # half along the gradient (a derivative well above rounding), half random
        noise = unit(jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), grads))
        direction = unit(jax.tree.map(jnp.add, unit(grads), noise))
        eps = 1e-3
        numeric = (loss(*moved(direction, eps)) - loss(*moved(direction, -eps))) / (2 * eps)
        analytic = sum(jnp.sum(g * v) for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(direction),
                                                      strict=True))
        np.testing.assert_allclose(analytic, numeric, rtol=5e-3)


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_a_bfloat16_bridge_computes_in_bfloat16_from_float32_parameters(kind):
    """dtype=bfloat16 (a bfloat16 run's bridge): float32 parameters, every matrix product in bfloat16, and the
    float32 loss and gradients of the float32 bridge with the same parameters to bfloat16 precision."""
    bridges = {dt: randomise(make_bridge(4, 2, kind=kind, dtype=dt)) for dt in (jnp.float32, jnp.bfloat16)}
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bridges[jnp.bfloat16], nnx.Param)))
    projections, teacher_qk = random_inputs(4, 2)
    projections = jax.tree.map(lambda t: t.astype(jnp.bfloat16), projections)

    def value_and_grads(bridge):
        graphdef, state = nnx.split(bridge)
        loss = lambda s, p: nnx.merge(graphdef, s)(p, teacher_qk, CLS)
        return jax.value_and_grad(loss, argnums=(0, 1))(state, projections), jax.make_jaxpr(loss)(state, projections)

    (loss16, grads16), jaxpr = value_and_grads(bridges[jnp.bfloat16])
    (loss32, grads32), _ = value_and_grads(bridges[jnp.float32])
    dots = [e for e in all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
    assert loss16.dtype == jnp.float32
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
    for g16, g32 in zip(jax.tree.leaves(grads16), jax.tree.leaves(grads32), strict=True):
        scale = float(jnp.max(jnp.abs(g32.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(g16, np.float32), np.asarray(g32, np.float32), atol=5e-2 * scale)


def all_eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in it."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from all_eqns(sub)

"""Attention bridge: maps the student's selective-SSM projections onto the teacher's attention keys/queries and
returns the bridge loss.

Per bridged student layer l with teacher layer g(l), four small networks map B -> K, B_b -> K, C -> Q and
C_b -> Q, token by token (the mixer returns both directions' projections in token order). Targets are the
teacher's pre-softmax q, k flattened over heads, passed through a kernel map, and with the teacher's cls
token (index 0) moved to the student's middle position. The language student (Phi-Mamba) is causal and has
no cls token: two maps per layer (B -> K, C -> Q) from its per-head B, C flattened over heads, and no token move.
The bridged layers' networks are stacked and applied with one scan over layers.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cab_jax.models.layers import build_stacked, dense
from cab_jax.models.mamba import SSMProjections

BRIDGE_KINDS = ("mlp", "linear", "attention")
KERNEL_MAPS = ("softmax", "relu", "exp", "none")
LAYER_MAPS = ("proportional", "last", "first", "every_other")


def layer_map(student_depth: int, teacher_depth: int, spec: str | Sequence[int]) -> tuple[int, ...]:
    """Teacher layer for each student layer; -1 leaves a student layer unbridged.

    "proportional": g(l) = floor(l * T / S) (24 student layers <- 12 teacher layers: two per teacher layer);
    "last": every student layer learns the teacher's last layer; "first": student layer l learns teacher layer l
    (first-aligned; student layers past the teacher's depth are not bridged); "every_other": the proportional map
    on the even student layers only; a sequence gives g explicitly.
    """
    if isinstance(spec, str):
        proportional = tuple(i * teacher_depth // student_depth for i in range(student_depth))
        if spec == "proportional":
            return proportional
        if spec == "last":
            return (teacher_depth - 1,) * student_depth
        if spec == "first":
            return tuple(i if i < teacher_depth else -1 for i in range(student_depth))
        if spec == "every_other":
            return tuple(g if i % 2 == 0 else -1 for i, g in enumerate(proportional))
        raise ValueError(f"unknown layer map {spec!r}; expected one of {LAYER_MAPS} or a list of ints")
    mapping = tuple(int(g) for g in spec)
    if len(mapping) != student_depth:
        raise ValueError(f"explicit layer map has {len(mapping)} entries, expected one per student layer "
                         f"({student_depth})")
    if any(g < -1 or g >= teacher_depth for g in mapping) or all(g == -1 for g in mapping):
        raise ValueError(f"explicit layer map {mapping} must hold teacher layers in [0, {teacher_depth}) "
                         "or -1 (skip), and bridge at least one layer")
    return mapping


def apply_kernel_map(x: jax.Array, kind: str, token_axis: bool) -> jax.Array:
    """Feature map of linear attention, in float32. softmax normalises over tokens for keys
    (``token_axis=True``) and over features for queries."""
    x = x.astype(jnp.float32)
    if kind == "softmax":
        return jax.nn.softmax(x, axis=-2 if token_axis else -1)
    if kind == "relu":
        return jax.nn.relu(x)
    if kind == "exp":
        return jnp.exp(x)
    if kind == "none":
        return x
    raise ValueError(f"unknown kernel map {kind!r}; expected one of {KERNEL_MAPS}")


def move_cls_token(x: jax.Array, cls_position: int, axes: Sequence[int]) -> jax.Array:
    """``x`` with the DeiT teacher's cls token (index 0 along each of ``axes``) moved to ``cls_position``, the
    patches in order around it: the teacher's token order -> Vim's (cls in the middle)."""
    for axis in axes:
        x = jnp.moveaxis(x, axis, 0)
        x = jnp.moveaxis(jnp.concatenate([x[1 : cls_position + 1], x[:1], x[cls_position + 1 :]]), 0, axis)
    return x


def teacher_targets(q: jax.Array, k: jax.Array, kernel_map: str, cls_position: int | None
                    ) -> tuple[jax.Array, jax.Array]:
    """(batch, heads, tokens, head_dim) q, k -> kernel-mapped (batch, tokens, heads*head_dim) targets with
    the cls token moved from index 0 to ``cls_position`` (None: tokens stay in place)."""

    def flatten(t: jax.Array) -> jax.Array:
        b, h, n, d = t.shape
        t = t.transpose(0, 2, 1, 3).reshape(b, n, h * d)
        return t if cls_position is None else move_cls_token(t, cls_position, axes=(1,))

    return (apply_kernel_map(flatten(q), kernel_map, token_axis=False),
            apply_kernel_map(flatten(k), kernel_map, token_axis=True))


class BridgeNet(nnx.Module):
    """student width -> hidden -> SiLU -> ... -> teacher width, with ``hidden_layers`` hidden layers of width
    ``hidden`` (``kind="mlp"``; CAB's is one), or one linear map (``kind="linear"``), or (``kind="attention"``) the
    one-hidden-layer MLP with one single-head self-attention layer over the tokens (width ``hidden``, a residual
    add) after its hidden layer: a map that sees the other tokens, where the others see one token at a time.
    Parameters are float32; ``dtype`` is the compute dtype (the model's: bfloat16 runs the maps in bfloat16)."""

    def __init__(self, d_in: int, d_out: int, hidden: int, kind: str, *, rngs: nnx.Rngs, hidden_layers: int = 1,
                 dtype: jnp.dtype = jnp.float32):
        if kind not in BRIDGE_KINDS:
            raise ValueError(f"unknown bridge kind {kind!r}; expected one of {BRIDGE_KINDS}")
        linear = functools.partial(dense, rngs=rngs, dtype=dtype)
        self.attention = linear(hidden, 3 * hidden, ("embed", None)) if kind == "attention" else None
        if kind == "attention":
            self.layers = nnx.List([linear(d_in, hidden, (None, "embed")), linear(hidden, d_out, ("embed", "heads"))])
        elif kind == "mlp":
            if hidden_layers < 1:
                raise ValueError(f"an mlp bridge needs at least one hidden layer, got hidden_layers={hidden_layers}")
            self.layers = nnx.List([linear(d_in, hidden, (None, "embed"))]
                                   + [linear(hidden, hidden, (None, "embed")) for _ in range(hidden_layers - 1)]
                                   + [linear(hidden, d_out, ("embed", "heads"))])
        else:
            self.layers = nnx.List([linear(d_in, d_out, (None, "heads"))])

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (batch, tokens, ...) -> (batch, tokens, d_out) in the compute dtype."""
        x = self.layers[0](x.reshape(*x.shape[:2], -1))  # per-head inputs flattened; the layer casts to its dtype
        if self.attention is not None:
            q, k, v = jnp.split(self.attention(jax.nn.silu(x)), 3, axis=-1)
            scores = jnp.einsum("bsd,btd->bst", q, k).astype(jnp.float32) / np.sqrt(q.shape[-1])
            x = x + jnp.einsum("bst,btd->bsd", jax.nn.softmax(scores, axis=-1).astype(v.dtype), v)
        for layer in self.layers[1:]:
            x = layer(jax.nn.silu(x))
        return x


class LayerBridge(nnx.Module):
    """The four maps of one student layer: B -> K, B_b -> K, C -> Q, C_b -> Q."""

    def __init__(self, d_in: int, d_teacher: int, hidden: int, kind: str, bidirectional: bool, *,
                 rngs: nnx.Rngs, hidden_layers: int = 1, dtype: jnp.dtype = jnp.float32):
        make = lambda: BridgeNet(d_in, d_teacher, hidden, kind, rngs=rngs, hidden_layers=hidden_layers, dtype=dtype)
        self.b_to_k, self.c_to_q = make(), make()
        self.b_to_k_b, self.c_to_q_b = (make(), make()) if bidirectional else (None, None)


def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))


def _layer_loss(bridge: LayerBridge, proj: SSMProjections, targets: tuple[jax.Array, jax.Array]) -> jax.Array:
    """The sum of one layer's (up to) four MSEs."""
    q, k = targets
    loss = mse(bridge.b_to_k(proj.B), k) + mse(bridge.c_to_q(proj.C), q)
    if bridge.b_to_k_b is not None:
        loss += mse(bridge.b_to_k_b(proj.B_b), k) + mse(bridge.c_to_q_b(proj.C_b), q)
    return loss


def _scan_bridged_layers(graphdef: nnx.GraphDef, state: nnx.State, projections: SSMProjections,
                         targets: tuple[jax.Array, jax.Array], teacher_layers: jax.Array, with_grads: bool):
    """Every bridged layer's loss (and, ``with_grads``, its gradients w.r.t. the layer's maps and projections)
    in one scan over the stacked maps; layer l learns ``targets[teacher_layers[l]]``."""

    def loss(layer_state, proj, g):
        return _layer_loss(nnx.merge(graphdef, layer_state), proj, (targets[0][g], targets[1][g]))

    def body(_, inputs):
        if with_grads:
            value, grads = jax.value_and_grad(loss, argnums=(0, 1))(*inputs)
            return None, (value, grads)
        return None, loss(*inputs)

    return jax.lax.scan(body, None, (state, projections, teacher_layers))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bridge_loss(graphdef: nnx.GraphDef, state: nnx.State, projections: SSMProjections,
                 targets: tuple[jax.Array, jax.Array], teacher_layers: jax.Array) -> jax.Array:
    """Mean over bridged layers of ``_layer_loss``. Its gradients are computed layer by layer in the forward
    pass (the loss is a plain mean of independent layer terms), so the backward pass only scales them: nothing
    of a layer (targets, hidden activations, predictions) is kept or recomputed for later."""
    return jnp.mean(_scan_bridged_layers(graphdef, state, projections, targets, teacher_layers, False))


def _bridge_loss_fwd(graphdef, state, projections, targets, teacher_layers):
    losses, (d_state, d_projections) = _scan_bridged_layers(graphdef, state, projections, targets, teacher_layers,
                                                             True)
    scale = 1.0 / losses.shape[0]
    return jnp.mean(losses), jax.tree.map(lambda g: g * scale, (d_state, d_projections))


def _bridge_loss_bwd(graphdef, grads, g):
    d_state, d_projections = jax.tree.map(lambda x: (x * g).astype(x.dtype), grads)
    return d_state, d_projections, None, None


_bridge_loss.defvjp(_bridge_loss_fwd, _bridge_loss_bwd)


class AttentionBridge(nnx.Module):
    """The bridged layers' maps (stacked) plus the student->teacher layer map; ``__call__`` returns the bridge
    loss.

    ``d_in``: the student's B/C width (d_state for Vim, n_qk_heads * d_state for Phi-Mamba); ``dtype``: the maps'
    compute dtype (parameters, targets and the squared errors stay float32)."""

    def __init__(
        self,
        *,
        student_depth: int,
        teacher_depth: int,
        d_in: int,
        d_teacher: int,
        hidden: int = 128,
        kind: str = "mlp",
        kernel_map: str = "softmax",
        layers: str | Sequence[int] = "proportional",
        bidirectional: bool = True,
        hidden_layers: int = 1,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        apply_kernel_map(jnp.zeros((1, 1)), kernel_map, token_axis=False)  # validates the name early
        self.kernel_map, self.teacher_depth = kernel_map, teacher_depth
        self.mapping = layer_map(student_depth, teacher_depth, layers)
        self.student_layers = tuple(i for i, g in enumerate(self.mapping) if g >= 0)  # the bridged ones
        self.layers = build_stacked(
            lambda r: LayerBridge(d_in, d_teacher, hidden, kind, bidirectional, rngs=r, hidden_layers=hidden_layers,
                                  dtype=dtype),
            len(self.student_layers), rngs)

    def __call__(self, projections: SSMProjections, teacher_qk: tuple[jax.Array, jax.Array],
                 cls_position: int | None) -> jax.Array:
        """Mean over bridged layers of the sum of the (up to) four MSEs.

        projections: the student's B, C (and B_b, C_b), each (student depth, batch, tokens, ...);
        teacher_qk: (q, k), each (teacher depth, batch, heads, tokens, head_dim)."""
        if projections.B.shape[0] != len(self.mapping):
            raise ValueError(f"bridge built for {len(self.mapping)} student layers, got {projections.B.shape[0]}")
        q_all, k_all = jnp.asarray(teacher_qk[0]), jnp.asarray(teacher_qk[1])  # NumPy arrays take no traced index
        if q_all.shape[0] != self.teacher_depth or k_all.shape[0] != self.teacher_depth:
            # Checked here: indexing a traced layer past the end would silently read the teacher's last layer.
            raise ValueError(f"bridge built for a teacher of {self.teacher_depth} layers, got (q, k) of "
                             f"{q_all.shape[0]} and {k_all.shape[0]} layers")
        if q_all.shape[-2] != projections.B.shape[2]:
            raise ValueError(f"teacher has {q_all.shape[-2]} tokens but the student {projections.B.shape[2]}: the "
                             "image and patch sizes must give both the same token count")
        if len(self.student_layers) < len(self.mapping):  # some layers are not bridged
            projections = jax.tree.map(lambda x: x[np.asarray(self.student_layers)], projections)
        teacher_layers = jnp.asarray([self.mapping[i] for i in self.student_layers], jnp.int32)
        # Each teacher layer's targets once, also where several student layers learn the same teacher layer.
        targets = jax.vmap(lambda q, k: teacher_targets(q, k, self.kernel_map, cls_position))(q_all, k_all)
        graphdef, state = nnx.split(self.layers)
        return _bridge_loss(graphdef, state, projections, targets, teacher_layers)

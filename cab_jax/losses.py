"""Loss terms of both domains (soft-target and token cross-entropy, temperature KL, top-k) and the weights each
loss mode gives them."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cab_jax.bridge import move_cls_token
from cab_jax.models.layers import attention_weights

# One vocabulary for both domains: vanilla (labels only), soft (soft distillation), cab (soft + bridge), and the
# baseline CAB argues against, attention_transfer (soft + the student's implicit attention matched to the teacher's).
LOSS_MODES = ("vanilla", "soft", "cab", "attention_transfer")
# Earlier names of the language modes, still accepted.
MODE_ALIASES = {"ce": "vanilla", "kl": "soft"}


@dataclasses.dataclass(frozen=True)
class LossWeights:
    ce: float
    kl: float
    bridge: float
    attention: float = 0.0

    @property
    def needs_teacher(self) -> bool:
        return self.kl > 0 or self.bridge > 0 or self.attention > 0


# Vision (the original's main_vit2vim): vanilla = CE; soft = KL(teacher || student); cab ("softdistill") =
# KL + 3 x bridge.
VISION_MODE_WEIGHTS = {
    "vanilla": LossWeights(ce=1.0, kl=0.0, bridge=0.0),
    "soft": LossWeights(ce=0.0, kl=1.0, bridge=0.0),
    "cab": LossWeights(ce=0.0, kl=1.0, bridge=3.0),
    "attention_transfer": LossWeights(ce=0.0, kl=1.0, bridge=0.0, attention=3.0),  # CAB's weight, for the map term
}


# Language (the original's kd_trainer): vanilla = CE; soft = CE + KL; cab ("distill") = CE + 0.5 KL + 0.5 bridge.
LANGUAGE_MODE_WEIGHTS = {
    "vanilla": LossWeights(ce=1.0, kl=0.0, bridge=0.0),
    "soft": LossWeights(ce=1.0, kl=1.0, bridge=0.0),
    "cab": LossWeights(ce=1.0, kl=0.5, bridge=0.5),
    "attention_transfer": LossWeights(ce=1.0, kl=0.5, bridge=0.0, attention=0.5),
}


def canonical_mode(mode: str) -> str:
    """``mode`` in the one vocabulary (an earlier name such as "kl" becomes "soft", with a warning); ValueError
    when unknown."""
    if mode in MODE_ALIASES:
        logging.warning("loss mode %r is now called %r (both domains use vanilla/soft/cab); running %r.", mode,
                        MODE_ALIASES[mode], MODE_ALIASES[mode])
        mode = MODE_ALIASES[mode]
    if mode not in LOSS_MODES:
        raise ValueError(f"unknown loss mode {mode!r}; expected one of {LOSS_MODES} (or the earlier names "
                         f"{', '.join(f'{old!r} for {new!r}' for old, new in MODE_ALIASES.items())})")
    return mode


def loss_weights(mode: str, table: dict[str, LossWeights], ce: float | None = None, kl: float | None = None,
                 bridge: float | None = None, attention: float | None = None) -> LossWeights:
    """The weights ``table`` gives ``mode`` (or its earlier name), each replaced by the explicit value where one
    is given."""
    base = table[canonical_mode(mode)]
    return LossWeights(ce=base.ce if ce is None else ce, kl=base.kl if kl is None else kl,
                       bridge=base.bridge if bridge is None else bridge,
                       attention=base.attention if attention is None else attention)


def attention_transfer(student_maps: jax.Array, teacher_qk: tuple[jax.Array, jax.Array], mapping: Sequence[int],
                       cls_position: int | None, causal: bool) -> jax.Array:
    """Attention transfer: the mean squared difference between each bridged student layer's implicit attention
    (``student_maps``: (student depth, batch, tokens, tokens)) and the softmax attention, averaged over heads, of
    its teacher layer ``mapping[l]`` (``teacher_qk``: q, k each (teacher depth, batch, heads, tokens, head_dim));
    mean over layers and entries. Squared error, not a divergence: the implicit attention is signed and its rows
    do not sum to one."""
    teacher = attention_weights(*teacher_qk, causal=causal).mean(axis=2)  # (teacher depth, batch, tokens, tokens)
    if cls_position is not None:
        teacher = move_cls_token(teacher, cls_position, axes=(-2, -1))
    bridged = [layer for layer, g in enumerate(mapping) if g >= 0]
    student = student_maps[np.asarray(bridged)].astype(jnp.float32)
    return jnp.mean(jnp.square(student - teacher[np.asarray([mapping[layer] for layer in bridged])]))


def smooth_labels(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """Integer labels -> one-hot targets with ``smoothing`` spread uniformly over all classes (timm style)."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over the batch of -sum_c targets_c log softmax(logits)_c."""
    return jnp.mean(-jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1))


def kl_divergence(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """KL(teacher || student) of the temperature-softened distributions, summed over classes, averaged over
    the batch ("batchmean") and scaled by T^2 so gradients keep their size across temperatures."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
    return jnp.mean(jnp.sum(jnp.exp(t) * (t - s), axis=-1)) * temperature**2


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Per example, 1.0 where the label is among the k largest logits."""
    top = jax.lax.top_k(logits, k)[1]
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-position negative log-likelihood: logits (batch, length, vocab), targets (batch, length) int."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Next-token cross-entropy averaged over the positions where ``mask`` (batch, length) is 1."""
    return _masked_mean(token_nll(logits, targets), mask)


def token_kl_divergence(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array,
                        temperature: float = 1.0) -> jax.Array:
    """Per-token KL(teacher || student) averaged over the positions where ``mask`` is 1 (times T^2).

    The original (torchtune's ForwardKLLoss) drops the teacher-entropy term, which has no gradient; this is the
    true KL, so its value is that loss minus the teacher's mean entropy and its gradients are the same."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
    return _masked_mean(jnp.sum(jnp.exp(t) * (t - s), axis=-1), mask) * temperature**2

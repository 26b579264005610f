"""Distillation losses: soft-target cross-entropy, temperature KL, and the per-mode loss weights."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

LOSS_MODES = ("vanilla", "soft", "cab")


@dataclasses.dataclass(frozen=True)
class LossWeights:
    ce: float
    kl: float
    bridge: float

    @property
    def needs_teacher(self) -> bool:
        return self.kl > 0 or self.bridge > 0


# The original's modes: vanilla = CE; soft = KL(teacher || student); cab ("softdistill") = KL + 3 x bridge.
MODE_WEIGHTS = {
    "vanilla": LossWeights(ce=1.0, kl=0.0, bridge=0.0),
    "soft": LossWeights(ce=0.0, kl=1.0, bridge=0.0),
    "cab": LossWeights(ce=0.0, kl=1.0, bridge=3.0),
}


def loss_weights(mode: str, ce: float | None = None, kl: float | None = None,
                 bridge: float | None = None) -> LossWeights:
    """The mode's weights, each replaced by the explicit value where one is given."""
    if mode not in MODE_WEIGHTS:
        raise ValueError(f"unknown loss mode {mode!r}; expected one of {LOSS_MODES}")
    base = MODE_WEIGHTS[mode]
    return LossWeights(ce=base.ce if ce is None else ce, kl=base.kl if kl is None else kl,
                       bridge=base.bridge if bridge is None else bridge)


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

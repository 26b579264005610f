"""The two domains behind one interface (:class:`Domain`): which models, data and losses a run uses, how a batch
becomes inputs and targets, what the bridge sees, and the eval metrics.

``VisionDomain``: DeiT teacher -> Vim student, image classification. ``LanguageDomain``: Phi teacher -> Phi-Mamba
student, next-token prediction. :func:`for_config` picks one from ``config.domain``; its ``job`` says what one
training run trains (the student by distillation, or the teacher on labels), decided once from ``config.task``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cab_jax.bridge import AttentionBridge, layer_map
from cab_jax.kernels.selective_scan import BlockSizes
from cab_jax.losses import (
    LANGUAGE_MODE_WEIGHTS,
    VISION_MODE_WEIGHTS,
    LossWeights,
    kl_divergence,
    loss_weights,
    smooth_labels,
    soft_cross_entropy,
    token_cross_entropy,
    token_kl_divergence,
    token_nll,
    topk_correct,
)
from cab_jax.models import registry
from cab_jax.models.mamba import SSMProjections
from cab_jax.models.phi_mamba import init_from_attention

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ModelFactory = Callable[[nnx.Rngs], nnx.Module]


@dataclasses.dataclass(frozen=True)
class Job:
    """What one training run trains and how, decided once from ``config.task``."""

    trains: str  # "teacher" or "student": the config section of the trained model (for logs and run_config.json)
    model: ModelFactory  # builds the trained model
    train: ml_collections.ConfigDict  # its optimisation and loop settings
    data: ml_collections.ConfigDict  # its data settings
    weights: LossWeights
    drop_path: bool  # whether the forward pass draws stochastic-depth masks
    init_from: str  # weights to start from ("": the model's initialisation)
    teacher: ModelFactory | None = None  # the frozen teacher, when the loss or the initialisation needs it
    bridge: ModelFactory | None = None  # the attention bridge, when the loss has a bridge term
    init_from_teacher: Callable[[nnx.Module, nnx.Module], None] | None = None  # student <- teacher, in place


class Domain(Protocol):
    """What the trainer needs from a domain."""

    c: ml_collections.ConfigDict
    data: ModuleType  # ``cab_jax.data.images`` or ``cab_jax.data.text``: train_size, train_iterator, eval_batches

    def job(self) -> Job: ...

    def build_teacher(self, rngs: nnx.Rngs) -> nnx.Module: ...

    def build_student(self, rngs: nnx.Rngs) -> nnx.Module: ...

    def prepare(self, key: jax.Array, batch: dict, train: ml_collections.ConfigDict) -> tuple[jax.Array, Any]:
        """A train batch -> (model inputs, targets)."""

    def forward(self, model: nnx.Module, inputs: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, Any]:
        """(logits, what the model exposes for the bridge)."""

    def ce(self, logits: jax.Array, targets: Any) -> jax.Array: ...

    def kl(self, logits: jax.Array, teacher_logits: jax.Array, targets: Any, temperature: float) -> jax.Array: ...

    def bridge_inputs(self, aux: Any) -> SSMProjections: ...

    def cls_position(self, student: nnx.Module) -> int | None: ...

    def train_metrics(self, logits: jax.Array, targets: Any) -> dict[str, jax.Array]: ...

    def eval_inputs(self, batch: dict) -> jax.Array: ...

    def train_batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The shapes and dtypes of a global train batch of ``batch_size`` examples, as the data yields it."""

    def eval_sums(self, logits: jax.Array, batch: dict) -> dict[str, jax.Array]: ...

    def summarize(self, totals: Mapping[str, Any]) -> dict[str, float]: ...

    def throughput(self, examples_per_s: float) -> dict[str, float]: ...


def for_config(c: ml_collections.ConfigDict) -> Domain:
    return LanguageDomain(c) if c.domain == "language" else VisionDomain(c)


def mix_batch(key: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int,
              t: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
    """timm-style batch Mixup/CutMix with label smoothing: the batch is mixed with its reverse; with both
    enabled, CutMix is chosen with probability ``mixup_switch_prob``. Returns images and soft targets."""
    targets = smooth_labels(labels, num_classes, t.label_smoothing)
    if t.mixup_prob == 0 or (t.mixup_alpha == 0 and t.cutmix_alpha == 0):
        return images, targets
    k_apply, k_switch, k_mix, k_cut, k_y, k_x = jax.random.split(key, 6)
    flipped = images[::-1]
    lam_mix = jax.random.beta(k_mix, t.mixup_alpha, t.mixup_alpha) if t.mixup_alpha > 0 else 1.0
    mixed = lam_mix * images + (1.0 - lam_mix) * flipped

    height, width = images.shape[1:3]
    lam_cut = jax.random.beta(k_cut, t.cutmix_alpha, t.cutmix_alpha) if t.cutmix_alpha > 0 else 1.0
    ratio = jnp.sqrt(1.0 - lam_cut)
    cy, cx = jax.random.randint(k_y, (), 0, height), jax.random.randint(k_x, (), 0, width)
    half_h, half_w = (height * ratio / 2).astype(jnp.int32), (width * ratio / 2).astype(jnp.int32)
    y0, y1 = jnp.clip(cy - half_h, 0, height), jnp.clip(cy + half_h, 0, height)
    x0, x1 = jnp.clip(cx - half_w, 0, width), jnp.clip(cx + half_w, 0, width)
    ys, xs = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    box = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    cut = jnp.where(box[None, :, :, None], flipped, images)
    lam_cut = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)  # the area actually pasted

    if t.cutmix_alpha > 0 and t.mixup_alpha > 0:
        use_cut = jax.random.uniform(k_switch) < t.mixup_switch_prob
    else:
        use_cut = jnp.asarray(t.cutmix_alpha > 0)
    apply = jax.random.uniform(k_apply) < t.mixup_prob
    lam = jnp.where(apply, jnp.where(use_cut, lam_cut, lam_mix), 1.0)
    images = jnp.where(apply, jnp.where(use_cut, cut, mixed), images)
    return images.astype(flipped.dtype), lam * targets + (1.0 - lam) * targets[::-1]


def _bridge_layers(b: ml_collections.ConfigDict) -> str | tuple[int, ...]:
    return tuple(b.layers) if b.layer_map == "explicit" else b.layer_map


def bridge_layer_map(c: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The teacher layer of each student layer under ``c.bridge`` (-1: unbridged)."""
    return layer_map(c.student.depth, c.teacher.depth, _bridge_layers(c.bridge))


@dataclasses.dataclass(frozen=True)
class VisionDomain:
    """Image classification: Mixup/CutMix soft targets, batchmean KL, top-1/top-5."""

    c: ml_collections.ConfigDict

    @property
    def data(self) -> ModuleType:
        from cab_jax.data import images

        return images

    def job(self) -> Job:
        c = self.c
        if c.task == "train_teacher":  # supervised, on the whole train split
            data = ml_collections.ConfigDict(c.data.to_dict())
            data.subset_fraction = 1.0
            return Job("teacher", self.build_teacher, c.teacher.train, data, VISION_MODE_WEIGHTS["vanilla"],
                       drop_path=c.teacher.drop_path > 0, init_from="")
        weights = loss_weights(c.loss.mode, VISION_MODE_WEIGHTS, c.loss.ce_weight, c.loss.kl_weight,
                               c.loss.bridge_weight, c.loss.get("attention_weight"))
        return Job("student", self.build_student, c.train, c.data, weights, drop_path=c.student.drop_path > 0,
                   init_from=c.student.init_from, teacher=self.build_teacher if weights.needs_teacher else None,
                   bridge=self.build_bridge if weights.bridge > 0 else None)

    def build_teacher(self, rngs: nnx.Rngs) -> nnx.Module:
        c, t = self.c, self.c.teacher
        return registry.build(t.model, num_classes=c.data.num_classes, img_size=c.data.image_size,
                              patch_size=t.patch_size, embed_dim=t.embed_dim, depth=t.depth, num_heads=t.num_heads,
                              mlp_ratio=t.mlp_ratio, drop_path_rate=t.drop_path, dtype=DTYPES[c.dtype], rngs=rngs)

    def build_student(self, rngs: nnx.Rngs) -> nnx.Module:
        c, s = self.c, self.c.student
        return registry.build(s.model, num_classes=c.data.num_classes, img_size=c.data.image_size,
                              patch_size=s.patch_size, embed_dim=s.embed_dim, depth=s.depth, d_state=s.d_state,
                              d_conv=s.d_conv, expand=s.expand, bidirectional=s.bidirectional, a_init=s.a_init,
                              scan_impl=s.scan_impl, drop_path_rate=s.drop_path, remat=s.remat,
                              remat_policy=s.get("remat_policy", "full"),
                              scan_blocks=BlockSizes.parse(s.scan_blocks) if s.scan_blocks else None,
                              dtype=DTYPES[c.dtype], rngs=rngs)

    def build_bridge(self, rngs: nnx.Rngs) -> AttentionBridge:
        c, b = self.c, self.c.bridge
        return AttentionBridge(
            student_depth=c.student.depth, teacher_depth=c.teacher.depth, d_in=c.student.d_state,
            d_teacher=c.teacher.embed_dim, hidden=b.hidden, kind=b.kind, kernel_map=b.kernel_map,
            hidden_layers=b.get("hidden_layers", 1), layers=_bridge_layers(b), bidirectional=c.student.bidirectional,
            dtype=DTYPES[c.dtype], rngs=rngs)

    def prepare(self, key: jax.Array, batch: dict, train: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
        return mix_batch(key, batch["image"], batch["label"], self.c.data.num_classes, train)

    def forward(self, model: nnx.Module, inputs: jax.Array, key: jax.Array | None = None):
        return model(inputs, key=key)

    def ce(self, logits: jax.Array, targets: jax.Array) -> jax.Array:
        return soft_cross_entropy(logits, targets)

    def kl(self, logits: jax.Array, teacher_logits: jax.Array, targets: jax.Array, temperature: float) -> jax.Array:
        return kl_divergence(logits, teacher_logits, temperature)

    def bridge_inputs(self, aux: SSMProjections) -> SSMProjections:
        return aux

    def cls_position(self, student: nnx.Module) -> int | None:
        return student.cls_position

    def train_metrics(self, logits: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
        return {"train_top1": jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1))}

    def train_batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        size = self.c.data.image_size
        return {"image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
                "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

    def eval_inputs(self, batch: dict) -> jax.Array:
        return batch["image"]

    def eval_sums(self, logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
        mask, labels = batch["mask"], batch["label"]
        k = min(5, self.c.data.num_classes)
        return {"top1": jnp.sum(topk_correct(logits, labels, 1) * mask),
                "top5": jnp.sum(topk_correct(logits, labels, k) * mask), "count": jnp.sum(mask)}

    def summarize(self, totals: Mapping[str, Any]) -> dict[str, float]:
        count = float(totals["count"])
        return {"top1": 100.0 * float(totals["top1"]) / count, "top5": 100.0 * float(totals["top5"]) / count,
                "eval_examples": int(count)}

    def throughput(self, examples_per_s: float) -> dict[str, float]:
        return {"images_per_s": examples_per_s}


@dataclasses.dataclass(frozen=True)
class LanguageDomain:
    """Next-token prediction: masked token CE and KL, per-layer (B, C) -> (K, Q) bridges, held-out perplexity."""

    c: ml_collections.ConfigDict

    @property
    def data(self) -> ModuleType:
        from cab_jax.data import text

        return text

    def job(self) -> Job:
        c, s = self.c, self.c.student
        if c.task == "train_teacher":
            return Job("teacher", self.build_teacher, c.teacher.train, c.data, LANGUAGE_MODE_WEIGHTS["vanilla"],
                       drop_path=False, init_from="")
        weights = loss_weights(c.loss.mode, LANGUAGE_MODE_WEIGHTS, c.loss.ce_weight, c.loss.kl_weight,
                               c.loss.bridge_weight, c.loss.get("attention_weight"))
        attention_init = s.init_from_attention and not s.init_from  # given weights win
        return Job("student", self.build_student, c.train, c.data, weights, drop_path=False, init_from=s.init_from,
                   teacher=self.build_teacher if weights.needs_teacher or attention_init else None,
                   bridge=self.build_bridge if weights.bridge > 0 else None,
                   init_from_teacher=init_from_attention if attention_init else None)

    def build_teacher(self, rngs: nnx.Rngs) -> nnx.Module:
        t = self.c.teacher
        return registry.build(t.model, vocab_size=t.vocab_size, hidden_size=t.hidden_size, depth=t.depth,
                              num_heads=t.num_heads, intermediate_size=t.intermediate_size,
                              partial_rotary_factor=t.partial_rotary_factor, rope_theta=t.rope_theta,
                              layer_norm_eps=t.layer_norm_eps, remat=t.remat, dtype=DTYPES[self.c.dtype], rngs=rngs)

    def build_student(self, rngs: nnx.Rngs) -> nnx.Module:
        s = self.c.student
        return registry.build(s.model, vocab_size=s.vocab_size, d_model=s.d_model, depth=s.depth, d_state=s.d_state,
                              n_qk_heads=s.n_qk_heads, n_v_heads=s.n_v_heads, expand=s.expand, d_conv=s.d_conv,
                              intermediate_size=s.intermediate_size, conv_activation=s.conv_activation,
                              ssd_impl=s.ssd_impl, chunk_size=s.chunk_size, remat=s.remat,
                              dtype=DTYPES[self.c.dtype], rngs=rngs)

    def build_bridge(self, rngs: nnx.Rngs) -> AttentionBridge:
        c, b = self.c, self.c.bridge
        return AttentionBridge(
            student_depth=c.student.depth, teacher_depth=c.teacher.depth,
            d_in=c.student.n_qk_heads * c.student.d_state, d_teacher=c.teacher.hidden_size,
            hidden=b.hidden or c.teacher.hidden_size, kind=b.kind, kernel_map=b.kernel_map,
            hidden_layers=b.get("hidden_layers", 1), layers=_bridge_layers(b), bidirectional=False,
            dtype=DTYPES[c.dtype], rngs=rngs)

    def prepare(self, key: jax.Array, batch: dict, train: ml_collections.ConfigDict
                ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        tokens = batch["tokens"]
        return tokens[:, :-1], (tokens[:, 1:], batch["loss_mask"])

    def forward(self, model: nnx.Module, inputs: jax.Array, key: jax.Array | None = None):
        return model(inputs)

    def ce(self, logits: jax.Array, targets: tuple[jax.Array, jax.Array]) -> jax.Array:
        return token_cross_entropy(logits, *targets)

    def kl(self, logits: jax.Array, teacher_logits: jax.Array, targets: tuple[jax.Array, jax.Array],
           temperature: float) -> jax.Array:
        return token_kl_divergence(logits, teacher_logits, targets[1], temperature)

    def bridge_inputs(self, aux: tuple[jax.Array, jax.Array]) -> SSMProjections:
        return SSMProjections(*aux)

    def cls_position(self, student: nnx.Module) -> int | None:
        return None

    def train_metrics(self, logits: jax.Array, targets: tuple[jax.Array, jax.Array]) -> dict[str, jax.Array]:
        labels, mask = targets
        correct = (jnp.argmax(logits, -1) == labels) * mask
        return {"train_token_acc": jnp.sum(correct) / jnp.maximum(jnp.sum(mask), 1.0)}

    def train_batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        seq_len = self.c.data.seq_len
        return {"tokens": jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32),
                "loss_mask": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32)}

    def eval_inputs(self, batch: dict) -> jax.Array:
        return batch["tokens"][:, :-1]

    def eval_sums(self, logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
        labels, mask = batch["tokens"][:, 1:], batch["loss_mask"]
        return {"nll": jnp.sum(token_nll(logits, labels) * mask),
                "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask), "count": jnp.sum(mask)}

    def summarize(self, totals: Mapping[str, Any]) -> dict[str, float]:
        count = max(float(totals["count"]), 1.0)
        loss = float(totals["nll"]) / count
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                "token_acc": 100.0 * float(totals["correct"]) / count, "eval_tokens": int(totals["count"])}

    def throughput(self, examples_per_s: float) -> dict[str, float]:
        return {"sequences_per_s": examples_per_s, "tokens_per_s": examples_per_s * self.c.data.seq_len}



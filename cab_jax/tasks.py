"""What the shared trainer needs to know about a domain: its models and data, how a batch becomes inputs and
targets, its supervised and distillation losses, what the bridge sees, and its eval metrics.

``VisionTask``: DeiT teacher -> Vim student, image classification. ``LanguageTask``: Phi teacher -> Phi-Mamba
student, next-token prediction. :func:`task_for` picks one from ``config.domain``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cab_jax.bridge import AttentionBridge
from cab_jax.kernels.selective_scan import BlockSizes
from cab_jax.losses import (
    LM_MODE_WEIGHTS,
    MODE_WEIGHTS,
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
from cab_jax.models.mamba import SSMProjections

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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


@dataclasses.dataclass(frozen=True)
class _Task:
    """What both domains share: the config, the role, its train settings and loss weights."""

    c: ml_collections.ConfigDict
    role: str = "student"
    mode_weights: ClassVar[dict[str, LossWeights]]
    supervised_mode: ClassVar[str]  # the teacher's own training

    @property
    def train_cfg(self) -> ml_collections.ConfigDict:
        return self.c.teacher.train if self.role == "teacher" else self.c.train

    def loss_weights(self) -> LossWeights:
        if self.role == "teacher":
            return self.mode_weights[self.supervised_mode]
        lc = self.c.loss
        return loss_weights(lc.mode, lc.ce_weight, lc.kl_weight, lc.bridge_weight, table=self.mode_weights)

    @property
    def attention_init(self) -> bool:
        """Whether setup copies the teacher's attention into a fresh student (language students only)."""
        return False

    def bridge_layers(self) -> str | tuple[int, ...]:
        b = self.c.bridge
        return tuple(b.layers) if b.layer_map == "explicit" else b.layer_map


@dataclasses.dataclass(frozen=True)
class VisionTask(_Task):
    """Image classification: Mixup/CutMix soft targets, batchmean KL, top-1/top-5."""

    mode_weights: ClassVar[dict[str, LossWeights]] = MODE_WEIGHTS
    supervised_mode: ClassVar[str] = "vanilla"

    # ---- models

    def build_teacher(self, rngs: nnx.Rngs) -> nnx.Module:
        from cab_jax.models.vit import ViT

        c, t = self.c, self.c.teacher
        return ViT(num_classes=c.data.num_classes, img_size=c.data.image_size, patch_size=t.patch_size,
                   embed_dim=t.embed_dim, depth=t.depth, num_heads=t.num_heads, mlp_ratio=t.mlp_ratio,
                   drop_path_rate=t.drop_path, dtype=DTYPES[c.dtype], rngs=rngs)

    def build_student(self, rngs: nnx.Rngs) -> nnx.Module:
        from cab_jax.models.vim import Vim

        c, s = self.c, self.c.student
        return Vim(num_classes=c.data.num_classes, img_size=c.data.image_size, patch_size=s.patch_size,
                   embed_dim=s.embed_dim, depth=s.depth, d_state=s.d_state, d_conv=s.d_conv, expand=s.expand,
                   bidirectional=s.bidirectional, a_init=s.a_init, scan_impl=s.scan_impl,
                   scan_blocks=BlockSizes.parse(s.scan_blocks) if s.scan_blocks else None,
                   drop_path_rate=s.drop_path, remat=s.remat, dtype=DTYPES[c.dtype], rngs=rngs)

    def build_bridge(self, rngs: nnx.Rngs) -> AttentionBridge:
        c, b = self.c, self.c.bridge
        return AttentionBridge(
            student_depth=c.student.depth, teacher_depth=c.teacher.depth, d_in=c.student.d_state,
            d_teacher=c.teacher.embed_dim, hidden=b.hidden, kind=b.kind, kernel_map=b.kernel_map,
            layers=self.bridge_layers(), bidirectional=c.student.bidirectional, rngs=rngs)

    @property
    def drop_path(self) -> bool:
        model = self.c.teacher if self.role == "teacher" else self.c.student
        return model.drop_path > 0

    def forward(self, module: nnx.Module, inputs: jax.Array, key: jax.Array | None = None):
        return module(inputs, key=key if self.drop_path else None)

    def cls_position(self, student: nnx.Module) -> int | None:
        return getattr(student, "cls_position", 0)

    def bridge_inputs(self, aux: Sequence[SSMProjections]) -> Sequence[SSMProjections]:
        return aux

    # ---- data

    def data_cfg(self) -> ml_collections.ConfigDict:
        """The teacher trains on the whole train split, the student on ``subset_fraction`` of it."""
        if self.role != "teacher":
            return self.c.data
        d = ml_collections.ConfigDict(self.c.data.to_dict())
        d.subset_fraction = 1.0
        return d

    def train_size(self) -> int:
        from cab_jax.data import images

        return images.train_size(self.data_cfg())

    def train_iterator(self, global_batch_size: int, seed: int):
        from cab_jax.data import images

        return images.train_iterator(self.data_cfg(), global_batch_size=global_batch_size, seed=seed)

    def eval_batches(self, global_batch_size: int):
        from cab_jax.data import images

        return images.eval_batches(self.data_cfg(), global_batch_size=global_batch_size)

    # ---- losses and metrics

    def prepare(self, key: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
        return mix_batch(key, batch["image"], batch["label"], self.c.data.num_classes, self.train_cfg)

    def ce(self, logits: jax.Array, targets: jax.Array) -> jax.Array:
        return soft_cross_entropy(logits, targets)

    def kl(self, logits: jax.Array, teacher_logits: jax.Array, targets: jax.Array, temperature: float) -> jax.Array:
        return kl_divergence(logits, teacher_logits, temperature)

    def train_metrics(self, logits: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
        return {"train_top1": jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1))}

    def eval_inputs(self, batch: dict) -> jax.Array:
        return batch["image"]

    def eval_sums(self, logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
        mask, labels = batch["mask"], batch["label"]
        k = min(5, self.c.data.num_classes)
        return {"top1": jnp.sum(topk_correct(logits, labels, 1) * mask),
                "top5": jnp.sum(topk_correct(logits, labels, k) * mask), "count": jnp.sum(mask)}

    def throughput(self, examples_per_s: float) -> dict[str, float]:
        return {"images_per_s": examples_per_s}

    def summarize(self, totals: dict) -> dict[str, float]:
        count = float(totals["count"])
        return {"top1": 100.0 * float(totals["top1"]) / count, "top5": 100.0 * float(totals["top5"]) / count,
                "eval_examples": int(count)}


@dataclasses.dataclass(frozen=True)
class LanguageTask(_Task):
    """Next-token prediction: masked token CE and KL, per-layer (B, C) -> (K, Q) bridges, held-out perplexity."""

    mode_weights: ClassVar[dict[str, LossWeights]] = LM_MODE_WEIGHTS
    supervised_mode: ClassVar[str] = "ce"

    # ---- models

    def build_teacher(self, rngs: nnx.Rngs) -> nnx.Module:
        from cab_jax.models.phi import Phi, PhiSize

        t = self.c.teacher
        size = {f.name: t[f.name] for f in dataclasses.fields(PhiSize)}
        return Phi(**size, remat=t.remat, dtype=DTYPES[self.c.dtype], rngs=rngs)

    def build_student(self, rngs: nnx.Rngs) -> nnx.Module:
        from cab_jax.models.phi_mamba import PhiMamba, PhiMambaSize

        s = self.c.student
        return PhiMamba(**{f.name: s[f.name] for f in dataclasses.fields(PhiMambaSize)},
                        conv_activation=s.conv_activation, ssd_impl=s.ssd_impl, chunk_size=s.chunk_size,
                        remat=s.remat, dtype=DTYPES[self.c.dtype], rngs=rngs)

    def build_bridge(self, rngs: nnx.Rngs) -> AttentionBridge:
        c, b = self.c, self.c.bridge
        return AttentionBridge(
            student_depth=c.student.depth, teacher_depth=c.teacher.depth,
            d_in=c.student.n_qk_heads * c.student.d_state, d_teacher=c.teacher.hidden_size,
            hidden=b.hidden or c.teacher.hidden_size, kind=b.kind, kernel_map=b.kernel_map,
            layers=self.bridge_layers(), bidirectional=False, rngs=rngs)

    drop_path = False

    def forward(self, module: nnx.Module, inputs: jax.Array, key: jax.Array | None = None):
        return module(inputs)

    def cls_position(self, student: nnx.Module) -> int | None:
        return None

    def bridge_inputs(self, aux: Sequence[tuple[jax.Array, jax.Array]]) -> list[SSMProjections]:
        return [SSMProjections(B, C) for B, C in aux]

    @property
    def attention_init(self) -> bool:
        s = self.c.student
        return self.role == "student" and s.init_from_attention and not s.init_from  # given weights win

    def init_student_from_teacher(self, student: nnx.Module, teacher: nnx.Module) -> None:
        from cab_jax.models.phi_mamba import init_from_attention

        init_from_attention(student, teacher)

    # ---- data

    def data_cfg(self) -> ml_collections.ConfigDict:
        return self.c.data

    def train_size(self) -> int:
        from cab_jax.data import text

        return text.train_size(self.c.data)

    def train_iterator(self, global_batch_size: int, seed: int):
        from cab_jax.data import text

        return text.train_iterator(self.c.data, global_batch_size=global_batch_size, seed=seed)

    def eval_batches(self, global_batch_size: int):
        from cab_jax.data import text

        return text.eval_batches(self.c.data, global_batch_size=global_batch_size)

    # ---- losses and metrics

    def prepare(self, key: jax.Array, batch: dict) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        tokens = batch["tokens"]
        return tokens[:, :-1], (tokens[:, 1:], batch["loss_mask"])

    def ce(self, logits: jax.Array, targets: tuple[jax.Array, jax.Array]) -> jax.Array:
        return token_cross_entropy(logits, *targets)

    def kl(self, logits: jax.Array, teacher_logits: jax.Array, targets: tuple[jax.Array, jax.Array],
           temperature: float) -> jax.Array:
        return token_kl_divergence(logits, teacher_logits, targets[1], temperature)

    def train_metrics(self, logits: jax.Array, targets: tuple[jax.Array, jax.Array]) -> dict[str, jax.Array]:
        labels, mask = targets
        correct = (jnp.argmax(logits, -1) == labels) * mask
        return {"train_token_acc": jnp.sum(correct) / jnp.maximum(jnp.sum(mask), 1.0)}

    def eval_inputs(self, batch: dict) -> jax.Array:
        return batch["tokens"][:, :-1]

    def eval_sums(self, logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
        labels, mask = batch["tokens"][:, 1:], batch["loss_mask"]
        return {"nll": jnp.sum(token_nll(logits, labels) * mask),
                "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask), "count": jnp.sum(mask)}

    def throughput(self, examples_per_s: float) -> dict[str, float]:
        return {"sequences_per_s": examples_per_s, "tokens_per_s": examples_per_s * self.c.data.seq_len}

    def summarize(self, totals: dict) -> dict[str, float]:
        count = max(float(totals["count"]), 1.0)
        loss = float(totals["nll"]) / count
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                "token_acc": 100.0 * float(totals["correct"]) / count, "eval_tokens": int(totals["count"])}


Task = VisionTask | LanguageTask


def task_for(c: ml_collections.ConfigDict, role: str = "student") -> Task:
    if role not in ("student", "teacher"):
        raise ValueError(f"unknown role {role!r}; expected 'student' or 'teacher'")
    return (LanguageTask if c.domain == "language" else VisionTask)(c, role)

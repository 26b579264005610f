"""Shared config pieces: the full field set, validation with clear messages, and derived values.

Every experiment file in ``configs/`` starts from :func:`base_config` (vision: DeiT -> Vim) or
:func:`lm_base_config` (language: Phi -> Phi-Mamba) and changes fields; nothing else adds fields, so an override
of an unknown key fails inside ml_collections before any work starts.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections
from ml_collections import config_dict

from cab_jax.bridge import BRIDGE_KINDS, KERNEL_MAPS, LAYER_MAPS
from cab_jax.kernels.selective_scan import SCAN_IMPLS, BlockSizes
from cab_jax.losses import LM_LOSS_MODES, LOSS_MODES
from cab_jax.models.mamba import A_INITS
from cab_jax.models.vim import VIM_SIZES
from cab_jax.models.vit import VIT_SIZES

TASKS = ("distill", "train_teacher", "demo")
DOMAINS = ("vision", "language")
LR_DECAYS = ("cosine", "linear")
CONV_ACTIVATIONS = ("identity", "silu")
DTYPES = ("float32", "bfloat16")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The original's epochs per ImageNet subset fraction (fewer images, more epochs).
EPOCHS_BY_FRACTION = {0.01: 3000.0, 0.05: 600.0, 0.1: 300.0, 0.2: 150.0, 1.0: 300.0}


def train_config(vision: bool = True) -> ml_collections.ConfigDict:
    """Optimisation and loop settings (the original vision recipe's defaults; language configs change them).
    Label smoothing and Mixup/CutMix fields exist for vision only."""
    t = ml_collections.ConfigDict(dict(
        batch_size=512,  # global, over all devices and processes
        epochs=config_dict.placeholder(float),  # unset: the paper's epochs for data.subset_fraction
        steps=config_dict.placeholder(int),  # when set, overrides epochs
        base_lr=5e-4,  # peak lr = base_lr * batch_size / lr_reference_batch
        lr_reference_batch=512,
        weight_decay=0.05,
        warmup_epochs=5.0,
        warmup_lr=1e-6,
        min_lr=1e-5,
        lr_decay="cosine",  # after warmup, to min_lr: "cosine" or "linear"
        grad_clip=0.0,  # global-norm clip; 0 disables
        ema_decay=0.0,  # 0 disables the EMA copy of the parameters
        log_every=50,
        eval_every=0,  # steps between evaluations; 0: only at the end
        checkpoint_every=1000,
        keep_checkpoints=2,
        eval_batch_size=256,
    ))
    if vision:
        t.update(dict(label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0, mixup_prob=1.0, mixup_switch_prob=0.5))
    return t


def base_config() -> ml_collections.ConfigDict:
    """All fields with the original recipe's values: DeiT-S teacher -> Vim-S student on ImageNet."""
    c = ml_collections.ConfigDict()
    c.domain = "vision"
    c.task = "distill"
    c.seed = 0
    c.dtype = "float32"  # compute dtype of both models; parameters are always float32

    c.teacher = ml_collections.ConfigDict(dict(
        **dataclasses.asdict(VIT_SIZES["small"]), patch_size=16, drop_path=0.0, init_from=""))
    c.teacher.train = train_config()  # used by task=train_teacher and by the demo's teacher stage
    c.student = ml_collections.ConfigDict(dict(
        **dataclasses.asdict(VIM_SIZES["small"]), patch_size=16, d_state=16, d_conv=4, expand=2,
        bidirectional=True, a_init="cab", scan_impl="auto", scan_blocks="", drop_path=0.0, remat=True,
        init_from=""))
    c.bridge = ml_collections.ConfigDict(dict(
        kind="mlp", hidden=128, kernel_map="softmax", layer_map="proportional", layers=(),
        detach_student=False))
    c.loss = ml_collections.ConfigDict(dict(
        mode="cab", temperature=1.0, ce_weight=config_dict.placeholder(float),
        kl_weight=config_dict.placeholder(float), bridge_weight=config_dict.placeholder(float)))
    c.data = ml_collections.ConfigDict(dict(
        name="imagenet2012", data_dir="", image_size=224, num_classes=1000, train_split="train",
        eval_split="validation", subset_fraction=0.1, subset_seed=2025, synthetic=False, synthetic_size=1024,
        num_workers=8, crop_scale=(0.08, 1.0), hflip=True, mean=IMAGENET_MEAN, std=IMAGENET_STD))
    c.train = train_config()
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.demo = ml_collections.ConfigDict(dict(modes=("vanilla", "soft", "cab")))
    return c


def lm_base_config() -> ml_collections.ConfigDict:
    """All fields with the original language recipe: Phi-1.5 teacher -> Phi-Mamba student (24 layers, d_model
    2048, discrete Mamba-2 mixers initialised from the teacher's attention), CE + 0.5 KL + 0.5 bridge."""
    from cab_jax.models.phi import PHI_SIZES
    from cab_jax.models.phi_mamba import PHI_MAMBA_SIZES

    c = ml_collections.ConfigDict()
    c.domain = "language"
    c.task = "distill"
    c.seed = 0
    c.dtype = "bfloat16"
    c.teacher = ml_collections.ConfigDict(dict(**dataclasses.asdict(PHI_SIZES["phi_1_5"]), remat=True, init_from=""))
    c.teacher.train = lm_train_config()  # used by task=train_teacher and by the demo's teacher stage
    c.student = ml_collections.ConfigDict(dict(
        **dataclasses.asdict(PHI_MAMBA_SIZES["phi_mamba_1_5"]), conv_activation="identity", ssd_impl="auto",
        chunk_size=128, remat=True, init_from="", init_from_attention=True))
    c.student.intermediate_size = 4 * c.student.d_model  # explicit (not None), so flags can override it
    c.bridge = ml_collections.ConfigDict(dict(
        kind="mlp", hidden=0, kernel_map="none", layer_map="proportional", layers=(), detach_student=False))
    c.loss = ml_collections.ConfigDict(dict(
        mode="cab", temperature=1.0, ce_weight=config_dict.placeholder(float),
        kl_weight=config_dict.placeholder(float), bridge_weight=config_dict.placeholder(float)))
    c.data = ml_collections.ConfigDict(dict(
        name="cab_text", data_dir="", seq_len=2048, vocab_size=51200, max_corpus_bytes=4_000_000, tokenizer="",
        text_key="text", train_split="train", eval_split="test", synthetic=False, synthetic_size=1024,
        num_workers=0))
    c.train = lm_train_config()
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.demo = ml_collections.ConfigDict(dict(modes=("ce", "kl", "cab"), init_from_attention_modes=("cab",)))
    return c


def lm_train_config() -> ml_collections.ConfigDict:
    """The original language recipe (HF Trainer defaults of CAB's kd_trainer): AdamW lr 5e-4 without weight
    decay, 10 % linear warmup then linear decay to 0, gradient clipping at 1, one epoch."""
    t = train_config(vision=False)
    t.update(dict(batch_size=32, epochs=1.0, lr_reference_batch=32, weight_decay=0.0, warmup_epochs=0.1,
                  warmup_lr=0.0, min_lr=0.0, lr_decay="linear", grad_clip=1.0, eval_batch_size=32))
    return t


def set_vit_size(teacher: ml_collections.ConfigDict, size: str) -> None:
    teacher.update(dataclasses.asdict(VIT_SIZES[size]))


def set_vim_size(student: ml_collections.ConfigDict, size: str) -> None:
    student.update(dataclasses.asdict(VIM_SIZES[size]))


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"config.{key}: {message}")


def _check_choice(value, key: str, choices) -> None:
    _check(value in choices, key, f"got {value!r}, expected one of {tuple(choices)}")


def _validate_train(t: ml_collections.ConfigDict, key: str) -> None:
    _check(t.batch_size > 0, f"{key}.batch_size", f"must be positive, got {t.batch_size}")
    for name in ("steps", "epochs"):
        _check(t[name] is None or t[name] > 0, f"{key}.{name}", f"must be positive, got {t[name]}")
    for name in ("base_lr", "warmup_lr", "min_lr", "weight_decay", "warmup_epochs", "grad_clip"):
        _check(t[name] >= 0, f"{key}.{name}", f"must be >= 0, got {t[name]}")
    _check_choice(t.lr_decay, f"{key}.lr_decay", LR_DECAYS)
    _check(0.0 <= t.ema_decay < 1.0, f"{key}.ema_decay", f"must be in [0, 1), got {t.ema_decay}")
    for name in ("log_every", "checkpoint_every", "keep_checkpoints", "eval_batch_size"):
        _check(t[name] > 0, f"{key}.{name}", f"must be positive, got {t[name]}")
    _check(t.eval_every >= 0, f"{key}.eval_every", f"must be >= 0, got {t.eval_every}")
    if "mixup_alpha" in t:  # vision only
        for name in ("mixup_alpha", "cutmix_alpha", "label_smoothing"):
            _check(t[name] >= 0, f"{key}.{name}", f"must be >= 0, got {t[name]}")
        _check(0.0 <= t.mixup_prob <= 1.0, f"{key}.mixup_prob", f"must be in [0, 1], got {t.mixup_prob}")
        _check(t.label_smoothing < 1.0, f"{key}.label_smoothing", f"must be < 1, got {t.label_smoothing}")


def validate(c: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the first bad field; called before any work starts."""
    _check_choice(c.domain, "domain", DOMAINS)
    _check_choice(c.task, "task", TASKS)
    _check_choice(c.dtype, "dtype", DTYPES)
    modes = LM_LOSS_MODES if c.domain == "language" else LOSS_MODES
    _check_choice(c.loss.mode, "loss.mode", modes)
    for mode in c.demo.modes:
        _check_choice(mode, "demo.modes", modes)
    _check(c.loss.temperature > 0, "loss.temperature", f"must be positive, got {c.loss.temperature}")
    for name in ("ce_weight", "kl_weight", "bridge_weight"):
        _check(c.loss[name] is None or c.loss[name] >= 0, f"loss.{name}", f"must be >= 0, got {c.loss[name]}")
    _check_choice(c.bridge.kind, "bridge.kind", BRIDGE_KINDS)
    _check_choice(c.bridge.kernel_map, "bridge.kernel_map", KERNEL_MAPS)
    _check_choice(c.bridge.layer_map, "bridge.layer_map", (*LAYER_MAPS, "explicit"))
    if c.bridge.layer_map == "explicit":
        _check(len(c.bridge.layers) == c.student.depth, "bridge.layers",
               f"needs one teacher layer (or -1) per student layer: {c.student.depth} entries, "
               f"got {len(c.bridge.layers)}")
    for name in ("data", "fsdp", "tensor"):
        _check(c.mesh[name] == -1 or c.mesh[name] > 0, f"mesh.{name}", f"must be positive or -1, got {c.mesh[name]}")
    _validate_train(c.train, "train")
    _validate_train(c.teacher.train, "teacher.train")
    (_validate_language if c.domain == "language" else _validate_vision)(c)


def _validate_vision(c: ml_collections.ConfigDict) -> None:
    _check_choice(c.student.scan_impl, "student.scan_impl", SCAN_IMPLS)
    if c.student.scan_blocks:
        try:
            BlockSizes.parse(c.student.scan_blocks)
        except ValueError as e:
            _check(False, "student.scan_blocks", str(e))
    _check_choice(c.student.a_init, "student.a_init", A_INITS)
    d = c.data
    _check(0.0 < d.subset_fraction <= 1.0, "data.subset_fraction", f"must be in (0, 1], got {d.subset_fraction}")
    _check(d.num_classes > 1, "data.num_classes", f"must be > 1, got {d.num_classes}")
    _check(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _check(len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "data.crop_scale",
           f"must be (low, high) with 0 < low <= high <= 1, got {d.crop_scale}")
    for model in ("teacher", "student"):
        p = c[model].patch_size
        _check(p > 0 and d.image_size % p == 0, f"{model}.patch_size",
               f"data.image_size {d.image_size} must be a positive multiple of it, got {p}")
        _check(c[model].depth > 0 and c[model].embed_dim > 0, f"{model}.depth/embed_dim", "must be positive")
    _check(c.teacher.embed_dim % c.teacher.num_heads == 0, "teacher.num_heads",
           f"must divide teacher.embed_dim {c.teacher.embed_dim}, got {c.teacher.num_heads}")
    _check(c.teacher.patch_size == c.student.patch_size, "student.patch_size",
           f"the bridge pairs teacher and student tokens one to one: teacher.patch_size is "
           f"{c.teacher.patch_size}, student.patch_size {c.student.patch_size}")
    _check(c.train.steps is not None or c.train.epochs is not None or d.subset_fraction in EPOCHS_BY_FRACTION,
           "train.epochs", f"unset, and data.subset_fraction {d.subset_fraction} has no default epochs "
           f"(defaults exist for {sorted(EPOCHS_BY_FRACTION)}): set train.epochs or train.steps")


def _validate_language(c: ml_collections.ConfigDict) -> None:
    from cab_jax.kernels.ssd import SSD_IMPLS

    t, s, d = c.teacher, c.student, c.data
    _check_choice(s.ssd_impl, "student.ssd_impl", SSD_IMPLS)
    _check_choice(s.conv_activation, "student.conv_activation", CONV_ACTIVATIONS)
    for mode in c.demo.init_from_attention_modes:
        _check_choice(mode, "demo.init_from_attention_modes", c.demo.modes)
    _check(t.vocab_size == s.vocab_size, "student.vocab_size",
           f"teacher and student share the tokenizer: teacher.vocab_size is {t.vocab_size}, got {s.vocab_size}")
    _check(0 < d.vocab_size <= s.vocab_size, "data.vocab_size",
           f"must be in (0, student.vocab_size={s.vocab_size}], got {d.vocab_size}")
    _check(t.hidden_size % t.num_heads == 0, "teacher.num_heads",
           f"must divide teacher.hidden_size {t.hidden_size}, got {t.num_heads}")
    d_inner = s.expand * s.d_model
    _check(d_inner % s.n_v_heads == 0, "student.n_v_heads", f"must divide expand * d_model = {d_inner}, got "
           f"{s.n_v_heads}")
    _check(s.n_v_heads % s.n_qk_heads == 0, "student.n_qk_heads",
           f"must divide student.n_v_heads {s.n_v_heads}, got {s.n_qk_heads}")
    for name in ("seq_len", "synthetic_size", "max_corpus_bytes"):
        _check(d[name] > 0, f"data.{name}", f"must be positive, got {d[name]}")
    _check(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _check(s.chunk_size > 0, "student.chunk_size", f"must be positive, got {s.chunk_size}")
    _check(c.bridge.hidden >= 0, "bridge.hidden", f"must be >= 0 (0: the teacher's width), got {c.bridge.hidden}")
    _check(c.train.steps is not None or c.train.epochs is not None, "train.epochs", "set train.epochs or train.steps")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Values derived from a train config and the training-set size (computed here and nowhere else)."""

    total_steps: int
    warmup_steps: int
    steps_per_epoch: int
    peak_lr: float


def schedule(t: ml_collections.ConfigDict, train_size: int, subset_fraction: float = 1.0) -> Schedule:
    steps_per_epoch = max(1, train_size // t.batch_size)
    if t.steps is not None:
        total = t.steps
    else:
        epochs = t.epochs if t.epochs is not None else EPOCHS_BY_FRACTION[subset_fraction]
        total = max(1, math.ceil(epochs * steps_per_epoch))
    warmup = min(total - 1, round(t.warmup_epochs * steps_per_epoch))
    return Schedule(total_steps=total, warmup_steps=max(0, warmup), steps_per_epoch=steps_per_epoch,
                    peak_lr=t.base_lr * t.batch_size / t.lr_reference_batch)

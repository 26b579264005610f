"""What config files share: variant parsing, the recipes' default sections, validation with messages that name the
field, and the values derived from a config (steps, warmup, peak learning rate).

It imports nothing of the package but its errors when loaded, so a config file loads without JAX or model code;
``validate`` asks the kernels, models, bridge and losses for the values they accept when it runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from cab_jax.errors import ConfigError

TASKS = ("distill", "train_teacher", "study")
DOMAINS = ("vision", "language")
LR_DECAYS = ("cosine", "linear")
NONFINITE_ACTIONS = ("stop", "skip")
DTYPES = ("float32", "bfloat16")
INTERPOLATIONS = ("bicubic", "bilinear")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The original's epochs per ImageNet subset fraction (fewer images, more epochs).
EPOCHS_BY_FRACTION = {0.01: 3000.0, 0.05: 600.0, 0.1: 300.0, 0.2: 150.0, 1.0: 300.0}


# ------------------------------------------------------------------------------------------- variants


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """The variant after a config path's colon (``--config=configs/vim_small.py:subset=0.01,mode=soft``) as a
    ConfigDict of ``defaults`` with the given keys replaced; values are parsed by the type of their default."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in defaults:
            raise ConfigError(f"config variant {item!r}: expected key=value with a key among {sorted(defaults)}")
        out[key] = parse_value(f"config variant {key}", text.strip(), type(defaults[key]))
    return out


def parse_value(key: str, text: str, kind: type) -> Any:
    """``text`` as a ``kind`` (a bool from True/False/1/0, any case); a ConfigError naming ``key`` otherwise."""
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"{key}={text!r}: expected True or False")
        return text.lower() in ("true", "1")
    try:
        return kind(text)
    except ValueError as e:
        raise ConfigError(f"{key}={text!r}: expected a {kind.__name__}") from e


# ------------------------------------------------------------------------------------ default sections


def vision_train(**overrides: Any) -> ml_collections.ConfigDict:
    """Optimisation and loop settings of the original vision recipe (DeiT/Vim on ImageNet)."""
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
        label_smoothing=0.1,
        mixup_alpha=0.8,
        cutmix_alpha=1.0,
        mixup_prob=1.0,
        mixup_switch_prob=0.5,
        log_every=50,
        eval_every=0,  # steps between evaluations; 0: only at the end
        checkpoint_every=1000,
        keep_checkpoints=2,  # the newest ones; each holds the student, bridges and optimizer state
        on_nonfinite="stop",  # a non-finite loss or gradient: "stop" the run, or "skip" the update
        eval_batch_size=config_dict.placeholder(int),  # unset: batch_size
        # XLA options of the train step's compilation on GPUs, "name=value,...", "" for XLA's defaults. XLA's dot
        # merger would join in_proj's two matmuls again and slice their product (BENCHMARKS.md, Vim-S step).
        xla_gpu_options="xla_gpu_dot_merger_threshold_mb=0",
    ))
    t.update(overrides)
    return t


def xla_options(text: str, key: str = "train.xla_gpu_options") -> dict[str, str]:
    """``"name=value,..."`` as {name: value}, each name an XLA option (``xla_...``); "" is {}. A value may hold
    commas itself (``xla_gpu_enable_command_buffer=FUSION,CUBLAS``): only a comma before ``xla_NAME=`` starts an
    option."""
    options = {}
    for part in filter(None, (p.strip(", \t\n") for p in re.split(r",(?=\s*xla_\w+=)", text))):
        name, sep, value = part.partition("=")
        _check(bool(sep) and name.startswith("xla_") and bool(value) and "=" not in value, key,
               f"expected comma-separated xla_NAME=VALUE options, got {part!r} in {text!r}")
        options[name] = value
    return options


def vision_data(**overrides: Any) -> ml_collections.ConfigDict:
    """ImageNet as the original reads and augments it (DeiT's recipe through timm's ``create_transform``)."""
    d = ml_collections.ConfigDict(dict(
        name="imagenet2012", data_dir="", image_size=224, num_classes=1000, train_split="train",
        eval_split="validation", subset_fraction=1.0, subset_seed=2025, synthetic=False, synthetic_size=1024,
        num_workers=8,  # grain worker processes per trainer process; 0 reads in the trainer's threads
        crop_scale=(0.08, 1.0), hflip=True,
        interpolation="bicubic",  # of the crop resize, the eval resize and RandAugment's geometry
        randaugment="rand-m9-mstd0.5-inc1",  # timm's policy string; "" disables
        random_erase=0.25,  # probability of erasing one box with noise (timm's mode "pixel")
        repeated_augmentation=3,  # DeiT's RASampler: each epoch reads 1/3 of the examples, each 3 times with
        # different augmentations; as in the original, only when training on more than one device. 1 disables.
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
    ))
    d.update(overrides)
    return d


def language_train(**overrides: Any) -> ml_collections.ConfigDict:
    """The original language recipe (HF Trainer defaults of CAB's kd_trainer): AdamW lr 5e-4 without weight
    decay, 10 % linear warmup then linear decay to 0, gradient clipping at 1, one epoch."""
    t = vision_train(batch_size=32, epochs=1.0, lr_reference_batch=32, weight_decay=0.0, warmup_epochs=0.1,
                     warmup_lr=0.0, min_lr=0.0, lr_decay="linear", grad_clip=1.0, xla_gpu_options="")
    for name in ("label_smoothing", "mixup_alpha", "cutmix_alpha", "mixup_prob", "mixup_switch_prob"):
        del t[name]
    t.update(overrides)
    return t


def loss(mode: str = "cab") -> ml_collections.ConfigDict:
    """Loss mode and optional explicit weights (unset: the mode's weights for the domain)."""
    return ml_collections.ConfigDict(dict(
        mode=mode, temperature=1.0, ce_weight=config_dict.placeholder(float),
        kl_weight=config_dict.placeholder(float), bridge_weight=config_dict.placeholder(float),
        attention_weight=config_dict.placeholder(float)))


def mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
    """Device mesh sizes; one of them may be -1 (all remaining devices)."""
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


# ------------------------------------------------------------------------------------------ validation


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key}: {message}")


def _check_choice(value, key: str, choices) -> None:
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    _check(value in choices, key, f"got {value!r}, expected one of {tuple(choices)}{hint}")


def _validate_train(t: ml_collections.ConfigDict, key: str, data_parallel: int | None) -> None:
    _check(t.batch_size > 0, f"{key}.batch_size", f"must be positive, got {t.batch_size}")
    for name in ("steps", "epochs"):
        _check(t[name] is None or t[name] > 0, f"{key}.{name}", f"must be positive, got {t[name]}")
    for name in ("base_lr", "warmup_lr", "min_lr", "weight_decay", "warmup_epochs", "grad_clip"):
        _check(t[name] >= 0, f"{key}.{name}", f"must be >= 0, got {t[name]}")
    _check_choice(t.lr_decay, f"{key}.lr_decay", LR_DECAYS)
    _check(0.0 <= t.ema_decay < 1.0, f"{key}.ema_decay", f"must be in [0, 1), got {t.ema_decay}")
    for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
        _check(t[name] > 0, f"{key}.{name}", f"must be positive, got {t[name]}")
    _check(t.eval_batch_size is None or t.eval_batch_size > 0, f"{key}.eval_batch_size",
           f"must be positive (or unset: batch_size), got {t.eval_batch_size}")
    _check(t.eval_every >= 0, f"{key}.eval_every", f"must be >= 0, got {t.eval_every}")
    _check_choice(t.on_nonfinite, f"{key}.on_nonfinite", NONFINITE_ACTIONS)
    xla_options(t.xla_gpu_options, f"{key}.xla_gpu_options")
    if "mixup_alpha" in t:  # vision only
        for name in ("mixup_alpha", "cutmix_alpha", "label_smoothing"):
            _check(t[name] >= 0, f"{key}.{name}", f"must be >= 0, got {t[name]}")
        _check(0.0 <= t.mixup_prob <= 1.0, f"{key}.mixup_prob", f"must be in [0, 1], got {t.mixup_prob}")
        _check(t.label_smoothing < 1.0, f"{key}.label_smoothing", f"must be < 1, got {t.label_smoothing}")
    if data_parallel is not None:
        for name, size in (("batch_size", t.batch_size), ("eval_batch_size", eval_batch_size(t))):
            _check(size % data_parallel == 0, f"{key}.{name}",
                   f"{size} must be divisible by the data-parallel mesh size (mesh.data x mesh.fsdp = "
                   f"{data_parallel})")


def validate(c: ml_collections.ConfigDict, mesh_shape: Mapping[str, int] | None = None) -> None:
    """Raise ConfigError (a ValueError) naming the first bad field; called before any work starts.
    ``mesh_shape`` (the axis sizes of the mesh built from ``c.mesh``) adds the checks that depend on the
    devices present."""
    from cab_jax.bridge import BRIDGE_KINDS, KERNEL_MAPS, LAYER_MAPS
    from cab_jax.losses import LOSS_MODES, MODE_ALIASES

    _check_choice(c.domain, "domain", DOMAINS)
    _check_choice(c.task, "task", TASKS)
    _check_choice(c.dtype, "dtype", DTYPES)
    modes = (*LOSS_MODES, *MODE_ALIASES)
    _check_choice(c.loss.mode, "loss.mode", modes)
    if c.task == "study":
        _check("study" in c, "study", "task 'study' needs a study section (modes to train, one student each)")
        _check(len(c.study.modes) > 0, "study.modes", "must name at least one loss mode")
        for mode in c.study.modes:
            _check_choice(mode, "study.modes", modes)
        fractions, seeds = tuple(c.study.get("fractions", ())), tuple(c.study.get("seeds", ()))
        _check(not fractions or c.domain == "vision", "study.fractions",
               "train-subset fractions are for vision studies (a language study trains on its whole corpus)")
        for f in fractions:
            _check(isinstance(f, int | float) and 0 < f <= 1, "study.fractions", f"each must be in (0, 1], got {f!r}")
        _check(len(set(fractions)) == len(fractions), "study.fractions", f"repeats a fraction: {fractions}")
        for seed in seeds:
            _check(isinstance(seed, int), "study.seeds", f"must be integers, got {seed!r}")
        _check(len(set(seeds)) == len(seeds), "study.seeds", f"repeats a seed: {seeds}")
    _check(c.loss.temperature > 0, "loss.temperature", f"must be positive, got {c.loss.temperature}")
    for name in ("ce_weight", "kl_weight", "bridge_weight", "attention_weight"):
        _check(c.loss[name] is None or c.loss[name] >= 0, f"loss.{name}", f"must be >= 0, got {c.loss[name]}")
    _check_choice(c.bridge.kind, "bridge.kind", BRIDGE_KINDS)
    _check(c.bridge.get("hidden_layers", 1) >= 1, "bridge.hidden_layers",
           f"an mlp bridge has at least one hidden layer, got {c.bridge.get('hidden_layers', 1)}")
    _check_choice(c.bridge.kernel_map, "bridge.kernel_map", KERNEL_MAPS)
    _check_choice(c.bridge.layer_map, "bridge.layer_map", (*LAYER_MAPS, "explicit"))
    if c.bridge.layer_map == "explicit":
        _check(len(c.bridge.layers) == c.student.depth, "bridge.layers",
               f"needs one teacher layer (or -1) per student layer: {c.student.depth} entries, "
               f"got {len(c.bridge.layers)}")
    for name in ("data", "fsdp", "tensor"):
        _check(c.mesh[name] == -1 or c.mesh[name] > 0, f"mesh.{name}", f"must be positive or -1, got {c.mesh[name]}")
    data_parallel = None if mesh_shape is None else mesh_shape["data"] * mesh_shape["fsdp"]
    _validate_train(c.train, "train", data_parallel)
    _validate_train(c.teacher.train, "teacher.train", data_parallel)
    (_validate_language if c.domain == "language" else _validate_vision)(c)


def _validate_vision(c: ml_collections.ConfigDict) -> None:
    from cab_jax.kernels.selective_scan import SCAN_IMPLS, BlockSizes
    from cab_jax.models.mamba import A_INITS
    from cab_jax.models.vim import REMAT_POLICIES

    _check(c.teacher.model == "vit", "teacher.model", f"the vision teacher is 'vit', got {c.teacher.model!r}")
    _check(c.student.model == "vim", "student.model", f"the vision student is 'vim', got {c.student.model!r}")
    _check_choice(c.student.scan_impl, "student.scan_impl", SCAN_IMPLS)
    if c.student.scan_blocks:
        try:
            BlockSizes.parse(c.student.scan_blocks)
        except ValueError as e:
            _check(False, "student.scan_blocks", str(e))
    _check_choice(c.student.a_init, "student.a_init", A_INITS)
    _check_choice(c.student.get("remat_policy", "full"), "student.remat_policy", tuple(REMAT_POLICIES))
    d = c.data
    _check(0.0 < d.subset_fraction <= 1.0, "data.subset_fraction", f"must be in (0, 1], got {d.subset_fraction}")
    _check(d.num_classes > 1, "data.num_classes", f"must be > 1, got {d.num_classes}")
    _check(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _check(len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "data.crop_scale",
           f"must be (low, high) with 0 < low <= high <= 1, got {d.crop_scale}")
    _check_choice(d.interpolation, "data.interpolation", INTERPOLATIONS)
    if d.randaugment:
        from cab_jax.data import randaugment  # here: loading a config imports none of the package

        try:
            randaugment.parse(d.randaugment, fill=(0, 0, 0), resample=0)
        except ValueError as e:
            _check(False, "data.randaugment", str(e))
    _check(0.0 <= d.random_erase <= 1.0, "data.random_erase", f"must be in [0, 1], got {d.random_erase}")
    _check(d.repeated_augmentation >= 1, "data.repeated_augmentation", f"must be >= 1, got {d.repeated_augmentation}")
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
    from cab_jax.models.mamba2 import CONV_ACTIVATIONS

    t, s, d = c.teacher, c.student, c.data
    _check(t.model == "phi", "teacher.model", f"the language teacher is 'phi', got {t.model!r}")
    _check(s.model == "phi_mamba", "student.model", f"the language student is 'phi_mamba', got {s.model!r}")
    _check_choice(s.ssd_impl, "student.ssd_impl", SSD_IMPLS)
    _check_choice(s.conv_activation, "student.conv_activation", CONV_ACTIVATIONS)
    if c.task == "study":
        for mode in c.study.init_from_attention_modes:
            _check_choice(mode, "study.init_from_attention_modes", c.study.modes)
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


# ----------------------------------------------------------------------------------------- derived values


def eval_batch_size(t: ml_collections.ConfigDict) -> int:
    """The global eval batch: ``eval_batch_size``, or the train batch when unset."""
    return t.batch_size if t.eval_batch_size is None else t.eval_batch_size


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

"""Image classification pipelines over cab_digits (built on first use), a prepared TFDS dataset or random images.

The same public names as :mod:`cab_jax.data.text`: :func:`train_size`, :func:`train_dataset`,
:func:`train_iterator`, :func:`eval_batches` and :func:`prepare`. This module opens the dataset, takes
the per-class training subset and applies the DeiT transforms of :mod:`cab_jax.data.augment`; the
training order, sharding, resume and eval padding are :mod:`cab_jax.data.loader`'s.

Config fields read (by attribute) from ``data_cfg``, an ``ml_collections.ConfigDict``:

  name (str): "cab_digits" (the embedded dataset; built into ``data_dir`` on first use) or the name of
      any TFDS dataset already prepared in ``data_dir`` in array_record format, e.g. "imagenet2012"
      (never downloaded here; a missing one raises ``FileNotFoundError`` saying how to prepare it).
  data_dir (str): TFDS data directory (None / "" for the TFDS default).
  image_size (int): output side length (train crop and eval crop).
  num_classes (int): number of classes; checked against the dataset's label feature.
  train_split (str): e.g. "train" (any TFDS split expression works).
  eval_split (str): "test" for cab_digits, "validation" for ImageNet.
  subset_fraction (float in (0, 1]): per-class fraction of ``train_split`` to train on.
  subset_seed (int): seed of the per-class subset choice.
  synthetic (bool): random images/labels instead of a dataset; touches no files.
  synthetic_size (int): number of synthetic examples (train; eval uses as many, another seed).
  num_workers (int): 0 = read and augment in this process (with a few threads);
      > 0 = that many grain worker processes (``mp_prefetch``).
  crop_scale (tuple of 2 floats): random-resized-crop area range, e.g. (0.08, 1.0).
  hflip (bool): random horizontal flips in training.
  interpolation (str): "bicubic" or "bilinear", for every resize and RandAugment's geometry.
  randaugment (str): a timm RandAugment policy, e.g. "rand-m9-mstd0.5-inc1"; "" for none.
  random_erase (float): probability of erasing one box with normal noise after normalisation.
  repeated_augmentation (int): each epoch reads 1/k of the examples, each k times (DeiT's RASampler), when
      training on more than one device; 1 disables.
  mean, std (tuples of 3 floats): per-channel normalisation on the 0..1 scale.

Multi-host: prepare once (:func:`prepare`) before launching many processes on one shared
``data_dir``; otherwise each process tries to build cab_digits itself. Other datasets are only read,
apart from the label cache that a per-class subset writes next to them (which :func:`prepare` also
writes).
"""

from __future__ import annotations

import logging
import os

import grain
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from cab_jax.data import loader
from cab_jax.data.augment import EvalTransform, TrainTransform
from cab_jax.data.digits import CabDigits
from cab_jax.data.sources import IndexedSource, PaddedSource, SelectKeys, SyntheticSource
from cab_jax.data.subset import per_class_subset
from cab_jax.errors import ConfigError

DIGITS_NAME = "cab_digits"
_LABEL_SCAN_CHUNK = 8192
_OUTPUT_KEYS = ("image", "label")


# --------------------------------------------------------------------------------------------------
# Opening datasets.


def _open_builder(data_cfg) -> tfds.core.DatasetBuilder:
    """A prepared builder for ``data_cfg.name`` (building cab_digits if needed); never downloads."""
    name, data_dir = data_cfg.name, loader.tfds_data_dir(data_cfg)
    if name == DIGITS_NAME:
        builder = CabDigits(image_size=data_cfg.image_size, data_dir=data_dir)
        if not builder.is_prepared():
            builder.download_and_prepare(file_format="array_record")
    else:
        builder = loader.open_prepared_builder(name, data_dir)
    try:
        label = builder.info.features["label"]
    except KeyError:
        label = None
    if label is None or getattr(label, "num_classes", None) != data_cfg.num_classes:
        raise ConfigError(
            f"Dataset '{name}' label feature is {label!r}; expected a ClassLabel with "
            f"num_classes={data_cfg.num_classes} (data_cfg.num_classes)."
        )
    return builder


def _split_labels(builder: tfds.core.DatasetBuilder, split: str) -> np.ndarray:
    """All labels of ``split`` in order, read once without decoding images and cached next to the data.

    The cache (``cab_jax_labels.<split>.npy`` in the dataset's directory) saves ImageNet's one-off
    full scan; when the directory is read-only the scan is simply repeated next time.
    """
    num_examples = builder.info.splits[split].num_examples
    cache = epath.Path(builder.data_dir) / f"cab_jax_labels.{loader.split_file_name(split)}.npy"
    if cache.exists():
        with cache.open("rb") as f:
            labels = np.load(f)
        if labels.shape == (num_examples,):
            return labels
    skip = {key: tfds.decode.SkipDecoding() for key in builder.info.features if key != "label"}
    source = builder.as_data_source(split=split, decoders=skip)
    labels = np.empty((num_examples,), np.int64)
    for start in range(0, num_examples, _LABEL_SCAN_CHUNK):
        stop = min(start + _LABEL_SCAN_CHUNK, num_examples)
        labels[start:stop] = [record["label"] for record in source.__getitems__(range(start, stop))]
    try:
        tmp = cache.parent / f"{cache.name}.tmp{os.getpid()}"
        with tmp.open("wb") as f:
            np.save(f, labels)
        tmp.rename(cache)
    except OSError as e:  # read-only data_dir: fine, just slower next time
        logging.warning("could not cache labels of %s[%s] at %s: %s", builder.name, split, cache, e)
    return labels


def _encoded_images(builder: tfds.core.DatasetBuilder) -> dict | None:
    """Read an encoded ``image`` (JPEG, PNG) as its bytes: the transforms decode it once, with PIL."""
    if isinstance(builder.info.features["image"], tfds.features.Image):
        return {"image": tfds.decode.SkipDecoding()}
    return None


def _train_source(data_cfg, seed: int) -> loader.Source:
    if data_cfg.synthetic:
        return SyntheticSource(
            size=data_cfg.synthetic_size,
            image_size=data_cfg.image_size,
            num_classes=data_cfg.num_classes,
            seed=seed,
        )
    builder = _open_builder(data_cfg)
    source = loader.split_source(builder, data_cfg.train_split, decoders=_encoded_images(builder))
    if data_cfg.subset_fraction == 1.0:
        indices = np.arange(len(source))
    else:
        labels = _split_labels(builder, data_cfg.train_split)
        indices = per_class_subset(labels, data_cfg.subset_fraction, data_cfg.subset_seed)
    return IndexedSource(source, indices)


def _eval_source(data_cfg) -> loader.Source:
    if data_cfg.synthetic:
        return SyntheticSource(
            size=data_cfg.synthetic_size,
            image_size=data_cfg.image_size,
            num_classes=data_cfg.num_classes,
            seed=loader.SYNTHETIC_EVAL_SEED,
        )
    builder = _open_builder(data_cfg)
    source = loader.split_source(builder, data_cfg.eval_split, decoders=_encoded_images(builder))
    return IndexedSource(source, np.arange(len(source)))


def _output_keys(return_index: bool, *extra: str) -> tuple[str, ...]:
    return (*_OUTPUT_KEYS, *extra, *(("index",) if return_index else ()))


def train_transform(data_cfg) -> TrainTransform:
    """The per-example training transform ``data_cfg`` asks for (crop, flip, RandAugment, erasing)."""
    return TrainTransform(image_size=data_cfg.image_size, crop_scale=tuple(data_cfg.crop_scale), hflip=data_cfg.hflip,
                          mean=tuple(data_cfg.mean), std=tuple(data_cfg.std), interpolation=data_cfg.interpolation,
                          randaugment_policy=data_cfg.randaugment, random_erase=data_cfg.random_erase)


def eval_transform(data_cfg) -> EvalTransform:
    """The per-example evaluation transform ``data_cfg`` asks for (resize, centre crop)."""
    return EvalTransform(image_size=data_cfg.image_size, mean=tuple(data_cfg.mean), std=tuple(data_cfg.std),
                         interpolation=data_cfg.interpolation)


def repeated_augmentation(data_cfg) -> int:
    """How many times each example read in an epoch repeats: ``data_cfg.repeated_augmentation`` when the job
    trains on more than one device (the original's distributed runs), else 1."""
    import jax  # lazy: the data package imports no JAX (grain's workers need none)

    return int(data_cfg.repeated_augmentation) if jax.device_count() > 1 else 1


def _train_pipeline(
    data_cfg,
    global_batch_size: int,
    seed: int,
    process_index: int | None,
    process_count: int | None,
    return_index: bool,
) -> tuple[grain.MapDataset, int]:
    """(local-batch MapDataset, number of training examples)."""
    source = _train_source(data_cfg, seed)  # first: a missing dataset is the first error
    ds = loader.train_batches(
        source,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        description=f"examples of '{data_cfg.name}' after subset_fraction={data_cfg.subset_fraction}",
        augment=lambda: train_transform(data_cfg),
        repeats=repeated_augmentation(data_cfg),
    )
    return ds.map(SelectKeys(_output_keys(return_index))), len(source)


# --------------------------------------------------------------------------------------------------
# Public API (the same names as cab_jax.data.text).


def prepare(data_cfg) -> None:
    """Builds what the pipelines of ``data_cfg`` read: cab_digits, and a per-class subset's label cache.

    For another dataset it checks that the dataset is prepared (``FileNotFoundError`` otherwise).
    Synthetic data needs nothing.
    """
    if not data_cfg.synthetic:
        _train_source(data_cfg, seed=0)
        _eval_source(data_cfg)


def train_size(data_cfg) -> int:
    """Number of training examples after the per-class subset (``synthetic_size`` if synthetic)."""
    if data_cfg.synthetic:
        return int(data_cfg.synthetic_size)
    return len(_train_source(data_cfg, seed=0))


def train_dataset(
    data_cfg,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    return_index: bool = False,
) -> grain.MapDataset:
    """The infinite training ``MapDataset`` of this process's local batches (order: :mod:`cab_jax.data.loader`).

    Element ``s`` is the local part of global step ``s``. Usually you want
    :func:`train_iterator`, which wraps this in a (checkpointable) iterator.
    """
    return _train_pipeline(data_cfg, global_batch_size, seed, process_index, process_count, return_index)[0]


def train_iterator(
    data_cfg,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    return_index: bool = False,
) -> loader.TrainIterator:
    """Infinite iterator of ``{"image": float32 (L, H, W, 3), "label": int32 (L,)}`` local batches.

    ``L = global_batch_size // process_count``; each process reads only its rows of each global
    batch. ``process_index`` / ``process_count`` default to ``jax.process_index()`` /
    ``jax.process_count()``. ``return_index=True`` adds ``"index"`` (int64 position in the train
    split), for tests and debugging. Checkpoint it with ``get_state()`` / ``set_state()`` (see
    :class:`cab_jax.data.loader.TrainIterator`); with ``data_cfg.num_workers > 0`` call ``close()``
    when done to stop the worker processes.

    Raises:
      FileNotFoundError: the dataset is not prepared in ``data_cfg.data_dir`` (before anything else).
      ValueError: ``global_batch_size`` is not a multiple of ``process_count`` or exceeds the
        (subset) training set.
    """
    ds, size = _train_pipeline(data_cfg, global_batch_size, seed, process_index, process_count, return_index)
    identity = {"seed": int(seed), "global_batch_size": int(global_batch_size), "num_examples": size}
    return loader.TrainIterator(ds, num_workers=data_cfg.num_workers, identity=identity)


def eval_batches(
    data_cfg,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    return_index: bool = False,
) -> loader.EvalBatches:
    """One padded, masked pass over ``data_cfg.eval_split`` per iteration.

    Batches are ``{"image": float32 (L, H, W, 3), "label": int32 (L,), "mask": float32 (L,)}``; the
    last global batch is padded with zero images (label 0) whose ``mask`` is 0. Global batch ``k``
    holds split examples ``[k G, (k+1) G)`` (padding past the end); process ``p`` gets its rows
    ``[p L, (p+1) L)``. ``return_index=True`` adds ``"index"`` (-1 for padding).

    Raises:
      FileNotFoundError: the dataset is not prepared in ``data_cfg.data_dir`` (before anything else).
      ValueError: ``global_batch_size`` is not a multiple of ``process_count``.
    """
    source = _eval_source(data_cfg)
    return loader.padded_eval_batches(
        source,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        num_workers=data_cfg.num_workers,
        keys=_output_keys(return_index, "mask"),
        pad=lambda length: PaddedSource(source, length=length, image_size=data_cfg.image_size),
        transform=lambda: eval_transform(data_cfg),
    )

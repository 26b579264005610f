"""Input pipelines: TFDS array_record splits read by grain, sharded per process, resumable.

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
  mean, std (tuples of 3 floats): per-channel normalisation on the 0..1 scale.

Training order and resume. With ``n`` subset examples, global batch ``G`` and ``P`` processes, the
global example stream is, epoch after epoch, a fresh permutation of the ``n`` examples (grain's index
shuffle seeded from ``seed`` and the epoch), cut into ``n // G`` global batches; the last ``n % G``
examples of each epoch's permutation are dropped. Process ``p`` reads rows ``[p * G/P, (p+1) * G/P)``
of every global batch and nothing else. The augmentation of an example is drawn from a generator that
grain derives from (``seed``, position in that stream), so it does not depend on ``P`` or on the
number of workers: the concatenation of the processes' batches is the same global batch for any
``P``. Steps per epoch: ``n // G``. The pipeline is a grain ``MapDataset`` (random access by step), so
the iterator's state is just the step: ``it.get_state()`` is a small JSON-able dict that
``it.set_state(state)`` restores exactly, also into an iterator with another ``num_workers`` or
process count (checkpoint it with orbax's grain support, or as JSON).

The text pipelines (:mod:`cab_jax.data.text`) share the machinery here: :func:`open_prepared_builder`,
:func:`split_source`, :func:`train_batches`, :func:`padded_eval_batches`, :class:`TrainIterator` and
:class:`EvalBatches`.

Multi-host: prepare cab_digits once before launching many processes on one shared ``data_dir``
(each process would otherwise try to build it); other datasets are only read.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from etils import epath

from cab_jax.data.augment import EvalTransform, TrainTransform
from cab_jax.data.digits import CabDigits
from cab_jax.data.sources import IndexedSource, PaddedSource, SelectKeys, SyntheticSource
from cab_jax.data.subset import per_class_subset

DIGITS_NAME = "cab_digits"
SYNTHETIC_EVAL_SEED = 0x5EED_E7A1
# Elements of the grain datasets below are whole local batches, so these count batches.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)
_PER_WORKER_BUFFER = 2
_LABEL_SCAN_CHUNK = 8192
_OUTPUT_KEYS = ("image", "label")

Batch = dict[str, np.ndarray]


# --------------------------------------------------------------------------------------------------
# Opening datasets.


def _data_dir(data_cfg) -> str | None:
    return data_cfg.data_dir or None


def _prepare_hint(name: str, data_dir: str | None) -> str:
    dir_flag = f" --data_dir={data_dir}" if data_dir else ""
    if name.split("/")[0].startswith("imagenet"):
        return (
            "ImageNet needs a manual download: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
            f"in MANUAL_DIR, then run `tfds build {name}{dir_flag} --manual_dir=MANUAL_DIR "
            "--file_format=array_record`."
        )
    return f"Prepare it with `tfds build {name}{dir_flag} --file_format=array_record`."


def open_prepared_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """The builder of TFDS dataset ``name`` already prepared in ``data_dir`` as array_record; never downloads.

    Raises:
      FileNotFoundError: the dataset is not prepared there (naming the directory and how to prepare it).
      ValueError: it is prepared in another file format.
    """
    missing = (
        f"Dataset '{name}' is not prepared in data_dir '{data_dir or '(TFDS default)'}'; this "
        f"pipeline never downloads. {_prepare_hint(name, data_dir)}"
    )
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise FileNotFoundError(f"{missing} (TFDS knows no dataset of that name either.)") from e
    if not builder.is_prepared():
        raise FileNotFoundError(f"{missing} (Looked in {builder.data_dir}.)")
    file_format = builder.info.file_format
    if file_format is None or file_format.name != "ARRAY_RECORD":
        raise ValueError(
            f"Dataset '{name}' in {builder.data_dir} is stored as {file_format}, which grain cannot "
            "read by random access; re-prepare it with --file_format=array_record."
        )
    return builder


def _open_builder(data_cfg) -> tfds.core.DatasetBuilder:
    """A prepared builder for ``data_cfg.name`` (building cab_digits if needed); never downloads."""
    name, data_dir = data_cfg.name, _data_dir(data_cfg)
    if name == DIGITS_NAME:
        builder = CabDigits(image_size=data_cfg.image_size, data_dir=data_dir)
        if not builder.is_prepared():
            builder.download_and_prepare(file_format="array_record")
    else:
        builder = open_prepared_builder(name, data_dir)
    try:
        label = builder.info.features["label"]
    except KeyError:
        label = None
    if label is None or getattr(label, "num_classes", None) != data_cfg.num_classes:
        raise ValueError(
            f"Dataset '{name}' label feature is {label!r}; expected a ClassLabel with "
            f"num_classes={data_cfg.num_classes} (data_cfg.num_classes)."
        )
    return builder


def split_source(builder: tfds.core.DatasetBuilder, split: str, **kwargs) -> Sequence[dict[str, Any]]:
    """The grain-readable data source of ``split`` of a prepared builder (ValueError naming the splits)."""
    try:
        builder.info.splits[split]
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"Dataset '{builder.name}' has no split {split!r}; it has {sorted(builder.info.splits)}."
        ) from e
    return builder.as_data_source(split=split, **kwargs)


def _split_labels(builder: tfds.core.DatasetBuilder, split: str) -> np.ndarray:
    """All labels of ``split`` in order, read once without decoding images and cached next to the data.

    The cache (``cab_jax_labels.<split>.npy`` in the dataset's directory) saves ImageNet's one-off
    full scan; when the directory is read-only the scan is simply repeated next time.
    """
    num_examples = builder.info.splits[split].num_examples
    cache = epath.Path(builder.data_dir) / f"cab_jax_labels.{re.sub(r'[^A-Za-z0-9_.-]', '_', split)}.npy"
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


def _train_source(data_cfg, seed: int) -> Sequence[dict[str, Any]]:
    if data_cfg.synthetic:
        return SyntheticSource(
            size=data_cfg.synthetic_size,
            image_size=data_cfg.image_size,
            num_classes=data_cfg.num_classes,
            seed=seed,
        )
    builder = _open_builder(data_cfg)
    source = split_source(builder, data_cfg.train_split)
    if data_cfg.subset_fraction == 1.0:
        indices = np.arange(len(source))
    else:
        labels = _split_labels(builder, data_cfg.train_split)
        indices = per_class_subset(labels, data_cfg.subset_fraction, data_cfg.subset_seed)
    return IndexedSource(source, indices)


def _eval_source(data_cfg) -> Sequence[dict[str, Any]]:
    if data_cfg.synthetic:
        return SyntheticSource(
            size=data_cfg.synthetic_size,
            image_size=data_cfg.image_size,
            num_classes=data_cfg.num_classes,
            seed=SYNTHETIC_EVAL_SEED,
        )
    source = split_source(_open_builder(data_cfg), data_cfg.eval_split)
    return IndexedSource(source, np.arange(len(source)))


# --------------------------------------------------------------------------------------------------
# Batching and sharding.


def process_layout(
    global_batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
    """(process_index, process_count, local_batch_size), defaults from JAX, validated."""
    if process_index is None or process_count is None:
        import jax  # lazy: grain's worker processes import this package and need no JAX

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index={process_index} for process_count={process_count}")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of the number of "
            f"processes ({process_count})."
        )
    return process_index, process_count, global_batch_size // process_count


def to_iter_dataset(ds: grain.MapDataset, num_workers: int) -> grain.IterDataset:
    """``ds`` read in order with a few threads, or by ``num_workers`` > 0 grain worker processes."""
    iter_ds = ds.to_iter_dataset(_READ_OPTIONS)
    if num_workers > 0:
        # grain's worker processes read absl flags (its --grain_* options). Inside an absl app they are
        # parsed already; elsewhere (pytest, notebooks) accept the defaults instead of crashing.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=_PER_WORKER_BUFFER)
        )
    return iter_ds


def _output_keys(return_index: bool, *extra: str) -> tuple[str, ...]:
    return (*_OUTPUT_KEYS, *extra, *(("index",) if return_index else ()))


def train_batches(
    source: Sequence[dict[str, Any]],
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None,
    process_count: int | None,
    description: str,
    augment: Callable[[], grain.transforms.RandomMap] | None = None,
) -> grain.MapDataset:
    """This process's local batches of the whole global batches of ``source``, reshuffled every epoch, repeated.

    Stream order as in the module docstring. ``augment()`` (built after the checks) makes a random map applied
    to each example before batching, seeded from ``seed`` and the example's stream position.

    Raises:
      ValueError: a bad process layout (:func:`process_layout`), or ``global_batch_size`` exceeds
        ``len(source)``, described in the message as ``"{len(source)} {description}"``.
    """
    process_index, process_count, local_batch = process_layout(global_batch_size, process_index, process_count)
    size = len(source)
    if global_batch_size > size:
        raise ValueError(
            f"global_batch_size={global_batch_size} is larger than the training set ({size} {description})."
        )
    steps_per_epoch = size // global_batch_size
    shuffle_seed, augment_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    # Stream index n * epoch + i is example i of that epoch's permutation: shuffle, random_map, batch
    # and slice all carry the epoch through their index arithmetic, and repeat() moves to the next.
    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed)
    if augment is not None:
        ds = ds.random_map(augment(), seed=augment_seed)
    ds = ds.batch(local_batch, drop_remainder=True)  # sub-batch m = rows [m L, (m+1) L) of the stream
    ds = ds[: steps_per_epoch * process_count]  # whole global batches only
    ds = ds[process_index::process_count]  # global batch k = sub-batches k P .. k P + P - 1
    return ds.repeat()


def padded_eval_batches(
    source: Sequence[dict[str, Any]],
    *,
    global_batch_size: int,
    process_index: int | None,
    process_count: int | None,
    num_workers: int,
    keys: tuple[str, ...],
    pad: Callable[[int], Sequence[dict[str, Any]]],
    transform: Callable[[], grain.transforms.Map] | None = None,
) -> EvalBatches:
    """One pass over ``source`` in global batches, the last one padded by ``pad(length)``; this process's rows.

    ``transform()`` (built after the checks) makes a map applied to each example; batches keep only ``keys``.
    Raises ValueError on a bad process layout (:func:`process_layout`).
    """
    process_index, process_count, local_batch = process_layout(global_batch_size, process_index, process_count)
    padded = pad(math.ceil(len(source) / global_batch_size) * global_batch_size)
    ds = grain.MapDataset.source(padded)
    if transform is not None:
        ds = ds.map(transform())
    ds = ds.batch(local_batch)[process_index::process_count].map(SelectKeys(keys))
    return EvalBatches(ds, num_examples=len(source), num_workers=num_workers)


# --------------------------------------------------------------------------------------------------
# Public API.


def train_dataset_size(data_cfg) -> int:
    """Number of training examples after the per-class subset (``synthetic_size`` if synthetic)."""
    if data_cfg.synthetic:
        return int(data_cfg.synthetic_size)
    return len(_train_source(data_cfg, seed=0))


def make_train_dataset(
    data_cfg,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    return_index: bool = False,
) -> grain.MapDataset:
    """The infinite training ``MapDataset`` of this process's local batches (see module docstring).

    Element ``s`` is the local part of global step ``s``. Usually you want
    :func:`make_train_iterator`, which wraps this in a (checkpointable) iterator.
    """
    return _train_pipeline(data_cfg, global_batch_size, seed, process_index, process_count, return_index)[0]


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
    ds = train_batches(
        source,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        description=f"examples of '{data_cfg.name}' after subset_fraction={data_cfg.subset_fraction}",
        augment=lambda: TrainTransform(
            image_size=data_cfg.image_size,
            crop_scale=tuple(data_cfg.crop_scale),
            hflip=data_cfg.hflip,
            mean=tuple(data_cfg.mean),
            std=tuple(data_cfg.std),
        ),
    )
    return ds.map(SelectKeys(_output_keys(return_index))), len(source)


class TrainIterator(grain.DatasetIterator):
    """Checkpointable iterator over an infinite ``MapDataset`` of local batches, whose state is just the step.

    ``get_state()`` is ``{"step", **identity}`` (JSON-able ints; the image and text pipelines put
    ``seed``, ``global_batch_size``, ``num_examples`` and for text ``seq_len`` in ``identity``).
    ``set_state()`` re-opens the dataset at that step, so a state saved with any ``num_workers`` or
    process count restores with any other (the global batches do not depend on them); a state from a
    pipeline with another identity (seed, global batch size, training-set size...) is refused with ValueError.
    It is a ``grain.DatasetIterator``, so orbax's grain checkpoint support can save it.
    """

    def __init__(self, dataset: grain.MapDataset, *, num_workers: int, identity: dict[str, int]):
        super().__init__()
        self._dataset = dataset
        self._num_workers = num_workers
        self._identity = dict(identity)
        self._step = 0
        self._inner: grain.DatasetIterator | None = None

    def _iterator(self) -> grain.DatasetIterator:
        self._assert_not_closed()
        if self._inner is None:
            ds = self._dataset if self._step == 0 else self._dataset[self._step :]
            self._inner = iter(to_iter_dataset(ds, self._num_workers))
        return self._inner

    def __next__(self) -> Batch:
        batch = next(self._iterator())
        self._step += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"step": self._step, **self._identity}

    def set_state(self, state: dict[str, Any]) -> None:
        mismatched = {k: (state.get(k), v) for k, v in self._identity.items() if state.get(k) != v}
        if mismatched:
            raise ValueError(
                "train iterator state belongs to another pipeline; (saved, current) values: "
                + ", ".join(f"{k}={v}" for k, v in mismatched.items())
            )
        self._drop_inner()
        self._step = int(state["step"])

    def start_prefetch(self) -> None:
        start = getattr(self._iterator(), "start_prefetch", None)
        if start is not None:
            start()

    def _drop_inner(self) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None

    def close(self) -> None:
        self._drop_inner()
        super().close()

    def __str__(self) -> str:
        return f"TrainIterator(step={self._step}, {self._identity})"


def make_train_iterator(
    data_cfg,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    return_index: bool = False,
) -> TrainIterator:
    """Infinite iterator of ``{"image": float32 (L, H, W, 3), "label": int32 (L,)}`` local batches.

    ``L = global_batch_size // process_count``; each process reads only its rows of each global
    batch. ``process_index`` / ``process_count`` default to ``jax.process_index()`` /
    ``jax.process_count()``. ``return_index=True`` adds ``"index"`` (int64 position in the train
    split), for tests and debugging. Checkpoint it with ``get_state()`` / ``set_state()`` (see
    :class:`TrainIterator`); with ``data_cfg.num_workers > 0`` call ``close()`` when done to stop the
    worker processes.

    Raises:
      FileNotFoundError: the dataset is not prepared in ``data_cfg.data_dir`` (before anything else).
      ValueError: ``global_batch_size`` is not a multiple of ``process_count`` or exceeds the
        (subset) training set.
    """
    ds, size = _train_pipeline(data_cfg, global_batch_size, seed, process_index, process_count, return_index)
    identity = {"seed": int(seed), "global_batch_size": int(global_batch_size), "num_examples": size}
    return TrainIterator(ds, num_workers=data_cfg.num_workers, identity=identity)


class EvalBatches:
    """Re-iterable eval pass: each ``iter()`` yields every example of the split exactly once.

    Image batches are ``{"image": float32 (L, H, W, 3), "label": int32 (L,), "mask": float32 (L,)}``;
    the last global batch is padded with zero images whose ``mask`` is 0 (text batches: see
    :mod:`cab_jax.data.text`). Every process yields ``len(self)`` batches.
    """

    def __init__(self, dataset: grain.MapDataset, *, num_examples: int, num_workers: int):
        self._dataset = dataset
        self.num_examples = num_examples
        self._num_workers = num_workers

    def __len__(self) -> int:
        return len(self._dataset)

    def __iter__(self) -> Iterator[Batch]:
        iterator = iter(to_iter_dataset(self._dataset, self._num_workers))
        try:
            yield from iterator
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()


def make_eval_batches(
    data_cfg,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    return_index: bool = False,
) -> EvalBatches:
    """One padded, masked pass over ``data_cfg.eval_split`` per iteration (see :class:`EvalBatches`).

    Global batch ``k`` holds split examples ``[k G, (k+1) G)`` (padding past the end); process ``p``
    gets its rows ``[p L, (p+1) L)``. ``return_index=True`` adds ``"index"`` (-1 for padding).

    Raises:
      FileNotFoundError: the dataset is not prepared in ``data_cfg.data_dir`` (before anything else).
      ValueError: ``global_batch_size`` is not a multiple of ``process_count``.
    """
    source = _eval_source(data_cfg)
    return padded_eval_batches(
        source,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        num_workers=data_cfg.num_workers,
        keys=_output_keys(return_index, "mask"),
        pad=lambda length: PaddedSource(source, length=length, image_size=data_cfg.image_size),
        transform=lambda: EvalTransform(
            image_size=data_cfg.image_size, mean=tuple(data_cfg.mean), std=tuple(data_cfg.std)
        ),
    )

"""Generic grain/TFDS plumbing both domains share: prepared TFDS splits, the training stream, the eval pass.

:mod:`cab_jax.data.images` and :mod:`cab_jax.data.text` build their sources (what one example is, how
their datasets are built or cached) and hand them to :func:`train_batches` and
:func:`padded_eval_batches` here, so both domains have the same order, sharding and resume:

Training order and resume. With ``n`` training examples (images: after the per-class subset; text:
packed windows), global batch ``G`` and ``P`` processes, the global example stream is, epoch after
epoch, a fresh permutation of the ``n`` examples (grain's index shuffle seeded from ``seed`` and the
epoch), cut into ``n // G`` global batches; the last ``n % G`` examples of each epoch's permutation are
dropped. Process ``p`` reads rows ``[p * G/P, (p+1) * G/P)`` of every global batch and nothing else.
The augmentation of an example (images) is drawn from a generator that grain derives from (``seed``,
position in that stream), so it does not depend on ``P`` or on the number of workers: the
concatenation of the processes' batches is the same global batch for any ``P``. Steps per epoch:
``n // G``. The pipeline is a grain ``MapDataset`` (random access by step), so the iterator's state is
just the step: ``it.get_state()`` is a small JSON-able dict that ``it.set_state(state)`` restores
exactly, also into an iterator with another ``num_workers`` or process count (checkpoint it with
orbax's grain support, or as JSON); see :class:`TrainIterator`.

Eval. One pass over the split in global batches, split examples ``[k G, (k+1) G)`` in global batch
``k``, the last one padded with examples that the domain's mask marks 0; process ``p`` gets rows
``[p G/P, (p+1) G/P)`` of each; see :class:`EvalBatches`.

``process_index`` / ``process_count`` default to ``jax.process_index()`` / ``jax.process_count()``;
JAX is imported only then, since grain's worker processes need none.
"""

from __future__ import annotations

import atexit
import gc
import math
import multiprocessing.resource_tracker
import os
import re
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from cab_jax.data.sources import SelectKeys
from cab_jax.errors import ConfigError, FileFormatError, PathError

# The seed of the synthetic eval set (the train set is seeded from the run's seed).
SYNTHETIC_EVAL_SEED = 0x5EED_E7A1
# Elements of the grain datasets below are whole local batches, so these count batches.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)
_PER_WORKER_BUFFER = 2
# What SLURM sends every process of a job step (SIGTERM) and a terminal's Ctrl-C its process group (SIGINT).
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

Batch = dict[str, np.ndarray]
Source = Sequence[dict[str, Any]]


# --------------------------------------------------------------------------------------------------
# Prepared TFDS datasets.


def tfds_data_dir(data_cfg) -> str | None:
    """``data_cfg.data_dir``, or None (the TFDS default) when it is empty."""
    return data_cfg.data_dir or None


def split_file_name(split: str) -> str:
    """``split`` (any TFDS split expression) as a file-name part, for caches next to the data."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", split)


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
      PathError (a FileNotFoundError): the dataset is not prepared there (naming the directory and how to
        prepare it).
      FileFormatError (a ValueError): it is prepared in another file format.
    """
    missing = (
        f"Dataset '{name}' is not prepared in data_dir '{data_dir or '(TFDS default)'}'; this "
        f"pipeline never downloads. {_prepare_hint(name, data_dir)}"
    )
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise PathError(f"{missing} (TFDS knows no dataset of that name either.)") from None
    if not builder.is_prepared():
        raise PathError(f"{missing} (Looked in {builder.data_dir}.)")
    file_format = builder.info.file_format
    if file_format is None or file_format.name != "ARRAY_RECORD":
        raise FileFormatError(
            f"Dataset '{name}' in {builder.data_dir} is stored as {file_format}, which grain cannot "
            "read by random access; re-prepare it with --file_format=array_record."
        )
    return builder


def split_source(builder: tfds.core.DatasetBuilder, split: str, **kwargs) -> Source:
    """The grain-readable data source of ``split`` of a prepared builder (ValueError naming the splits)."""
    try:
        builder.info.splits[split]
    except (KeyError, ValueError) as e:
        raise ConfigError(
            f"Dataset '{builder.name}' has no split {split!r}; it has {sorted(builder.info.splits)}."
        ) from e
    return builder.as_data_source(split=split, **kwargs)


# --------------------------------------------------------------------------------------------------
# Batching and sharding.


def process_layout(
    global_batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
    """(process_index, process_count, local_batch_size), defaults from JAX, validated."""
    if process_index is None or process_count is None:
        import jax  # lazy: the data package imports no JAX (grain's workers need none)

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
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=_PER_WORKER_BUFFER),
            worker_init_fn=init_worker,
        )
        # The workers' batches arrive in shared memory, freed only when the last reference goes; JAX may hold one
        # (a zero-copy CPU array, a pending host-to-device copy) until the interpreter exits, past grain's deleter
        # thread, and the segment is then reported leaked. Own a copy instead, made in a background thread.
        iter_ds = grain.experimental.ThreadPrefetchIterDataset(iter_ds.map(_owned_copy), prefetch_buffer_size=2)
    return iter_ds


def open_iterator(ds: grain.MapDataset, num_workers: int) -> grain.DatasetIterator:
    """An iterator over :func:`to_iter_dataset` with its background threads started.

    With workers, those threads start with SIGTERM and SIGINT blocked, and so do the worker processes they spawn
    (a thread's signal mask passes to the threads and processes it starts): a signal sent to the whole job or
    process group while a worker still starts cannot kill it before :func:`init_worker` ignores it. In this thread
    a signal that came meanwhile is delivered when the mask is restored, on return.
    """
    if not num_workers:
        return iter(to_iter_dataset(ds, num_workers))
    # The workers' spawn starts multiprocessing's resource tracker if it is not running, and CPython's start of it
    # unblocks both signals in the starting thread; started here, before the mask, it is running by then.
    multiprocessing.resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        iterator = iter(to_iter_dataset(ds, num_workers))
        start = getattr(iterator, "start_prefetch", None)
        if start is not None:
            start()
        return iterator
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _owned_copy(batch: Batch) -> Batch:
    return {k: np.array(v) for k, v in batch.items()}


def release_closed_iterators() -> None:
    """Free grain's closed iterators now, after worker processes read (a full garbage collection, about 0.5 s).
    They sit in reference cycles that still hold the batches their worker processes had prefetched into shared
    memory; left to the garbage collector they may survive until the interpreter exits, after grain's deleter
    thread, and their segments are then reported leaked."""
    gc.collect()


def init_worker(worker_index: int, worker_count: int) -> None:
    """grain worker initialiser. The worker ignores SIGTERM and SIGINT: SLURM signals every process of a job step, a
    terminal's Ctrl-C its whole process group, and the trainer, stopping at an agreed step, still reads batches after
    the signal (grain stops its workers itself, by an event, then SIGKILL). Both arrive blocked (:func:`open_iterator`)
    and are unblocked once ignored. The worker exits as soon as the process that started it is gone, even when that
    process was killed (SIGKILL, the kernel's OOM killer) and could not stop them."""
    del worker_index, worker_count
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def train_batches(
    source: Source,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None,
    process_count: int | None,
    description: str,
    augment: Callable[[], grain.transforms.RandomMap] | None = None,
    repeats: int = 1,
) -> grain.MapDataset:
    """This process's local batches of the whole global batches of ``source``, reshuffled every epoch, repeated.

    Stream order as in the module docstring. ``augment()`` (built after the checks) makes a random map applied
    to each example before batching, seeded from ``seed`` and the example's stream position. ``repeats`` k > 1:
    each epoch's stream is its permutation's first ``len(source) / k`` examples, each k times in a row (so k
    augmentations of one example land in one global batch, as DeiT's RASampler puts them on k devices).

    Raises:
      ValueError: a bad process layout (:func:`process_layout`), or ``global_batch_size`` exceeds
        ``len(source)``, described in the message as ``"{len(source)} {description}"``.
    """
    process_index, process_count, local_batch = process_layout(global_batch_size, process_index, process_count)
    size = len(source)
    if global_batch_size > size:
        raise ConfigError(
            f"global_batch_size={global_batch_size} is larger than the training set ({size} {description})."
        )
    steps_per_epoch = size // global_batch_size
    shuffle_seed, augment_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    # Stream index n * epoch + i is example i of that epoch's permutation: shuffle, random_map, batch
    # and slice all carry the epoch through their index arithmetic, and repeat() moves to the next.
    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed)
    if repeats > 1:
        ds = RepeatEach(ds, repeats)
    if augment is not None:
        ds = ds.random_map(augment(), seed=augment_seed)
    ds = ds.batch(local_batch, drop_remainder=True)  # sub-batch m = rows [m L, (m+1) L) of the stream
    ds = ds[: steps_per_epoch * process_count]  # whole global batches only
    ds = ds[process_index::process_count]  # global batch k = sub-batches k P .. k P + P - 1
    return ds.repeat()


class RepeatEach(grain.MapDataset):
    """``parent`` (whose index n * epoch + i is example i of that epoch) with each example of an epoch repeated
    ``k`` times in a row, the epoch keeping its length: epoch e is parent's e-th epoch's first len / k examples."""

    def __init__(self, parent: grain.MapDataset, k: int):
        super().__init__(parent)
        self._k = int(k)

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(index, len(self))
        return self._parent[epoch * len(self) + i // self._k]

    def __str__(self) -> str:
        return f"RepeatEach(k={self._k})"


def padded_eval_batches(
    source: Source,
    *,
    global_batch_size: int,
    process_index: int | None,
    process_count: int | None,
    num_workers: int,
    keys: tuple[str, ...],
    pad: Callable[[int], Source],
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
# Iterators.


_OPEN_TRAIN_ITERATORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_train_iterators() -> None:
    """At interpreter exit, before modules are torn down, close the train iterators a program left open: their
    worker processes stop and their shared memory is freed. Left to grain's finalizers, they fail at teardown
    (``'NoneType' object has no attribute ...``) and the resource tracker reports leaked segments."""
    for iterator in list(_OPEN_TRAIN_ITERATORS):
        iterator.close()


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
        _OPEN_TRAIN_ITERATORS.add(self)

    def _iterator(self) -> grain.DatasetIterator:
        self._assert_not_closed()
        if self._inner is None:
            ds = self._dataset if self._step == 0 else self._dataset[self._step :]
            self._inner = open_iterator(ds, self._num_workers)
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
            if self._num_workers:
                release_closed_iterators()

    def close(self) -> None:
        self._drop_inner()
        _OPEN_TRAIN_ITERATORS.discard(self)
        super().close()

    def __str__(self) -> str:
        return f"TrainIterator(step={self._step}, {self._identity})"


class EvalBatches:
    """Re-iterable eval pass: each ``iter()`` yields every example of the split exactly once.

    The last global batch is padded; the domain's mask marks the padding 0 (images: ``mask``, with zero
    images; text: ``loss_mask``, with zero tokens; see :func:`cab_jax.data.images.eval_batches` and
    :func:`cab_jax.data.text.eval_batches`). Every process yields ``len(self)`` batches;
    ``num_examples`` is the number of real (unpadded) examples in the split.
    """

    def __init__(self, dataset: grain.MapDataset, *, num_examples: int, num_workers: int):
        self._dataset = dataset
        self.num_examples = num_examples
        self._num_workers = num_workers

    def __len__(self) -> int:
        return len(self._dataset)

    def first(self) -> Batch:
        """This process's first batch (to compile the eval step for), read here: starting data workers for one
        batch would cost more than reading it (each worker imports grain and JAX first)."""
        batches = self._batches(num_workers=0)
        try:
            return next(batches)
        finally:
            batches.close()

    def __iter__(self) -> Iterator[Batch]:
        """One pass, read by at most one worker per batch, and in this process when there is one batch (as
        ``first``)."""
        return self._batches(min(self._num_workers, len(self)) if len(self) > 1 else 0)

    def _batches(self, num_workers: int) -> Iterator[Batch]:
        iterator = open_iterator(self._dataset, num_workers)
        try:
            yield from iterator
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
            del iterator
            if num_workers:
                release_closed_iterators()

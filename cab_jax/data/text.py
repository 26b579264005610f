"""Language-model pipelines: packed token windows of cab_text, of a prepared TFDS text dataset, or random tokens.

cab_text is built on first use; an external dataset is packed once into a cache next to it (see Sequences).
The same public names as :mod:`cab_jax.data.images`: :func:`train_size`, :func:`train_dataset`,
:func:`train_iterator`, :func:`eval_batches` and :func:`prepare`; plus :func:`load_tokenizer` and
:func:`load_eos_id`. This module tokenises and packs; the training order, sharding, resume and eval
padding are :mod:`cab_jax.data.loader`'s.

Config fields read (by attribute) from ``data_cfg``, an ``ml_collections.ConfigDict``:

  name (str): "cab_text" (the embedded corpus, see :mod:`cab_jax.data.text_builder`; built into
      ``data_dir`` with its own tokenizer on first use) or any TFDS dataset already prepared in
      ``data_dir`` in array_record format with a string feature ``text_key`` (never downloaded here; a
      missing one raises ``FileNotFoundError`` saying how to prepare it).
  data_dir (str): TFDS data directory (None / "" for the TFDS default).
  seq_len (int): tokens per training sequence; batches hold ``seq_len + 1`` tokens per row.
  vocab_size (int): cab_text: the size of the BPE it trains; otherwise the model's vocabulary, which
      must hold the tokenizer's (synthetic: tokens are drawn from ``[0, vocab_size)``).
  max_corpus_bytes (int): cab_text only: cap on the embedded corpus (UTF-8 bytes).
  tokenizer (str): external datasets only: a tokenizer.json file, or a Hugging Face tokenizer
      directory holding one (its tokenizer_config.json names the end-of-text token; otherwise
      "<|endoftext|>"). Must be empty for cab_text, which uses the one it trained.
  text_key (str): external datasets only: the name of the text feature, e.g. "text".
  train_split, eval_split (str): e.g. "train" and "test" (any TFDS split expression works).
  synthetic (bool): random tokens instead of a dataset; touches no files.
  synthetic_size (int): number of synthetic sequences (train; eval uses as many, another seed).
  num_workers (int): 0 = read in this process; > 0 = that many grain worker processes.

Sequences. Every dataset is packed (see :func:`cab_jax.data.text_builder.pack_windows`): the documents
of a split are tokenised in split order, each followed by the end-of-text token, and cut into windows of
``seq_len + 1`` tokens overlapping by one, so every token is a target exactly once (the last partial
window is dropped). cab_text stores the windows in its TFDS splits. An external split is packed once,
offline, into a cache next to the dataset (``<dataset dir>/cab_jax_packed/<split>.seq<L>.<hash>.bin``
plus a ``.json`` description; the hash covers the split, text key, sequence length and the tokenizer),
so it stays deterministic and random access, and a resume is exact. Batches are
``{"tokens": int32 (L, seq_len + 1), "loss_mask": float32 (L, seq_len)}``; ``loss_mask[i, t]`` says
whether target ``tokens[i, t + 1]`` counts (always 1 in training; 0 on eval padding).

Training order, sharding and resume are :mod:`cab_jax.data.loader`'s, as for images: each epoch a
fresh permutation of the windows (seeded from ``seed`` and the epoch) cut into ``n // G`` global
batches, the remainder dropped; process ``p`` reads rows ``[p G/P, (p+1) G/P)`` of each global batch;
the iterator state is the step (and restores into any process count or worker count).

Multi-host: prepare once (:func:`prepare`) before launching many processes on one shared
``data_dir``; otherwise each process builds cab_text or the packed cache itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import grain
import tensorflow_datasets as tfds
from etils import epath
from tokenizers import Tokenizer

from cab_jax.data import loader, text_corpus
from cab_jax.data.text_builder import TOKENIZER_FILE, CabText, encode_texts, pack_windows
from cab_jax.data.text_sources import (
    PackedFileSource,
    PaddedTokenSource,
    SyntheticTokenSource,
    TrainTokenBatch,
    WindowSource,
)
from cab_jax.errors import ConfigError, FileFormatError, PathError

TEXT_NAME = "cab_text"
_CACHE_DIR = "cab_jax_packed"
_CACHE_FORMAT = 1
_READ_CHUNK = 1024  # documents read from the TFDS source at a time when packing


# --------------------------------------------------------------------------------------------------
# Tokenizers.


def _is_cab_text(data_cfg) -> bool:
    return data_cfg.name == TEXT_NAME


def _cab_text_builder(data_cfg) -> CabText:
    """The prepared cab_text builder for ``data_cfg`` (built on first use)."""
    builder = CabText(
        seq_len=data_cfg.seq_len,
        vocab_size=data_cfg.vocab_size,
        max_corpus_bytes=data_cfg.max_corpus_bytes,
        data_dir=loader.tfds_data_dir(data_cfg),
    )
    if not builder.is_prepared():
        builder.download_and_prepare(file_format="array_record")
    return builder


def _tokenizer_file(data_cfg) -> epath.Path:
    """The tokenizer.json of ``data_cfg`` (building cab_text if needed)."""
    if _is_cab_text(data_cfg):
        if data_cfg.tokenizer:
            raise ConfigError(
                f"data.tokenizer={data_cfg.tokenizer!r} is set, but cab_text trains and uses its own tokenizer; "
                "leave data.tokenizer empty (it is for external datasets)."
            )
        return _cab_text_builder(data_cfg).tokenizer_path
    if not data_cfg.tokenizer:
        raise ConfigError(f"dataset '{data_cfg.name}' needs data.tokenizer (a tokenizer.json or a directory with one).")
    path = epath.Path(data_cfg.tokenizer)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.exists():
        raise PathError(
            f"no tokenizer at {file} (data.tokenizer={data_cfg.tokenizer!r}); expected a tokenizer.json file "
            "or a Hugging Face tokenizer directory containing one."
        )
    return file


def load_tokenizer(data_cfg) -> Tokenizer:
    """The tokenizer of ``data_cfg``: cab_text's own (building it if needed) or ``data_cfg.tokenizer``.

    It ignores ``data_cfg.synthetic``: asking for cab_text's tokenizer builds cab_text.
    """
    return Tokenizer.from_file(os.fspath(_tokenizer_file(data_cfg)))


def _eos_token(tokenizer_file: epath.Path) -> str:
    """The end-of-text token: tokenizer_config.json's ``eos_token`` next to the file, else "<|endoftext|>"."""
    config = tokenizer_file.parent / "tokenizer_config.json"
    if config.exists():
        eos = json.loads(config.read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if eos:
            return eos
    return text_corpus.EOS_TOKEN


def _tokenizer_and_eos(data_cfg) -> tuple[Tokenizer, int]:
    """(tokenizer, end-of-text id), checked against ``data_cfg.vocab_size``."""
    file = _tokenizer_file(data_cfg)
    tokenizer = Tokenizer.from_file(os.fspath(file))
    token = _eos_token(file)
    eos_id = tokenizer.token_to_id(token)
    if eos_id is None:
        raise FileFormatError(f"the tokenizer {file} has no end-of-text token {token!r}.")
    if tokenizer.get_vocab_size() > data_cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer {file} has {tokenizer.get_vocab_size()} tokens > data.vocab_size={data_cfg.vocab_size}."
        )
    return tokenizer, eos_id


def load_eos_id(data_cfg) -> int:
    """The id of the end-of-text token that separates documents (and ends generation)."""
    return _tokenizer_and_eos(data_cfg)[1]


# --------------------------------------------------------------------------------------------------
# Packing external datasets into a cache.


def _text_builder(data_cfg) -> tfds.core.DatasetBuilder:
    builder = loader.open_prepared_builder(data_cfg.name, loader.tfds_data_dir(data_cfg))
    features = builder.info.features
    if data_cfg.text_key not in features or not isinstance(features[data_cfg.text_key], tfds.features.Text):
        raise ConfigError(
            f"Dataset '{data_cfg.name}' has no text feature {data_cfg.text_key!r} (data.text_key); its features "
            f"are {dict(features)}."
        )
    return builder


def _split_texts(builder: tfds.core.DatasetBuilder, split: str, text_key: str) -> Iterator[str]:
    """The texts of ``split`` in order, read in chunks without decoding other features."""
    skip = {key: tfds.decode.SkipDecoding() for key in builder.info.features if key != text_key}
    source = loader.split_source(builder, split, decoders=skip)
    for start in range(0, len(source), _READ_CHUNK):
        for record in source.__getitems__(range(start, min(start + _READ_CHUNK, len(source)))):
            text = record[text_key]
            yield text.decode("utf-8") if isinstance(text, bytes) else str(text)


def _write_cache(
    data_cfg, builder, split: str, tokenizer: Tokenizer, bin_path: epath.Path, meta: dict[str, Any]
) -> dict[str, Any]:
    """Tokenises and packs ``split`` into ``bin_path`` (raw rows), then writes the ``.json`` description."""
    logging.info("packing %s[%s] into %s", builder.info.full_name, split, bin_path)
    texts = _split_texts(builder, split, data_cfg.text_key)
    blocks = pack_windows(
        encode_texts(tokenizer, texts), seq_len=data_cfg.seq_len, eos_id=meta["eos_id"], dtype=meta["dtype"]
    )
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp{os.getpid()}"
    tmp_bin = bin_path.parent / (bin_path.name + suffix)
    num_windows = 0
    with tmp_bin.open("wb") as f:
        for block in blocks:
            f.write(block.tobytes())
            num_windows += block.shape[0]
    meta = {**meta, "num_windows": num_windows}
    meta_path = bin_path.with_suffix(".json")
    tmp_meta = meta_path.parent / (meta_path.name + suffix)
    tmp_meta.write_text(json.dumps(meta, indent=1, sort_keys=True))
    tmp_bin.rename(bin_path)
    tmp_meta.rename(meta_path)  # last: a description means a complete cache
    return meta


def _packed_split(data_cfg, split: str) -> PackedFileSource:
    """The packed windows of ``split`` of an external dataset, from its cache (written on first use)."""
    builder = _text_builder(data_cfg)
    tokenizer, eos_id = _tokenizer_and_eos(data_cfg)
    key = {
        "format": _CACHE_FORMAT,
        "dataset": builder.info.full_name,
        "split": split,
        "text_key": data_cfg.text_key,
        "seq_len": int(data_cfg.seq_len),
        "tokenizer_sha256": hashlib.sha256(tokenizer.to_str().encode()).hexdigest(),
        "eos_id": eos_id,
        "dtype": "uint16" if tokenizer.get_vocab_size() <= 2**16 else "int32",
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = f"{loader.split_file_name(split)}.seq{data_cfg.seq_len}.{digest}.bin"
    bin_path = epath.Path(builder.data_dir) / _CACHE_DIR / name
    meta_path = bin_path.with_suffix(".json")
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
    else:
        try:
            meta = _write_cache(data_cfg, builder, split, tokenizer, bin_path, key)
        except OSError as e:
            raise OSError(
                f"could not write the packed token cache {bin_path} of '{data_cfg.name}' [{split}]: {e}. The text "
                "pipeline packs external datasets once next to the data; make that directory writable."
            ) from e
    return PackedFileSource(
        os.fspath(bin_path), num_windows=meta["num_windows"], seq_len=meta["seq_len"], dtype=meta["dtype"]
    )


# --------------------------------------------------------------------------------------------------
# Sources.


def _split(data_cfg, split: str) -> loader.Source:
    if _is_cab_text(data_cfg):
        source: loader.Source = WindowSource(loader.split_source(_cab_text_builder(data_cfg), split))
    else:
        source = _packed_split(data_cfg, split)
    if not len(source):
        raise ConfigError(
            f"'{data_cfg.name}' [{split}] holds no window of seq_len + 1 = {data_cfg.seq_len + 1} tokens; "
            "use more text or a shorter seq_len."
        )
    return source


def _train_source(data_cfg, seed: int) -> loader.Source:
    if data_cfg.synthetic:
        return SyntheticTokenSource(
            size=data_cfg.synthetic_size, seq_len=data_cfg.seq_len, vocab_size=data_cfg.vocab_size, seed=seed
        )
    return _split(data_cfg, data_cfg.train_split)


def _eval_source(data_cfg) -> loader.Source:
    if data_cfg.synthetic:
        return SyntheticTokenSource(
            size=data_cfg.synthetic_size,
            seq_len=data_cfg.seq_len,
            vocab_size=data_cfg.vocab_size,
            seed=loader.SYNTHETIC_EVAL_SEED,
        )
    return _split(data_cfg, data_cfg.eval_split)


# --------------------------------------------------------------------------------------------------
# Public API (the same names as cab_jax.data.images).


def prepare(data_cfg) -> None:
    """Builds whatever the pipelines of ``data_cfg`` read (cab_text, or an external dataset's packed caches)."""
    if not data_cfg.synthetic:
        load_eos_id(data_cfg)
        _train_source(data_cfg, seed=0)
        _eval_source(data_cfg)


def train_size(data_cfg) -> int:
    """Number of training sequences (``synthetic_size`` if synthetic)."""
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
    """The infinite ``MapDataset`` of this process's local batches; element ``s`` is global step ``s``."""
    return _train_pipeline(data_cfg, global_batch_size, seed, process_index, process_count, return_index)[0]


def _train_pipeline(
    data_cfg,
    global_batch_size: int,
    seed: int,
    process_index: int | None,
    process_count: int | None,
    return_index: bool,
) -> tuple[grain.MapDataset, int]:
    """(local-batch MapDataset, number of training sequences)."""
    source = _train_source(data_cfg, seed)  # first: a missing dataset is the first error
    ds = loader.train_batches(
        source,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        description=f"sequences of '{data_cfg.name}' [{data_cfg.train_split}] at seq_len={data_cfg.seq_len}",
    )
    return ds.map(TrainTokenBatch(return_index)), len(source)


def train_iterator(
    data_cfg,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    return_index: bool = False,
) -> loader.TrainIterator:
    """Infinite iterator of ``{"tokens": int32 (L, seq_len + 1), "loss_mask": float32 (L, seq_len)}``.

    ``L = global_batch_size // process_count``; each process reads only its rows of each global batch.
    ``process_index`` / ``process_count`` default to JAX's. ``return_index=True`` adds ``"index"``
    (int64 position of the window in the train split). Checkpoint it with ``get_state()`` /
    ``set_state()``; with ``num_workers > 0`` call ``close()`` when done.

    Raises:
      FileNotFoundError: the dataset is not prepared in ``data_cfg.data_dir`` (before anything else).
      ValueError: ``global_batch_size`` is not a multiple of ``process_count`` or exceeds the training set.
    """
    ds, size = _train_pipeline(data_cfg, global_batch_size, seed, process_index, process_count, return_index)
    identity = {
        "seed": int(seed),
        "global_batch_size": int(global_batch_size),
        "num_examples": size,
        "seq_len": int(data_cfg.seq_len),
    }
    return loader.TrainIterator(ds, num_workers=data_cfg.num_workers, identity=identity)


def eval_batches(
    data_cfg,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    return_index: bool = False,
) -> loader.EvalBatches:
    """One pass over ``data_cfg.eval_split`` per iteration, every sequence once.

    Global batch ``k`` holds windows ``[k G, (k+1) G)``; the last one is padded with zero tokens whose
    ``loss_mask`` is 0; process ``p`` gets its rows ``[p L, (p+1) L)``. ``return_index=True`` adds
    ``"index"`` (-1 for padding).

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
        keys=("tokens", "loss_mask", *(("index",) if return_index else ())),
        pad=lambda length: PaddedTokenSource(source, length=length, seq_len=data_cfg.seq_len),
    )

"""Packing token streams into training windows, and the TFDS builder of the embedded "cab_text" dataset.

Packing: documents are tokenised, each followed by the end-of-text token, and concatenated into one
stream ``s``; window ``i`` is ``s[i L : i L + L + 1]`` for ``L = seq_len``, so consecutive windows share
one token and every token after the first is a target (``window[t + 1]`` given ``window[: t + 1]``)
exactly once. The last ``< L`` tokens that do not fill a window are dropped.

cab_text: the embedded corpus of :mod:`cab_jax.data.text_corpus` with a byte-level BPE trained on its
train documents, stored as packed windows (feature ``"tokens"``, int32 ``(seq_len + 1,)``) in the splits
"train" and "test" (the held-out documents), plus the tokenizer as ``tokenizer.json`` in the dataset
directory. Build it (seconds at the default 4 MB; TF-free)::

    CabText(seq_len=256, vocab_size=2048, max_corpus_bytes=4_000_000, data_dir=DIR).download_and_prepare(
        file_format="array_record")

which writes ``DIR/cab_text/seq256_vocab2048_bytes4000000/1.0.0/``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import ClassVar

import numpy as np
import numpy.typing as npt
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from cab_jax.data import text_corpus

TOKENIZER_FILE = "tokenizer.json"
DEFAULT_SEQ_LEN = 256
DEFAULT_VOCAB_SIZE = 2048
_ENCODE_CHUNK = 256  # documents per tokenizer call


def pack_windows(
    documents: Iterable[Sequence[int]], *, seq_len: int, eos_id: int, dtype: npt.DTypeLike = np.int32
) -> Iterator[np.ndarray]:
    """Packs token lists into windows of ``seq_len + 1`` (see module docstring), a block at a time.

    Yields ``(n, seq_len + 1)`` arrays (``n >= 1``) whose rows, in order, are the windows of the stream
    ``doc_0 + [eos] + doc_1 + [eos] + ...``; streams documents without holding them all.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    carry = np.zeros((0,), dtype)  # the stream from the start of the next window on
    for tokens in documents:
        stream = np.concatenate([carry, np.asarray(tokens, dtype), np.asarray([eos_id], dtype)])
        count = (stream.shape[0] - 1) // seq_len
        if count:
            starts = np.arange(count)[:, None] * seq_len
            yield stream[starts + np.arange(seq_len + 1)[None, :]]
        carry = stream[count * seq_len :]


def encode_texts(tokenizer, texts: Iterable[str]) -> Iterator[list[int]]:
    """Token ids of each text (no special tokens added), batched through the fast tokenizer."""
    chunk = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == _ENCODE_CHUNK:
            yield from (e.ids for e in tokenizer.encode_batch(chunk, add_special_tokens=False))
            chunk = []
    if chunk:
        yield from (e.ids for e in tokenizer.encode_batch(chunk, add_special_tokens=False))


@dataclasses.dataclass(eq=False)
class CabTextConfig(tfds.core.BuilderConfig):
    """Builder config: the parameters that change the stored data."""

    seq_len: int = DEFAULT_SEQ_LEN
    vocab_size: int = DEFAULT_VOCAB_SIZE
    max_corpus_bytes: int = text_corpus.DEFAULT_MAX_CORPUS_BYTES


def text_config(seq_len: int, vocab_size: int, max_corpus_bytes: int) -> CabTextConfig:
    """The config named ``f"seq{seq_len}_vocab{vocab_size}_bytes{max_corpus_bytes}"``."""
    seq_len, vocab_size, max_corpus_bytes = int(seq_len), int(vocab_size), int(max_corpus_bytes)
    if min(seq_len, vocab_size, max_corpus_bytes) < 1:
        raise ValueError(
            f"seq_len, vocab_size and max_corpus_bytes must be positive, got {seq_len}, {vocab_size}, "
            f"{max_corpus_bytes}"
        )
    return CabTextConfig(
        name=f"seq{seq_len}_vocab{vocab_size}_bytes{max_corpus_bytes}",
        seq_len=seq_len,
        vocab_size=vocab_size,
        max_corpus_bytes=max_corpus_bytes,
        description=(
            f"Python stdlib source and docs (<= {max_corpus_bytes} bytes), byte-level BPE of {vocab_size} "
            f"tokens, packed into windows of {seq_len} + 1 tokens."
        ),
    )


class CabText(tfds.core.GeneratorBasedBuilder):
    """Python's standard library source and docs as packed token windows (train/test)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Initial release: stdlib .py files and pydoc topics, 5 % held out by name hash, packed windows.",
    }
    BUILDER_CONFIGS: ClassVar[list[CabTextConfig]] = [
        text_config(DEFAULT_SEQ_LEN, DEFAULT_VOCAB_SIZE, text_corpus.DEFAULT_MAX_CORPUS_BYTES)
    ]
    code_path = None  # see cab_jax/data/digits.py

    def __init__(
        self,
        *,
        seq_len: int | None = None,
        vocab_size: int | None = None,
        max_corpus_bytes: int | None = None,
        **kwargs,
    ):
        """``seq_len``, ``vocab_size``, ``max_corpus_bytes`` (all or none) select or create the config."""
        given = [seq_len, vocab_size, max_corpus_bytes]
        if any(v is not None for v in given):
            if None in given or kwargs.get("config") is not None:
                raise ValueError("pass all of seq_len, vocab_size and max_corpus_bytes, or a config")
            config = text_config(seq_len, vocab_size, max_corpus_bytes)
            known = {c.name for c in self.BUILDER_CONFIGS}
            kwargs["config"] = config.name if config.name in known else config
        super().__init__(**kwargs)

    @property
    def tokenizer_path(self) -> epath.Path:
        """Where the tokenizer of this dataset is stored."""
        return epath.Path(self.data_dir) / TOKENIZER_FILE

    def _log_download_bytes(self) -> None:
        """TFDS prints "Downloading and preparing dataset Unknown size" here; nothing is downloaded: say what is
        built instead."""
        logging.info("Building the embedded dataset cab_text in %s (once).", self.data_dir)

    def _log_download_done(self) -> None:
        """TFDS prints "... downloaded and prepared ..." here; the line above said it all."""

    def _info(self) -> tfds.core.DatasetInfo:
        seq_len = self.builder_config.seq_len
        return tfds.core.DatasetInfo(
            builder=self,
            description="Python standard library source and pydoc topics, tokenised and packed.",
            features=tfds.features.FeaturesDict({"tokens": tfds.features.Tensor(shape=(seq_len + 1,), dtype=np.int32)}),
            disable_shuffling=True,  # keep windows in stream order (index = position in the stream)
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        config = self.builder_config
        train, held_out = text_corpus.split_documents(text_corpus.stdlib_documents(config.max_corpus_bytes))
        tokenizer = text_corpus.train_tokenizer((d.text for d in train), config.vocab_size)
        # During preparation data_dir is the temporary directory that TFDS renames at the end.
        self.tokenizer_path.write_text(tokenizer.to_str())
        eos_id = tokenizer.token_to_id(text_corpus.EOS_TOKEN)
        return {
            "train": self._generate_examples(tokenizer, train, eos_id),
            "test": self._generate_examples(tokenizer, held_out, eos_id),
        }

    def _generate_examples(self, tokenizer, documents, eos_id):
        token_lists = encode_texts(tokenizer, (d.text for d in documents))
        blocks = pack_windows(token_lists, seq_len=self.builder_config.seq_len, eos_id=eos_id)
        index = 0
        for block in blocks:
            for row in block:
                yield index, {"tokens": row}
                index += 1

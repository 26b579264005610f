"""The embedded text corpus (Python's own standard library and docs) and its byte-level BPE tokenizer.

Documents are the standard library's ``.py`` files (under ``sysconfig.get_paths()["stdlib"]``, named
``"stdlib:<relative path>"``) and the pydoc topics (``pydoc_data.topics``, named ``"pydoc:<topic>"``).
Left out: test suites, site-packages, IDLE, the turtle demos, codec tables (``encodings``), files that
are generated per machine (``_sysconfigdata_*``) and packages that some Linux distributions ship
separately (tkinter, distutils, lib2to3, ensurepip), so the corpus depends only on the Python version.

The corpus is capped at ``max_corpus_bytes`` (UTF-8): documents are visited in the order of a salted
SHA-256 of their names (a stable pseudo-random order, so the cap keeps a mix of modules and topics) and
kept while they fit. A document is held out (about ``HELD_OUT_FRACTION`` of them, at least one) when
another salted hash of its name says so, independently of its position (see :func:`split_documents`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
HELD_OUT_FRACTION = 0.05
DEFAULT_MAX_CORPUS_BYTES = 4_000_000
_SKIP_DIRS = frozenset(
    {
        "__pycache__",
        "__phello__",
        "distutils",
        "encodings",
        "ensurepip",
        "idle_test",
        "idlelib",
        "lib-dynload",
        "lib2to3",
        "pydoc_data",
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "tkinter",
        "turtledemo",
    }
)
_SKIP_FILE_PREFIXES = ("_sysconfigdata", "test_")


@dataclasses.dataclass(frozen=True)
class Document:
    """One corpus document: a stable name and its text."""

    name: str
    text: str


def _stable_fraction(salt: str, name: str) -> float:
    """A number in [0, 1) from SHA-256 of ``salt:name`` (the same on every machine and run)."""
    digest = hashlib.sha256(f"{salt}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _stdlib_paths() -> dict[str, str]:
    """{document name: file path} of the standard library modules we keep."""
    root = sysconfig.get_paths()["stdlib"]
    paths = {}
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _SKIP_DIRS and not d.startswith("config-")]
        for file in files:
            if file.endswith(".py") and not file.startswith(_SKIP_FILE_PREFIXES):
                path = os.path.join(directory, file)
                paths["stdlib:" + os.path.relpath(path, root).replace(os.sep, "/")] = path
    return paths


def _read_utf8(path: str) -> str | None:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def stdlib_documents(max_corpus_bytes: int = DEFAULT_MAX_CORPUS_BYTES) -> list[Document]:
    """The corpus: documents in their stable hash order, at most ``max_corpus_bytes`` of UTF-8 in all."""
    if max_corpus_bytes < 1:
        raise ValueError(f"max_corpus_bytes must be positive, got {max_corpus_bytes}")
    from pydoc_data.topics import topics  # local import: a 0.5 MB module, only needed when building

    paths = _stdlib_paths()
    names = sorted([*paths, *(f"pydoc:{topic}" for topic in topics)], key=lambda n: _stable_fraction("cab_text", n))
    documents, total = [], 0
    for name in names:
        text = topics[name.removeprefix("pydoc:")] if name.startswith("pydoc:") else _read_utf8(paths[name])
        if not text:
            continue
        size = len(text.encode("utf-8"))
        if total + size <= max_corpus_bytes:
            documents.append(Document(name, text))
            total += size
    if not documents:
        raise ValueError(
            f"the embedded corpus is empty with max_corpus_bytes={max_corpus_bytes} "
            f"(standard library at {sysconfig.get_paths()['stdlib']}); raise max_corpus_bytes."
        )
    return documents


def split_documents(documents: Sequence[Document]) -> tuple[list[Document], list[Document]]:
    """(train, held-out) documents, each in corpus order.

    Held out: the documents whose split hash is below ``HELD_OUT_FRACTION``, and at least the one with
    the smallest split hash (small corpora would otherwise often have none).
    """
    if len(documents) < 2:
        raise ValueError(f"need at least 2 documents to hold some out, got {len(documents)}; raise max_corpus_bytes.")
    fractions = [_stable_fraction("cab_text/split", d.name) for d in documents]
    threshold = max(HELD_OUT_FRACTION, min(fractions))
    train = [d for d, f in zip(documents, fractions, strict=True) if f > threshold]
    held_out = [d for d, f in zip(documents, fractions, strict=True) if f <= threshold]
    return train, held_out


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with exactly ``vocab_size`` tokens: 256 bytes, ``EOS_TOKEN`` (id 0), merges.

    Raises ValueError when ``texts`` are too small to learn that many merges.
    """
    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes, {EOS_TOKEN}, one merge), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(
            f"the corpus only supports {tokenizer.get_vocab_size()} tokens, not vocab_size={vocab_size}; "
            "raise max_corpus_bytes or lower vocab_size."
        )
    return tokenizer

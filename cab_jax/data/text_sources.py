"""What grain pickles into its worker processes for the text pipelines: token-window sources, TrainTokenBatch.

Free of JAX, like :mod:`cab_jax.data.sources` (whose ``Synthetic`` and ``Padded`` bases they share).

Every source yields ``{"tokens": int32 (seq_len + 1,), "index": int64}``, ``index`` being the window's
position in its split (-1 for padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from cab_jax.data.sources import Padded, Synthetic


class WindowSource:
    """The ``"tokens"`` rows of a TFDS data source (e.g. a cab_text split), with their index."""

    def __init__(self, source: Sequence[dict[str, Any]]):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"tokens": np.asarray(self._source[i]["tokens"], np.int32), "index": np.int64(i)}

    def __repr__(self) -> str:
        return f"WindowSource({self._source!r})"


class PackedFileSource:
    """Windows stored as one raw ``(num_windows, seq_len + 1)`` array of ``dtype`` in ``path``.

    The file is memory-mapped on first access in each process (only the path travels to grain workers).
    """

    def __init__(self, path: str, *, num_windows: int, seq_len: int, dtype: str):
        self._path = str(path)
        self._shape = (int(num_windows), int(seq_len) + 1)
        self._dtype = np.dtype(dtype)
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return self._shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self._array is None:
            self._array = np.memmap(self._path, dtype=self._dtype, mode="r", shape=self._shape)
        return {"tokens": self._array[i].astype(np.int32), "index": np.int64(i)}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    def __repr__(self) -> str:
        return f"PackedFileSource({self._path!r}, shape={self._shape}, dtype={self._dtype})"


class SyntheticTokenSource(Synthetic):
    """``size`` windows of uniform random tokens in ``[0, vocab_size)``; window ``i`` depends on (seed, i)."""

    def __init__(self, *, size: int, seq_len: int, vocab_size: int, seed: int):
        super().__init__(size=size, seed=seed)
        self._seq_len = int(seq_len)
        self._vocab_size = int(vocab_size)

    def _draw(self, rng: np.random.Generator) -> dict[str, Any]:
        return {"tokens": rng.integers(0, self._vocab_size, size=(self._seq_len + 1,), dtype=np.int32)}

    def __repr__(self) -> str:
        return f"SyntheticTokenSource(size={self._size}, seq_len={self._seq_len}, seed={self._seed})"


class PaddedTokenSource(Padded):
    """``source`` with a ``loss_mask`` of ones, followed by zero windows (``loss_mask`` 0) up to ``length``."""

    def __init__(self, source: Sequence[dict[str, Any]], *, length: int, seq_len: int):
        super().__init__(source, length=length)
        self._seq_len = int(seq_len)

    def _real(self, record: dict[str, Any]) -> dict[str, Any]:
        return {**record, "loss_mask": np.ones((self._seq_len,), np.float32)}

    def _padding(self) -> dict[str, Any]:
        return {
            "tokens": np.zeros((self._seq_len + 1,), np.int32),
            "index": np.int64(-1),
            "loss_mask": np.zeros((self._seq_len,), np.float32),
        }


class TrainTokenBatch(grain.transforms.Map):
    """A batch of training windows as ``{"tokens", "loss_mask"}`` (all ones) and optionally ``"index"``."""

    def __init__(self, return_index: bool):
        self.return_index = return_index

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = batch["tokens"]
        out = {"tokens": tokens, "loss_mask": np.ones((tokens.shape[0], tokens.shape[1] - 1), np.float32)}
        if self.return_index:
            out["index"] = batch["index"]
        return out

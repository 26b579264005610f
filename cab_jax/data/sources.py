"""What grain pickles into its worker processes: the image sources, the bases of the text sources, SelectKeys.

Sources are random access (``__len__`` + ``__getitem__``). They live in their own module, free of JAX,
because grain's multiprocessing prefetch pickles the pipeline into freshly spawned worker processes
that import these classes (the text sources are in :mod:`cab_jax.data.text_sources`, on the same terms).

Every image source yields dicts ``{"image": (H, W, C) uint8, "label": int, "index": int64}`` where
``index`` is the example's position in the underlying split (-1 for padding). :class:`Synthetic` and
:class:`Padded` are also the bases of the text sources; :class:`SelectKeys` trims the batches of both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np


class IndexedSource:
    """The examples ``indices`` of ``source`` (a tfds data source), in the order given."""

    def __init__(self, source: Sequence[dict[str, Any]], indices: np.ndarray):
        self._source = source
        self._indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return int(self._indices.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self._indices[i]
        record = self._source[int(index)]
        return {"image": record["image"], "label": int(record["label"]), "index": index}

    def __repr__(self) -> str:
        return f"IndexedSource({self._source!r}, {len(self)} indices)"


class Synthetic:
    """``size`` random examples; example ``i`` is drawn by ``_draw`` from a generator seeded with (seed, i)."""

    def __init__(self, *, size: int, seed: int):
        if size < 1:
            raise ValueError(f"synthetic_size must be positive, got {size}")
        self._size = int(size)
        self._seed = int(seed)

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self._size:
            raise IndexError(f"synthetic index {i} out of range [0, {self._size})")
        return {**self._draw(np.random.default_rng([self._seed, int(i)])), "index": np.int64(i)}

    def _draw(self, rng: np.random.Generator) -> dict[str, Any]:
        """The example's fields other than ``index``."""
        raise NotImplementedError


class SyntheticSource(Synthetic):
    """``size`` random images and labels; example ``i`` depends only on (seed, i)."""

    def __init__(self, *, size: int, image_size: int, num_classes: int, seed: int):
        super().__init__(size=size, seed=seed)
        self._image_size = int(image_size)
        self._num_classes = int(num_classes)

    def _draw(self, rng: np.random.Generator) -> dict[str, Any]:
        shape = (self._image_size, self._image_size, 3)
        image = rng.integers(0, 256, size=shape, dtype=np.uint8)
        return {"image": image, "label": int(rng.integers(0, self._num_classes))}

    def __repr__(self) -> str:
        return f"SyntheticSource(size={self._size}, image_size={self._image_size}, seed={self._seed})"


class Padded:
    """``source``, each example marked by ``_real``, followed by ``_padding()`` examples up to ``length``."""

    def __init__(self, source: Sequence[dict[str, Any]], *, length: int):
        if length < len(source):
            raise ValueError(f"padded length {length} < source length {len(source)}")
        self._source = source
        self._length = int(length)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._real(self._source[i]) if i < len(self._source) else self._padding()

    def _real(self, record: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _padding(self) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._source!r}, length={self._length})"


class PaddedSource(Padded):
    """``source`` followed by zero images (label 0, mask 0) up to ``length`` examples.

    Real examples get ``mask`` 1.0. Padding images are (image_size, image_size, 3), the eval output
    size, so the eval transform leaves them as they are.
    """

    def __init__(self, source: Sequence[dict[str, Any]], *, length: int, image_size: int):
        super().__init__(source, length=length)
        self._image_size = int(image_size)

    def _real(self, record: dict[str, Any]) -> dict[str, Any]:
        return {**record, "mask": np.float32(1.0)}

    def _padding(self) -> dict[str, Any]:
        size = self._image_size
        return {
            "image": np.zeros((size, size, 3), np.uint8),
            "label": 0,
            "index": np.int64(-1),
            "mask": np.float32(0.0),
        }


class SelectKeys(grain.transforms.Map):
    """Keeps only ``keys`` of a (batched) example dict."""

    def __init__(self, keys: Sequence[str]):
        self.keys = tuple(keys)

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        return {k: element[k] for k in self.keys}

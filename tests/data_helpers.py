"""Helpers shared by the image and text data tests."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def take(iterator: Iterator, k: int) -> list:
    return [next(iterator) for _ in range(k)]


def assert_batches_equal(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)

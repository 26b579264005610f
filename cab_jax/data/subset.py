"""Per-class training subsets (the paper's 1/5/10/20 % ImageNet subsets)."""

from __future__ import annotations

import numpy as np


def per_class_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a fixed random ``fraction`` of each class's examples.

    For every class present in ``labels``, ``max(1, round(fraction * n_class))`` of its examples are
    chosen without replacement by a generator seeded with ``(seed, class)``, so a class's choice does
    not depend on which other classes exist. ``fraction == 1.0`` returns every index.

    Args:
      labels: (N,) integer class labels of the full split, in split order.
      fraction: in (0, 1].
      seed: subset seed; the same (labels, fraction, seed) always gives the same indices.

    Returns:
      int64 array of sorted indices into ``labels``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"subset fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return np.arange(labels.shape[0], dtype=np.int64)
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        count = max(1, round(fraction * members.size))
        rng = np.random.default_rng([int(seed), int(cls)])
        chosen.append(rng.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)

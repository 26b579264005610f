"""Data: the embedded cab_digits TFDS builder, per-class subsets, augmentation, grain pipelines."""

from cab_jax.data.augment import EvalTransform, TrainTransform, resize_bilinear
from cab_jax.data.digits import CabDigits
from cab_jax.data.pipeline import (
    EvalBatches,
    TrainIterator,
    make_eval_batches,
    make_train_dataset,
    make_train_iterator,
    train_dataset_size,
)
from cab_jax.data.subset import per_class_subset

__all__ = [
    "CabDigits",
    "EvalBatches",
    "EvalTransform",
    "TrainIterator",
    "TrainTransform",
    "make_eval_batches",
    "make_train_dataset",
    "make_train_iterator",
    "per_class_subset",
    "resize_bilinear",
    "train_dataset_size",
]

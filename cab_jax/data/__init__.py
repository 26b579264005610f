"""Data: the embedded cab_digits and cab_text TFDS builders, subsets, augmentation, image and text grain pipelines."""

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
from cab_jax.data.text import (
    load_eos_id,
    load_tokenizer,
    make_text_eval_batches,
    make_text_train_dataset,
    make_text_train_iterator,
    prepare_text_data,
    text_train_dataset_size,
)
from cab_jax.data.text_builder import CabText

__all__ = [
    "CabDigits",
    "CabText",
    "EvalBatches",
    "EvalTransform",
    "TrainIterator",
    "TrainTransform",
    "load_eos_id",
    "load_tokenizer",
    "make_eval_batches",
    "make_text_eval_batches",
    "make_text_train_dataset",
    "make_text_train_iterator",
    "make_train_dataset",
    "make_train_iterator",
    "per_class_subset",
    "prepare_text_data",
    "resize_bilinear",
    "text_train_dataset_size",
    "train_dataset_size",
]

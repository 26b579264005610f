"""TFDS builder for the embedded "cab_digits" dataset.

scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, pixel values 0..16; no
download), scaled to 0..255, upsampled with bilinear interpolation to ``image_size`` (default 32),
replicated to RGB and stored as raw uint8 tensors (``tfds.features.Image`` would need TensorFlow to
encode PNG). The split is stratified and fixed: per class, 20 % (rounded) of the examples chosen with
seed 0 form "test", the rest "train".

Build it (takes seconds, TF-free)::

    CabDigits(image_size=32, data_dir=DIR).download_and_prepare(file_format="array_record")

which writes ``DIR/cab_digits/32px/1.0.0/``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from cab_jax.data.augment import resize_bilinear

NUM_CLASSES = 10
NUM_EXAMPLES = 1797
TEST_FRACTION = 0.2
SPLIT_SEED = 0
DEFAULT_IMAGE_SIZE = 32


@dataclasses.dataclass(eq=False)
class CabDigitsConfig(tfds.core.BuilderConfig):
    """Builder config: the stored image side length."""

    image_size: int = DEFAULT_IMAGE_SIZE


def digits_config(image_size: int) -> CabDigitsConfig:
    """The config for ``image_size`` (named ``f"{image_size}px"``)."""
    if int(image_size) < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return CabDigitsConfig(
        name=f"{int(image_size)}px",
        image_size=int(image_size),
        description=f"8x8 digits upsampled to {int(image_size)}x{int(image_size)} RGB.",
    )


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_indices, test_indices), sorted; per class round(test_fraction * n) go to test."""
    rng = np.random.default_rng(seed)
    test = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        test.append(members[: round(test_fraction * members.size)])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(labels.shape[0]), test_idx)
    return train_idx, test_idx


def digits_images(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as ((N, S, S, 3) uint8, (N,) int64 labels)."""
    from sklearn.datasets import load_digits  # local import: only needed when building

    bunch = load_digits()
    small = bunch.images.astype(np.float32) * (255.0 / 16.0)  # (N, 8, 8), 0..255
    # Resize all images at once: treat the N images as channels of one (8, 8, N) image.
    big = resize_bilinear(small.transpose(1, 2, 0), image_size, image_size).transpose(2, 0, 1)
    big = np.clip(np.rint(big), 0, 255).astype(np.uint8)
    return np.repeat(big[..., None], 3, axis=-1), bunch.target.astype(np.int64)


class CabDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn digits as an RGB image classification dataset (train/test)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Initial release: stratified 80/20 split (seed 0), bilinear upsampling.",
    }
    BUILDER_CONFIGS: ClassVar[list[CabDigitsConfig]] = [digits_config(DEFAULT_IMAGE_SIZE)]
    # No checksums file to locate. tfds 4.9.10 finds it through `code_path`, which for a builder
    # defined in a package touches `importlib_resources` (only installed on Python < 3.9).
    code_path = None

    def __init__(self, *, image_size: int | None = None, **kwargs):
        """``image_size`` selects (or creates) the config ``f"{image_size}px"``."""
        if image_size is not None:
            if kwargs.get("config") is not None:
                raise ValueError("pass either image_size or config, not both")
            config = digits_config(image_size)
            known = {c.name for c in self.BUILDER_CONFIGS}
            kwargs["config"] = config.name if config.name in known else config
        super().__init__(**kwargs)

    def _log_download_bytes(self) -> None:
        """TFDS prints "Downloading and preparing dataset Unknown size" here; nothing is downloaded: say what is
        built instead."""
        logging.info("Building the embedded dataset cab_digits in %s (once).", self.data_dir)

    def _log_download_done(self) -> None:
        """TFDS prints "... downloaded and prepared ..." here; the line above said it all."""

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn 8x8 handwritten digits, upsampled to RGB.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        images, labels = digits_images(self.builder_config.image_size)
        train_idx, test_idx = stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
        return {
            "train": self._generate_examples(images, labels, train_idx),
            "test": self._generate_examples(images, labels, test_idx),
        }

    def _generate_examples(self, images, labels, indices):
        for i in indices:
            yield int(i), {"image": images[i], "label": int(labels[i])}

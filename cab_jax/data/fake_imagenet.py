r"""ImageNet without ImageNet: generated JPEGs stored as TFDS ``imagenet2012``, for tests and benchmarks.

    python -m cab_jax.data.fake_imagenet --data_dir=DIR [--train_per_class=3] [--validation_per_class=1] \
        [--scale=1.0] [--seed=0]

writes ``DIR/imagenet2012/5.1.0/`` with the real builder's version, features (``image`` JPEG, ``label`` over the
1000 synsets, ``file_name``), split names and array_record files, so ``--config.data.data_dir=DIR`` runs the real
reading, decoding, subset and augmentation path. Images have ImageNet's typical sizes (mostly 500 x 375 or
375 x 500, some from 250 to 1000 pixels on the long side; ``--scale`` shrinks them) and about its file size per
pixel (a smooth colour layout, texture and noise, JPEG quality 90). Image ``i`` of a split depends only on
``(seed, split, i)``. The real dataset is built from the manual tars by :mod:`cab_jax.data.prepare`.
"""

from __future__ import annotations

import io
import json
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from absl import flags, logging
from etils import epath
from PIL import Image

from cab_jax import cli
from cab_jax.errors import ConfigError

NAME, VERSION = "imagenet2012", "5.1.0"
NUM_CLASSES = 1000
ASPECTS = (4 / 3, 3 / 2, 1.0, 5 / 4, 16 / 9)  # long side / short side
ASPECT_WEIGHTS = (0.6, 0.15, 0.1, 0.1, 0.05)


def image_size(rng: np.random.Generator, scale: float) -> tuple[int, int]:
    """(height, width) of one image: the long side 500 (3 in 4) or 250-1000, a common aspect ratio, landscape 3
    times in 4."""
    long_side = 500 if rng.random() < 0.75 else int(rng.integers(250, 1001))
    short_side = round(long_side / ASPECTS[rng.choice(len(ASPECTS), p=ASPECT_WEIGHTS)])
    height, width = (short_side, long_side) if rng.random() < 0.75 else (long_side, short_side)
    return max(8, round(height * scale)), max(8, round(width * scale))


def jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
    """A JPEG (quality 90) of a smooth random colour layout with texture and noise."""
    layout = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                      Image.Resampling.BICUBIC)
    texture = Image.fromarray(rng.integers(0, 256, (max(1, height // 4), max(1, width // 4), 3), dtype=np.uint8))
    texture = texture.resize((width, height), Image.Resampling.BILINEAR)
    pixels = (np.asarray(layout, np.float32) + 0.5 * (np.asarray(texture, np.float32) - 128)
              + rng.normal(0, 12, (height, width, 3)))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def examples(split: str, per_class: int, scale: float, seed: int, synsets: list[str]):
    """``(key, example)`` of the split, class by class: ``{"image": JPEG file object, "label", "file_name"}``."""
    for i in range(per_class * NUM_CLASSES):
        label = i // per_class
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
        name = f"{synsets[label]}_{i % per_class}.JPEG" if split == "train" else f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        yield i, {"image": io.BytesIO(jpeg(rng, *image_size(rng, scale))), "label": label, "file_name": name}


class FakeImagenet2012(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes ``imagenet2012`` (the registered builder reads it back) from generated images."""

    name = NAME
    VERSION = tfds.core.Version(VERSION)
    code_path = None  # as CabDigits: TFDS would look for a checksums file through importlib_resources

    def __init__(self, *, train_per_class: int, validation_per_class: int, scale: float, seed: int, **kwargs):
        if train_per_class < 1 or validation_per_class < 1 or scale <= 0:
            raise ConfigError(f"train_per_class and validation_per_class must be >= 1 and scale > 0, got "
                              f"{train_per_class}, {validation_per_class}, {scale}")
        self.per_class = {"train": train_per_class, "validation": validation_per_class}
        self.scale, self.seed = scale, seed
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        with tempfile.TemporaryDirectory() as scratch:  # the real builder, for its features; it builds nothing
            features = tfds.builder(NAME, data_dir=scratch).info.features
        return tfds.core.DatasetInfo(builder=self, features=features, supervised_keys=("image", "label"),
                                     description=self.description)

    @property
    def description(self) -> str:
        """What was generated, stored in the dataset's info (a later write compares it)."""
        return (f"Generated JPEGs in imagenet2012's format, not ImageNet: train_per_class={self.per_class['train']}, "
                f"validation_per_class={self.per_class['validation']}, scale={self.scale}, seed={self.seed}.")

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        synsets = self.info.features["label"].names
        return {split: examples(split, n, self.scale, self.seed, synsets) for split, n in self.per_class.items()}

    def _generate_examples(self):  # the splits' generators are made in _split_generators
        raise NotImplementedError


def write(data_dir: str, *, train_per_class: int = 3, validation_per_class: int = 1, scale: float = 1.0,
          seed: int = 0) -> str:
    """Write the fake imagenet2012 into ``data_dir`` (nothing when the same one is there already; ``ConfigError``
    when another one is); returns the dataset's directory."""
    builder = FakeImagenet2012(train_per_class=train_per_class, validation_per_class=validation_per_class,
                               scale=scale, seed=seed, data_dir=data_dir)
    if builder.is_prepared():
        stored = json.loads((epath.Path(builder.data_dir) / "dataset_info.json").read_text()).get("description")
        if stored != builder.description:
            raise ConfigError(f"{builder.data_dir} already holds an imagenet2012 ({stored!r}), not the one asked for "
                              f"({builder.description!r}); remove it or choose another data_dir")
        logging.info("Fake imagenet2012 already in %s; nothing written.", builder.data_dir)
    else:
        builder.download_and_prepare(file_format="array_record")
        logging.info("Fake imagenet2012 (%d train, %d validation images) written to %s",
                     train_per_class * NUM_CLASSES, validation_per_class * NUM_CLASSES, builder.data_dir)
    return str(builder.data_dir)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
    f = flags.FLAGS
    write(f.data_dir, train_per_class=f.train_per_class, validation_per_class=f.validation_per_class, scale=f.scale,
          seed=f.seed)


if __name__ == "__main__":  # the flags exist only here: importing this module defines none
    flags.DEFINE_string("data_dir", None, "TFDS data directory to write imagenet2012 into.", required=True)
    flags.DEFINE_integer("train_per_class", 3, "Training images per class.")
    flags.DEFINE_integer("validation_per_class", 1, "Validation images per class.")
    flags.DEFINE_float("scale", 1.0, "Image sides are multiplied by this (smaller for quick tests).")
    flags.DEFINE_integer("seed", 0, "Seed of the generated images.")
    cli.run(main)

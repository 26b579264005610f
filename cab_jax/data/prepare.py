r"""Prepare, once and before a multi-process run, the data a config reads, so that no worker builds it concurrently.

    # ImageNet (imagenet2012) from the manually downloaded tars, as TFDS expects them, written as array_record;
    # then the per-class label cache that every subset of configs/vim_{small,tiny}.py reads
    python -m cab_jax.data.prepare --config=configs/vim_small.py --config.data.data_dir=DATA_DIR \
        --manual_dir=DIR_WITH_ILSVRC2012_img_train.tar_AND_ILSVRC2012_img_val.tar
    # The text a language config reads: cab_text (built with its tokenizer) or an external TFDS text dataset
    # packed once into token windows next to it (with --download, TFDS first downloads and prepares it)
    python -m cab_jax.data.prepare --config=configs/phi_mamba.py --config.data.data_dir=DATA_DIR \
        --config.data.name=NAME --config.data.tokenizer=/path/to/hf/phi-1_5 [--download]

``--config`` and its overrides are those of ``python -m cab_jax.main``, so what is prepared is exactly what that
run reads: :func:`cab_jax.data.images.prepare` or :func:`cab_jax.data.text.prepare` on ``config.data``. Nothing
is downloaded unless ``--manual_dir`` (ImageNet) or ``--download`` says so. Synthetic data needs nothing.
Building imagenet2012 runs TFDS's own builder, which needs TensorFlow at build time only (``pip install
tensorflow-cpu``); reading it in training does not.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from cab_jax import cli
from cab_jax.errors import ConfigError, PathError, UserError

IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/NAME.py[:variant]), as "
                                          "for cab_jax.main; its data section says what to prepare.",
                                          lock_config=True)
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Directory holding the manually downloaded files of a TFDS "
                                  "dataset (imagenet2012: ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar); "
                                  "the dataset is built from them when it is not prepared yet.")
_DOWNLOAD = flags.DEFINE_bool("download", False, "Let TFDS download and prepare a public dataset that is not "
                              "prepared yet (never needed for the embedded datasets).")


def build_tfds(name: str, data_dir: str | None, manual_dir: str | None) -> None:
    """Build TFDS dataset ``name`` in ``data_dir`` as array_record (from ``manual_dir`` when given), unless it is
    prepared there already."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ConfigError(f"config.data.name: TFDS knows no dataset {name!r}") from None
    if builder.is_prepared():
        logging.info("%s is prepared in %s already.", name, builder.data_dir)
        return
    if manual_dir is not None:
        if not os.path.isdir(manual_dir):
            raise PathError(f"--manual_dir={manual_dir}: no such directory")
        if name.split("/")[0] == "imagenet2012":
            missing = [tar for tar in IMAGENET_TARS if not os.path.isfile(os.path.join(manual_dir, tar))]
            if missing:
                raise PathError(f"--manual_dir={manual_dir} lacks {' and '.join(missing)} (imagenet2012 is built "
                                f"from {' and '.join(IMAGENET_TARS)}, downloaded from image-net.org)")
    if importlib.util.find_spec("tensorflow") is None:
        raise UserError(f"building {name} runs TFDS's own builder, which needs TensorFlow at build time: "
                        "pip install tensorflow-cpu (training reads the result without it)")
    logging.info("Building %s in %s as array_record (once; ImageNet takes hours).", name, builder.data_dir)
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    builder.download_and_prepare(file_format="array_record", download_config=download_config)


def prepare(c: ml_collections.ConfigDict, manual_dir: str | None = None, download: bool = False) -> str:
    """Prepare what a run of config ``c`` reads; returns a one-line summary of what is there."""
    from cab_jax.data import images, loader, text  # here: grain imports JAX, which --help does not need

    d = c.data
    if d.synthetic:
        return f"config.data.synthetic is set: {c.domain} data is generated in memory, nothing to prepare"
    if c.task == "study" and not d.data_dir:
        raise ConfigError("a study (task=study) builds its data in its workdir unless config.data.data_dir is set: "
                          "set --config.data.data_dir here and in the run")
    if d.name not in (images.DIGITS_NAME, text.TEXT_NAME):  # the embedded ones are built by our own builders
        if manual_dir is not None or download:
            build_tfds(d.name, loader.tfds_data_dir(d), manual_dir)
        else:
            try:
                loader.open_prepared_builder(d.name, loader.tfds_data_dir(d))
            except PathError as e:
                raise PathError(f"{e} Or let this command build it: add --manual_dir=MANUAL_DIR (ImageNet's tars) "
                                "or --download (public TFDS datasets).") from None
    where = d.data_dir or "the TFDS default data_dir"
    (images if c.domain == "vision" else text).prepare(d)
    if c.domain == "vision":
        return (f"{d.name} is ready in {where}: {images.train_size(d)} training images "
                f"({d.subset_fraction:g} of each class of '{d.train_split}'), eval split '{d.eval_split}'")
    return (f"{d.name} is ready in {where}: {text.train_size(d)} training sequences of {d.seq_len} tokens, "
            f"eval split '{d.eval_split}'")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
    logging.info("%s", prepare(_CONFIG.value, _MANUAL_DIR.value, _DOWNLOAD.value))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")  # here, not at import: importers keep their own flag checks
    cli.run(main)

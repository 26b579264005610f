"""The fake ImageNet: imagenet2012's format as TFDS reads it, deterministic images of ImageNet's shapes, and a run of
configs/vim_tiny.py on it through the entry point (the real reading, decoding, subset and augmentation path)."""

import io
import json
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx
from multiprocess_job import ROOT
from PIL import Image

from cab_jax import checkpoint, config, domains
from cab_jax.data import fake_imagenet, images
from cab_jax.errors import ConfigError

SCALE = 0.08  # images of about 40 x 30 pixels


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake_imagenet")
    fake_imagenet.write(str(root), train_per_class=2, validation_per_class=1, scale=SCALE, seed=0)
    return root


def test_it_is_imagenet2012_as_tfds_reads_it(data_dir):
    builder = tfds.builder("imagenet2012", data_dir=str(data_dir))  # the registered builder, not ours
    assert builder.is_prepared() and builder.info.file_format.name == "ARRAY_RECORD"
    assert str(builder.info.version) == "5.1.0"
    with tempfile.TemporaryDirectory() as scratch:
        real = tfds.builder("imagenet2012", data_dir=scratch).info.features
    assert repr(builder.info.features) == repr(real) and builder.info.features["label"].names == real["label"].names
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 2000, "validation": 1000}
    train = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    records = [train[i] for i in range(2000)]  # in TFDS's shuffled order
    assert (np.bincount([r["label"] for r in records], minlength=1000) == 2).all()  # two per class
    for r in records[:50]:
        assert r["file_name"].decode().split("_")[0] == real["label"].names[r["label"]]  # n01440764_0.JPEG...
        jpeg = Image.open(io.BytesIO(r["image"]))
        assert jpeg.format == "JPEG" and jpeg.mode == "RGB"


def test_writing_again_keeps_the_same_dataset_and_refuses_another(data_dir):
    files = sorted((data_dir / "imagenet2012" / "5.1.0").iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    fake_imagenet.write(str(data_dir), train_per_class=2, validation_per_class=1, scale=SCALE, seed=0)
    assert sorted((data_dir / "imagenet2012" / "5.1.0").iterdir()) == files
    assert [f.stat().st_mtime_ns for f in files] == stamps
    for other in (dict(train_per_class=1), dict(seed=1), dict(scale=1.0)):
        with pytest.raises(ConfigError, match=r"already holds an imagenet2012.*train_per_class=2.*remove it"):
            fake_imagenet.write(str(data_dir), **{**dict(train_per_class=2, validation_per_class=1, scale=SCALE,
                                                         seed=0), **other})


def test_images_have_imagenet_shapes_and_depend_only_on_seed_split_and_index():
    sizes = [fake_imagenet.image_size(np.random.default_rng(i), 1.0) for i in range(2000)]
    long_sides = np.array([max(s) for s in sizes])
    assert 0.7 < np.mean(long_sides == 500) < 0.8 and long_sides.min() >= 250 and long_sides.max() <= 1000
    assert 0.73 < np.mean([w >= h for h, w in sizes]) < 0.82  # landscape 3 times in 4, or square
    assert (500 - 375) in {max(s) - min(s) for s in sizes}  # 500 x 375 among them
    rng = np.random.default_rng(3)
    a = fake_imagenet.jpeg(rng, 375, 500)
    assert 60_000 < len(a) < 160_000  # about ImageNet's average file (110 KB) at its typical size
    keys = [(i, ex["file_name"], ex["image"].getvalue()) for i, ex in fake_imagenet.examples(
        "validation", 1, SCALE, 0, [f"n{k:08d}" for k in range(1000)]) if i < 3]
    again = [(i, ex["file_name"], ex["image"].getvalue()) for i, ex in fake_imagenet.examples(
        "validation", 1, SCALE, 0, [f"n{k:08d}" for k in range(1000)]) if i < 3]
    assert keys == again and keys[0][1] == "ILSVRC2012_val_00000001.JPEG"
    other_seed = next(fake_imagenet.examples("validation", 1, SCALE, 1, ["n0"] * 1000))[1]["image"].getvalue()
    assert other_seed != keys[0][2]


def test_the_recipe_pipeline_reads_it(data_dir):
    cfg = config.vision_data(data_dir=str(data_dir), image_size=32, num_workers=0, subset_fraction=0.5)
    assert images.train_size(cfg) == 1000  # half of each class: 1 of 2
    batch = next(images.train_iterator(cfg, global_batch_size=16, seed=0, process_index=0, process_count=1))
    assert batch["image"].shape == (16, 32, 32, 3) and np.isfinite(batch["image"]).all()
    evaluation = images.eval_batches(cfg, global_batch_size=250, process_index=0, process_count=1)
    assert sum(int(b["mask"].sum()) for b in evaluation) == 1000


@pytest.mark.slow
def test_vim_tiny_trains_on_it_through_main(data_dir, tmp_path):
    """A few steps of configs/vim_tiny.py, the models narrowed and the images made 32 px by overrides, from a
    saved random teacher; grain worker processes read and augment."""
    sys.path.insert(0, str(ROOT / "configs"))
    import vim_tiny

    c = vim_tiny.get_config()
    c.data.update(dict(data_dir=str(data_dir), image_size=32, num_workers=2, subset_fraction=0.5))
    for model in (c.teacher, c.student):
        model.update(dict(embed_dim=32, depth=2))
    c.teacher.num_heads, c.bridge.hidden = 2, 16
    c.train.update(dict(steps=3, batch_size=16, eval_batch_size=250, log_every=1))
    checkpoint.save_model_params(tmp_path / "teacher",
                                 nnx.state(domains.for_config(c).build_teacher(nnx.Rngs(0))).to_pure_dict())
    overrides = [f"--config.data.{k}={c.data[k]}" for k in ("data_dir", "image_size", "num_workers", "subset_fraction")]
    overrides += [f"--config.{m}.{k}={c[m][k]}" for m in ("teacher", "student") for k in ("embed_dim", "depth")]
    overrides += [f"--config.train.{k}={c.train[k]}" for k in ("steps", "batch_size", "eval_batch_size", "log_every")]
    overrides += ["--config.teacher.num_heads=2", "--config.bridge.hidden=16",
                  f"--config.teacher.init_from={tmp_path / 'teacher'}"]
    proc = subprocess.run([sys.executable, "-m", "cab_jax.main", f"--config={ROOT / 'configs' / 'vim_tiny.py'}",
                           *overrides, f"--workdir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["step"] == 3 and results["train_examples"] == 1000
    assert results["metrics"]["eval_examples"] == 1000 and 0 <= results["metrics"]["top1"] <= 100
    # README: exit 0 means finished, the final evaluation in results.json and in the last line of metrics.jsonl
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 3 and last["top1"] == results["metrics"]["top1"], last


def test_the_command_line_writes_three_train_and_one_validation_image_per_class_by_default(tmp_path):
    """README: ``python -m cab_jax.data.fake_imagenet --data_dir=DIR`` writes 3 train images per class (and 1 for
    validation); asking the same directory for another one fails in one line with status 2."""
    command = [sys.executable, "-m", "cab_jax.data.fake_imagenet", f"--data_dir={tmp_path}", "--scale=0.02"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    splits = tfds.builder("imagenet2012", data_dir=str(tmp_path)).info.splits
    assert (splits["train"].num_examples, splits["validation"].num_examples) == (3000, 1000)
    proc = subprocess.run([*command, "--train_per_class=2"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "already holds an imagenet2012" in proc.stderr, proc.stderr[-2000:]

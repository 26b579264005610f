"""Tests for the image data: the digits builder, subsets, augmentation and the grain image pipelines."""

from __future__ import annotations

import io
import itertools
import json
import pathlib
import subprocess
import sys

import grain
import ml_collections
import multiprocess_job
import numpy as np
import pytest
import tensorflow_datasets as tfds
from data_helpers import assert_batches_equal, take

from cab_jax import config
from cab_jax.data import augment, digits, images, loader
from cab_jax.data.augment import resize_bilinear
from cab_jax.data.digits import CabDigits
from cab_jax.data.subset import per_class_subset

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@pytest.fixture
def eight_devices(monkeypatch):
    """The pipelines see a job of 8 devices (repeated augmentation is on only with more than one)."""
    import jax

    monkeypatch.setattr(jax, "device_count", lambda *_: 8)
    assert images.repeated_augmentation(make_cfg("")) == 3


def make_cfg(data_dir, **overrides) -> ml_collections.ConfigDict:
    """The digits at 32 px with ImageNet's training recipe (RandAugment, random erasing, repeated augmentation
    when the job has more than one device), so that the pipeline tests run every transform."""
    cfg = config.vision_data(name="cab_digits", data_dir=str(data_dir), image_size=32, num_classes=10,
                             eval_split="test", subset_seed=0, synthetic_size=64, num_workers=0, mean=MEAN, std=STD)
    cfg.update(overrides)
    return cfg


def read_split(data_dir, split, image_size=32):
    source = CabDigits(image_size=image_size, data_dir=str(data_dir)).as_data_source(split=split)
    split_images = np.stack([source[i]["image"] for i in range(len(source))])
    labels = np.asarray([source[i]["label"] for i in range(len(source))])
    return split_images, labels


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    CabDigits(image_size=32, data_dir=str(data_dir)).download_and_prepare(file_format="array_record")
    return data_dir


# --------------------------------------------------------------------------------------------------
# The embedded digits builder.


def test_digits_builder_splits_are_stratified_and_cover_the_dataset(digits_dir):
    train_images, train_labels = read_split(digits_dir, "train")
    test_images, test_labels = read_split(digits_dir, "test")
    assert len(train_labels) + len(test_labels) == digits.NUM_EXAMPLES
    assert train_images.shape[1:] == (32, 32, 3) and train_images.dtype == np.uint8
    assert test_images.shape[1:] == (32, 32, 3) and test_images.dtype == np.uint8
    assert set(train_labels) | set(test_labels) <= set(range(10))

    all_images, all_labels = digits.digits_images(32)
    for cls in range(10):
        n_cls = int((all_labels == cls).sum())
        assert (test_labels == cls).sum() == round(0.2 * n_cls)
        assert (train_labels == cls).sum() == n_cls - round(0.2 * n_cls)

    # The stored examples are exactly the 1797 upsampled digits, each in one split only.
    def keys(pixels, labels):
        return sorted(im.tobytes() + bytes([lab]) for im, lab in zip(pixels, labels, strict=True))

    stored = keys(np.concatenate([train_images, test_images]), np.concatenate([train_labels, test_labels]))
    assert stored == keys(all_images, all_labels)
    # Grey digits: the three channels are equal, and the ink reaches (almost) full scale.
    assert np.array_equal(train_images[..., 0], train_images[..., 2])
    assert train_images.max() >= 250


def test_digits_builder_is_deterministic(digits_dir, tmp_path):
    CabDigits(image_size=32, data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
    for split in ("train", "test"):
        a_images, a_labels = read_split(digits_dir, split)
        b_images, b_labels = read_split(tmp_path, split)
        np.testing.assert_array_equal(a_images, b_images)
        np.testing.assert_array_equal(a_labels, b_labels)


def test_digits_image_size_config():
    builder = CabDigits(image_size=16, data_dir="/nonexistent")
    assert builder.builder_config.name == "16px"
    assert builder.info.features["image"].shape == (16, 16, 3)
    all_images, labels = digits.digits_images(16)
    assert all_images.shape == (1797, 16, 16, 3) and labels.shape == (1797,)


def test_resize_bilinear_matches_half_pixel_bilinear():
    image = np.array([[0.0, 1.0]], np.float32)[..., None]  # (1, 2, 1)
    out = resize_bilinear(image, 1, 4)[0, :, 0]
    np.testing.assert_allclose(out, [0.0, 0.25, 0.75, 1.0], atol=1e-6)
    # Downscaling by 2 widens the triangle to 2 input pixels and renormalises at the edges; these are
    # PIL's values for Image.fromarray(ramp, mode="F").resize((4, 1), Image.BILINEAR).
    ramp = np.arange(8, dtype=np.float32).reshape(1, 8, 1)
    np.testing.assert_allclose(resize_bilinear(ramp, 1, 4)[0, :, 0], [5 / 7, 2.5, 4.5, 8 - 1 - 5 / 7], atol=1e-5)
    constant = np.full((7, 9, 3), 42, np.uint8)
    np.testing.assert_allclose(resize_bilinear(constant, 5, 13), 42.0, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Per-class subsets.


def test_per_class_subset_counts_and_determinism():
    labels = np.repeat(np.arange(5), [100, 50, 7, 1, 20])
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(labels.size)]
    subset = per_class_subset(labels, 0.1, seed=3)
    assert np.all(np.diff(subset) > 0)  # sorted, no duplicates
    counts = np.bincount(labels[subset], minlength=5)
    np.testing.assert_array_equal(counts, [10, 5, 1, 1, 2])  # round(), at least 1 per class
    np.testing.assert_array_equal(subset, per_class_subset(labels, 0.1, seed=3))
    assert not np.array_equal(subset, per_class_subset(labels, 0.1, seed=4))
    np.testing.assert_array_equal(per_class_subset(labels, 1.0, seed=3), np.arange(labels.size))
    half = per_class_subset(labels, 0.5, seed=3)
    np.testing.assert_array_equal(np.bincount(labels[half], minlength=5), [50, 25, 4, 1, 10])
    with pytest.raises(ValueError, match="fraction"):
        per_class_subset(labels, 0.0, seed=0)


# --------------------------------------------------------------------------------------------------
# Augmentation.


def test_train_transform_is_deterministic_in_the_rng_and_varies():
    transform = augment.TrainTransform(image_size=16, crop_scale=(0.08, 1.0), hflip=True, mean=MEAN, std=STD,
                                       randaugment_policy="rand-m9-mstd0.5-inc1", random_erase=0.25)
    image = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    element = {"image": image, "label": 3, "index": np.int64(7)}
    a = transform.random_map(element, np.random.default_rng(1))
    b = transform.random_map(element, np.random.default_rng(1))
    c = transform.random_map(element, np.random.default_rng(2))
    assert a["image"].shape == (16, 16, 3) and a["image"].dtype == np.float32
    assert a["label"].dtype == np.int32 and a["label"] == 3 and a["index"] == 7
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])


def test_repeated_augmentation_reads_a_third_of_each_epoch_three_times_differently():
    n, batch = 60, 12  # 5 steps per epoch

    class Noise(grain.transforms.RandomMap):
        def random_map(self, element, rng):
            return {**element, "noise": rng.random()}

    def epochs(process_count, repeats, count=2):
        shards = [loader.train_batches([{"index": i} for i in range(n)], global_batch_size=batch, seed=3,
                                       process_index=p, process_count=process_count, description="", augment=Noise,
                                       repeats=repeats)
                  for p in range(process_count)]
        return [{k: np.concatenate([shard[step][k] for shard in shards]) for k in ("index", "noise")}
                for step in range(5 * count)]

    steps = epochs(1, 3)
    for epoch in range(2):
        index = np.concatenate([b["index"] for b in steps[5 * epoch : 5 * epoch + 5]])
        noise = np.concatenate([b["noise"] for b in steps[5 * epoch : 5 * epoch + 5]])
        assert len(set(index)) == n // 3 and (index.reshape(-1, 3) == index[::3, None]).all()  # 3 in a row
        assert len(set(noise)) == n  # each copy augmented differently
    first, second = (set(np.concatenate([b["index"] for b in steps[5 * e : 5 * e + 5]])) for e in range(2))
    assert first != second  # each epoch draws its own third
    for got, want in zip(epochs(3, 3), steps, strict=True):  # the same global batches on 3 processes
        np.testing.assert_array_equal(got["index"], want["index"])
        np.testing.assert_array_equal(got["noise"], want["noise"])
    plain = np.concatenate([b["index"] for b in epochs(1, 1, count=1)])
    assert sorted(plain) == list(range(n))  # without repeats: every example once per epoch


def test_repeated_augmentation_needs_more_than_one_device(eight_devices):
    assert images.repeated_augmentation(make_cfg("", repeated_augmentation=1)) == 1
    import jax

    jax.device_count = lambda *_: 1  # monkeypatched by the fixture: restored after the test
    assert images.repeated_augmentation(make_cfg("")) == 1


def test_the_demo_trains_on_40_of_the_1438_train_digits():
    """README: the embedded dataset is scikit-learn's 1,797 digits, 1,438 train / 359 test images, and the demo's
    students train on 3 % of each class: 40 images."""
    from sklearn.datasets import load_digits

    from configs import demo

    labels = load_digits().target
    train_idx, test_idx = digits.stratified_split(labels, digits.TEST_FRACTION, digits.SPLIT_SEED)
    assert (len(labels), len(train_idx), len(test_idx)) == (1797, 1438, 359)
    d = demo.get_config().data
    assert len(per_class_subset(labels[train_idx], d.subset_fraction, d.subset_seed)) == 40


def test_the_recipes_train_crop_is_resized_bicubic():
    """README: the training crop is resized bicubic (DeiT's recipe): the vision configs' train transform, without
    flip, RandAugment and erasing, equals PIL's bicubic resize of the crop box the same random draw gives, and not
    the bilinear one."""
    from PIL import Image

    from configs import vim_small

    data_cfg = vim_small.get_config().data
    data_cfg.update(dict(hflip=False, randaugment="", random_erase=0.0, image_size=32))
    image = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    out = images.train_transform(data_cfg).random_map({"image": image, "label": 0}, np.random.default_rng(7))["image"]
    top, left, h, w = augment.random_resized_crop_box(48, 40, np.random.default_rng(7), tuple(data_cfg.crop_scale),
                                                      augment.DEFAULT_CROP_RATIO)
    crop = lambda resample: augment.normalize(np.asarray(Image.fromarray(image).resize(
        (32, 32), resample, box=(left, top, left + w, top + h))), data_cfg.mean, data_cfg.std)
    np.testing.assert_array_equal(out, crop(Image.Resampling.BICUBIC))
    assert not np.array_equal(out, crop(Image.Resampling.BILINEAR))


def test_the_recipes_train_transform_flips_half_of_the_draws_horizontally():
    """README: the vision recipe's augmentation flips: with the vision configs' data section (RandAugment and erasing
    off, so that only the crop and the flip draw), every output is the unflipped transform's output from the same
    draw or its left-right mirror, and about half of 400 draws are the mirror."""
    from configs import vim_small

    data_cfg = vim_small.get_config().data
    data_cfg.update(dict(randaugment="", random_erase=0.0, image_size=16))
    unflipped_cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    unflipped_cfg.hflip = False
    flip, unflipped = images.train_transform(data_cfg), images.train_transform(unflipped_cfg)
    element = {"image": np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8), "label": 0}
    mirrored = 0
    for seed in range(400):
        out = flip.random_map(element, np.random.default_rng(seed))["image"]
        ref = unflipped.random_map(element, np.random.default_rng(seed))["image"]
        is_mirror = np.array_equal(out, ref[:, ::-1])
        assert is_mirror or np.array_equal(out, ref), seed
        mirrored += is_mirror
    assert 160 <= mirrored <= 240, mirrored  # Binomial(400, 1/2): 200 +- 10


def test_random_resized_crop_box_is_inside_and_in_scale_range():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = augment.random_resized_crop_box(50, 80, rng, (0.3, 0.6))
        assert top >= 0 and top + h <= 50 and left >= 0 and left + w <= 80
        assert 0.25 <= h * w / (50 * 80) <= 0.65


def test_eval_transform_noop_at_target_size_and_center_crops_otherwise():
    transform = augment.EvalTransform(image_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    out = transform.map({"image": image, "label": 1})
    np.testing.assert_allclose(out["image"], image / 255.0, atol=1e-6)
    big = np.zeros((20, 40, 3), np.uint8)
    big[:, 18:22] = 255  # a bright vertical bar in the middle survives the center crop
    out = transform.map({"image": big, "label": 1})["image"]
    assert out.shape == (8, 8, 3)
    assert out[:, 3:5].min() > 0.5 and out[:, 0].max() < 0.01


def test_normalize():
    image = np.array([[[255, 0, 128]]], np.uint8)
    out = augment.normalize(image, MEAN, STD)
    expected = (np.array([1.0, 0.0, 128 / 255]) - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(out[0, 0], expected, rtol=1e-5)
    assert out.dtype == np.float32


# --------------------------------------------------------------------------------------------------
# Train pipeline.


def test_train_iterator_shapes_and_subset_only(digits_dir):
    cfg = make_cfg(digits_dir, subset_fraction=0.1)
    _, labels = read_split(digits_dir, "train")
    subset = per_class_subset(labels, 0.1, seed=0)
    assert images.train_size(cfg) == len(subset) == 143
    iterator = images.train_iterator(cfg, global_batch_size=32, seed=0, return_index=True)
    steps_per_epoch = len(subset) // 32
    epoch1 = take(iterator, steps_per_epoch)
    epoch2 = take(iterator, steps_per_epoch)
    batch = epoch1[0]
    assert batch["image"].shape == (32, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    for epoch in (epoch1, epoch2):
        index = np.concatenate([b["index"] for b in epoch])
        assert len(set(index.tolist())) == index.size == steps_per_epoch * 32  # no repeats in an epoch
        assert set(index.tolist()) <= set(subset.tolist())
        np.testing.assert_array_equal(np.concatenate([b["label"] for b in epoch]), labels[index])
    order1 = np.concatenate([b["index"] for b in epoch1])
    order2 = np.concatenate([b["index"] for b in epoch2])
    assert not np.array_equal(order1, order2)  # a new shuffle each epoch
    # Same seed -> same stream; the default output has just image and label.
    again = take(images.train_iterator(cfg, global_batch_size=32, seed=0), 2)
    assert set(again[0]) == {"image", "label"}
    np.testing.assert_array_equal(again[1]["image"], epoch1[1]["image"])
    other = next(images.train_iterator(cfg, global_batch_size=32, seed=1, return_index=True))
    assert not np.array_equal(other["index"], epoch1[0]["index"])


def test_train_iterator_process_shards_reassemble_the_global_batch(digits_dir, eight_devices):
    # 143 examples, global batch 16: 8 steps per epoch and 15 left over (more than a local batch), so
    # the shards must drop the same tail of every epoch to stay aligned over the 20 steps below.
    cfg = make_cfg(digits_dir, subset_fraction=0.1)
    single = take(images.train_iterator(cfg, global_batch_size=16, seed=5, process_count=1, process_index=0), 20)
    shards = [
        take(images.train_iterator(cfg, global_batch_size=16, seed=5, process_count=2, process_index=p), 20)
        for p in range(2)
    ]
    for step in range(20):
        assert shards[0][step]["image"].shape == (8, 32, 32, 3)
        for key in ("image", "label"):
            joined = np.concatenate([shards[0][step][key], shards[1][step][key]])
            np.testing.assert_array_equal(joined, single[step][key], err_msg=f"{key} at step {step}")


def test_train_iterator_resume_gives_the_same_batches(digits_dir, eight_devices):
    cfg = make_cfg(digits_dir, subset_fraction=0.1)
    iterator = images.train_iterator(cfg, global_batch_size=16, seed=0)
    take(iterator, 7)  # cross an epoch boundary below (143 // 16 = 8 steps per epoch)
    state = iterator.get_state()
    expected = take(iterator, 4)
    iterator.set_state(state)
    assert_batches_equal(take(iterator, 4), expected)
    # A restarted job: a fresh iterator restored from the saved state.
    fresh = images.train_iterator(cfg, global_batch_size=16, seed=0)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 4), expected)


def test_train_iterator_state_is_independent_of_worker_processes(digits_dir, eight_devices):
    cfg = make_cfg(digits_dir, subset_fraction=0.1)
    in_process = images.train_iterator(cfg, global_batch_size=16, seed=0)
    reference = take(in_process, 6)
    in_process.set_state({"step": 2, "seed": 0, "global_batch_size": 16, "num_examples": 143})
    state = json.loads(json.dumps(in_process.get_state()))  # a state as stored in a checkpoint
    # Restore it into an iterator with two worker processes (started once, at the restored step).
    with_workers = images.train_iterator(
        make_cfg(digits_dir, subset_fraction=0.1, num_workers=2), global_batch_size=16, seed=0
    )
    try:
        with_workers.set_state(state)
        assert_batches_equal(take(with_workers, 4), reference[2:])
        assert with_workers.get_state() == {"step": 6, "seed": 0, "global_batch_size": 16, "num_examples": 143}
    finally:
        with_workers.close()
    with pytest.raises(ValueError, match="closed"):
        next(with_workers)


def test_worker_processes_outlive_the_signals_that_stop_the_trainer(digits_dir):
    """SLURM's SIGTERM reaches every process of a job step, Ctrl-C's SIGINT a terminal's whole process group; the
    trainer stops at an agreed step and still reads batches after the signal, so the workers ignore both and keep
    producing them (more batches than their buffers hold). A worker is shielded from its first moment (both signals
    blocked until its initialiser ignores them), so it is signalled as soon as it is seen, initialised or not."""
    import os
    import re
    import signal
    import time

    def spawned_workers() -> list[int]:  # grain's (spawned) workers; not e.g. multiprocessing's resource tracker
        found = []
        for pid in multiprocess_job.children(os.getpid()):
            try:
                if b"spawn_main" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                continue
        return sorted(found)

    def shielded(pid: int) -> bool:  # SIGTERM and SIGINT each blocked or ignored
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
        blocked_or_ignored = int(re.search(r"SigBlk:\s*([0-9a-f]+)", status)[1], 16)
        blocked_or_ignored |= int(re.search(r"SigIgn:\s*([0-9a-f]+)", status)[1], 16)
        both = (1 << signal.SIGTERM - 1) | (1 << signal.SIGINT - 1)
        return blocked_or_ignored & both == both

    reference = take(images.train_iterator(make_cfg(digits_dir, subset_fraction=0.1), global_batch_size=16, seed=0),
                     12)
    assert not spawned_workers()
    with_workers = images.train_iterator(make_cfg(digits_dir, subset_fraction=0.1, num_workers=2),
                                         global_batch_size=16, seed=0)
    try:
        with_workers.start_prefetch()  # the workers start now, in the background
        workers, deadline = [], time.time() + 60
        while len(workers) < 2:
            assert time.time() < deadline, f"two data workers never started: {workers}"
            for pid in set(spawned_workers()) - set(workers):
                assert shielded(pid), f"worker {pid} can be killed by SIGTERM or SIGINT"
                os.kill(pid, signal.SIGTERM)
                os.kill(pid, signal.SIGINT)
                workers.append(pid)
            time.sleep(0.01)
        assert_batches_equal(take(with_workers, 12), reference)
        assert all(map(multiprocess_job.alive, workers)), "a data worker died of SIGTERM or SIGINT"
    finally:
        with_workers.close()


def test_train_iterator_refuses_a_foreign_state(digits_dir):
    cfg = make_cfg(digits_dir, subset_fraction=0.1)
    state = images.train_iterator(cfg, global_batch_size=16, seed=0).get_state()
    with pytest.raises(ValueError, match=r"seed=\(0, 1\)"):
        images.train_iterator(cfg, global_batch_size=16, seed=1).set_state(state)
    with pytest.raises(ValueError, match=r"global_batch_size=\(16, 8\)"):
        images.train_iterator(cfg, global_batch_size=8, seed=0).set_state(state)


def test_train_batch_size_errors(digits_dir):
    cfg = make_cfg(digits_dir, subset_fraction=0.1)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        images.train_iterator(cfg, global_batch_size=15, seed=0, process_count=2, process_index=0)
    with pytest.raises(ValueError, match="larger than the training set"):
        images.train_iterator(cfg, global_batch_size=144, seed=0)
    images.train_dataset(cfg, global_batch_size=143, seed=0)  # exactly the subset size is fine


# --------------------------------------------------------------------------------------------------
# Eval pipeline.


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_the_split_once(digits_dir, process_count):
    cfg = make_cfg(digits_dir)
    test_images, test_labels = read_split(digits_dir, "test")
    n = len(test_labels)  # 359
    per_process = [
        images.eval_batches(cfg, global_batch_size=64, process_count=process_count, process_index=p, return_index=True)
        for p in range(process_count)
    ]
    seen, mask_total = [], 0.0
    for batches in per_process:
        assert len(batches) == -(-n // 64) and batches.num_examples == n
        listed = list(batches)
        assert len(listed) == len(batches)
        for batch in listed:
            assert batch["image"].shape == (64 // process_count, 32, 32, 3)
            assert batch["mask"].dtype == np.float32 and batch["label"].dtype == np.int32
            real = batch["mask"] == 1.0
            assert np.all((batch["index"] >= 0) == real)
            np.testing.assert_array_equal(batch["label"][real], test_labels[batch["index"][real]])
            # Eval images at the stored size are only normalised.
            expected = augment.normalize(test_images[batch["index"][real]], MEAN, STD)
            np.testing.assert_allclose(batch["image"][real], expected, atol=1e-5)
            pad_value = -np.asarray(MEAN, np.float32) / np.asarray(STD, np.float32)
            np.testing.assert_allclose(batch["image"][~real], np.broadcast_to(pad_value, batch["image"][~real].shape))
            seen.append(batch["index"][real])
            mask_total += float(batch["mask"].sum())
    assert mask_total == n
    seen = np.concatenate(seen)
    assert np.array_equal(np.sort(seen), np.arange(n))
    # Re-iterable: a second pass is identical.
    assert_batches_equal(list(per_process[0]), list(per_process[0]))


def test_eval_first_batch_starts_no_data_workers(digits_dir, monkeypatch):
    """The batch the eval step compiles for is read in this process (starting workers for it cost seconds); the
    passes themselves read through the configured workers, at most one per batch."""
    asked = []
    real = loader.to_iter_dataset
    monkeypatch.setattr(loader, "to_iter_dataset", lambda ds, num_workers: asked.append(num_workers) or real(ds, 0))
    batches = images.eval_batches(make_cfg(digits_dir, num_workers=2), global_batch_size=64)
    first = batches.first()
    assert asked == [0]
    assert_batches_equal([first], take(iter(batches), 1))
    assert asked == [0, 2]
    # Never more workers than batches in a pass, and none for a pass of one batch.
    many = images.eval_batches(make_cfg(digits_dir, num_workers=64), global_batch_size=64)
    take(iter(many), 1)
    assert 2 < len(many) < 64 and asked[-1] == len(many)
    one = images.eval_batches(make_cfg(digits_dir, num_workers=2), global_batch_size=many.num_examples)
    assert len(one) == 1 and len(take(iter(one), 1)) == 1 and asked[-1] == 0


# --------------------------------------------------------------------------------------------------
# Synthetic data and missing datasets.


def test_synthetic_mode_touches_no_files(tmp_path):
    data_dir = tmp_path / "absent"
    cfg = make_cfg(data_dir, synthetic=True, synthetic_size=48, num_classes=7, image_size=16, subset_fraction=0.5)
    assert images.train_size(cfg) == 48
    iterator = images.train_iterator(cfg, global_batch_size=8, seed=3, return_index=True)
    batches = take(iterator, 6)
    assert batches[0]["image"].shape == (8, 16, 16, 3) and batches[0]["image"].dtype == np.float32
    labels = np.concatenate([b["label"] for b in batches])
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < 7 and len(set(labels)) > 1
    assert sorted(np.concatenate([b["index"] for b in batches]).tolist()) == list(range(48))
    state = iterator.get_state()
    expected = take(iterator, 2)
    iterator.set_state(state)
    assert_batches_equal(take(iterator, 2), expected)
    same = take(images.train_iterator(cfg, global_batch_size=8, seed=3, return_index=True), 6)
    assert_batches_equal(same, batches)
    other = take(images.train_iterator(cfg, global_batch_size=8, seed=4, return_index=True), 6)
    assert not np.array_equal(other[0]["image"], batches[0]["image"])

    def labels_by_index(stream):
        index = np.concatenate([b["index"] for b in stream])
        return np.concatenate([b["label"] for b in stream])[np.argsort(index)]

    assert not np.array_equal(labels_by_index(other), labels_by_index(batches))  # other data, not just order
    eval_batches = list(images.eval_batches(cfg, global_batch_size=20))
    assert sum(float(b["mask"].sum()) for b in eval_batches) == 48
    assert not data_dir.exists() and not list(tmp_path.iterdir())


def test_missing_dataset_raises_one_clear_error(tmp_path):
    cfg = make_cfg(tmp_path, name="imagenet2012", num_classes=1000, image_size=224, eval_split="validation")
    pattern = r"imagenet2012.*" + str(tmp_path) + r".*manual_dir"
    with pytest.raises(FileNotFoundError, match=pattern):
        images.train_size(cfg)
    with pytest.raises(FileNotFoundError, match=pattern):  # before the (also bad) batch size is checked
        images.train_iterator(cfg, global_batch_size=3, seed=0, process_count=2, process_index=0)
    with pytest.raises(FileNotFoundError, match=pattern):
        images.eval_batches(cfg, global_batch_size=8, process_count=1, process_index=0)
    with pytest.raises(FileNotFoundError, match="no_such_dataset_xyz"):
        images.train_size(make_cfg(tmp_path, name="no_such_dataset_xyz"))
    assert not list(tmp_path.iterdir())  # nothing was downloaded or created


def test_prepare_builds_what_the_pipelines_read(tmp_path):
    images.prepare(make_cfg(tmp_path, subset_fraction=0.1))
    assert CabDigits(image_size=32, data_dir=str(tmp_path)).is_prepared()
    assert len(list(tmp_path.glob("cab_digits/32px/1.0.0/cab_jax_labels.train.npy"))) == 1
    absent = tmp_path / "absent"
    images.prepare(make_cfg(absent, synthetic=True))  # synthetic data needs nothing
    assert not absent.exists()
    with pytest.raises(FileNotFoundError, match=r"imagenet2012.*manual_dir"):
        images.prepare(make_cfg(absent, name="imagenet2012", num_classes=1000, eval_split="validation"))


# --------------------------------------------------------------------------------------------------
# The generic TFDS read path, on a tiny dataset of variable-size images.


class CabTestImages(tfds.core.GeneratorBasedBuilder):
    """Random variable-size images: raw uint8 tensors ("tensor") or JPEG bytes in an Image feature ("jpeg")."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="tensor"), tfds.core.BuilderConfig(name="jpeg")]  # noqa: RUF012
    code_path = None  # see cab_jax/data/digits.py

    def _info(self):
        if self.builder_config.name == "jpeg":
            image = tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")
        else:
            image = tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="bytes")
        features = tfds.features.FeaturesDict({"image": image, "label": tfds.features.ClassLabel(num_classes=3)})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(30, 0), "validation": self._generate_examples(7, 1)}

    def _generate_examples(self, num, seed):
        rng = np.random.default_rng(seed)
        for i in range(num):
            height, width = (int(s) for s in rng.integers(20, 60, size=2))
            image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            if self.builder_config.name == "jpeg":
                from PIL import Image

                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="JPEG")
                image = buffer.getvalue()
            yield i, {"image": image, "label": i % 3}


@pytest.mark.parametrize("encoding", ["tensor", "jpeg"])
def test_generic_tfds_dataset(tmp_path, encoding):
    if encoding == "jpeg":
        pytest.importorskip("PIL")
    name = f"cab_test_images/{encoding}"
    cfg = make_cfg(
        tmp_path, name=name, num_classes=3, image_size=24, eval_split="validation", subset_fraction=0.5, hflip=False
    )
    with pytest.raises(FileNotFoundError, match=f"{name}.*tfds build"):
        images.train_iterator(cfg, global_batch_size=4, seed=0)
    tfds.builder(name, data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")

    assert images.train_size(cfg) == 15  # 10 per class, half of each
    labels_cache = list(tmp_path.glob(f"cab_test_images/{encoding}/1.0.0/cab_jax_labels.train.npy"))
    assert len(labels_cache) == 1
    source = tfds.data_source(name, split="train", data_dir=str(tmp_path), download=False)
    subset = per_class_subset(np.asarray([source[i]["label"] for i in range(len(source))]), 0.5, seed=0)
    np.testing.assert_array_equal(np.load(labels_cache[0]), [source[i]["label"] for i in range(len(source))])

    iterator = images.train_iterator(cfg, global_batch_size=4, seed=0, return_index=True)
    batches = take(iterator, 6)  # two epochs of 15 // 4 = 3 steps
    for batch in batches:
        assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == np.float32
        assert set(batch["index"].tolist()) <= set(subset.tolist())
    state = iterator.get_state()
    expected = take(iterator, 3)
    iterator.set_state(state)
    assert_batches_equal(take(iterator, 3), expected)

    eval_batches = list(images.eval_batches(cfg, global_batch_size=4, return_index=True))
    assert len(eval_batches) == 2 and eval_batches[0]["image"].shape == (4, 24, 24, 3)
    index = np.concatenate([b["index"] for b in eval_batches])
    np.testing.assert_array_equal(index, [0, 1, 2, 3, 4, 5, 6, -1])
    np.testing.assert_array_equal(np.concatenate([b["mask"] for b in eval_batches]), [1] * 7 + [0])


def test_pipeline_is_a_grain_map_dataset(digits_dir):
    ds = images.train_dataset(make_cfg(digits_dir), global_batch_size=8, seed=0)
    assert isinstance(ds, grain.MapDataset)
    assert isinstance(images.train_iterator(make_cfg(digits_dir), global_batch_size=8, seed=0), grain.DatasetIterator)
    # Random access by step: element s is global step s, whatever was read before.
    iterator = images.train_iterator(make_cfg(digits_dir), global_batch_size=8, seed=0)
    for step, batch in enumerate(itertools.islice(iterator, 3)):
        np.testing.assert_array_equal(batch["image"], ds[step]["image"])


LEAK_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import test_data
from cab_jax import sharding
from cab_jax.data import images

def main():
    cfg = test_data.make_cfg({data_dir!r}, subset_fraction=0.1, num_workers=2)
    train = images.train_iterator(cfg, global_batch_size=16, seed=0)
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1))
    kept = [sharding.global_batch(next(train), mesh) for _ in range(3)]  # as the trainer steps on them
    train.set_state(train.get_state())  # restarts its workers, like a restore
    kept += [next(train) for _ in range(2)]
    evals = images.eval_batches(cfg, global_batch_size=64)
    kept += [evals.first(), *evals]
    train.close()
    global left_open  # never closed: it lives until the interpreter exits
    left_open = images.train_iterator(cfg, global_batch_size=16, seed=1)
    kept.append(next(left_open))
    print(len(kept))

if __name__ == "__main__":
    main()
"""


def test_worker_batches_leave_no_shared_memory_behind(digits_dir):
    """Batches from grain's worker processes arrive in shared memory: a run that steps on some (as JAX arrays, which
    may share the host memory), reads others and closes its iterators with batches prefetched and never read leaves
    no segment for the resource tracker to report at exit; an iterator the program never closes is closed cleanly
    when the interpreter exits."""
    script = LEAK_SCRIPT.format(tests=str(pathlib.Path(__file__).parent), data_dir=str(digits_dir))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=multiprocess_job.cpu_env(devices=1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "leaked" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]

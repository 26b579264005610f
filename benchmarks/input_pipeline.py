"""Images/s of the ImageNet training pipeline, and where a worker's time goes.

    python benchmarks/input_pipeline.py --data_dir=/tmp/fake_imagenet --workers=1,2,4,8,16 [--batch_size=128]

Reads the fake ImageNet of :mod:`cab_jax.data.fake_imagenet` (written into ``--data_dir`` first if it is not there,
``--train_per_class`` images per class at ImageNet's sizes, or ``--scale`` times them) through the real training
iterator of configs/vim_small.py: read, decode, random resized crop to 224 (bicubic), flip, RandAugment
rand-m9-mstd0.5-inc1, normalise, random erasing, batch (mixup runs on the device, in the step). One table gives
images/s per number of grain worker processes, the other the milliseconds per image of each stage in one process.
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def pipeline_rate(cfg, workers: int, batch_size: int, batches: int) -> float:
    """Images/s of the training iterator with ``workers`` processes, timed over at least 3 batches per worker after
    2 per worker (every worker started and producing)."""
    from cab_jax.data import images

    cfg = cfg.copy_and_resolve_references()
    cfg.num_workers = workers
    iterator = images.train_iterator(cfg, global_batch_size=batch_size, seed=0, process_index=0, process_count=1)
    try:
        for _ in range(2 * max(workers, 1)):
            next(iterator)
        timed = max(batches, 3 * workers)
        start = time.perf_counter()
        for _ in range(timed):
            next(iterator)
        return timed * batch_size / (time.perf_counter() - start)
    finally:
        iterator.close()


def stage_times(cfg, count: int) -> dict[str, float]:
    """Milliseconds per image of each stage of the training transform, in this process."""
    import numpy as np
    from PIL import Image

    from cab_jax.data import augment, images

    source = images._train_source(cfg, seed=0)
    transform = images.train_transform(cfg)
    totals: dict[str, float] = {}

    def timed(name, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
        return out

    size = cfg.image_size
    for i in range(count):
        rng = np.random.default_rng(i)
        record = timed("read record", source.__getitem__, i)
        image = timed("decode", augment.decode, augment.to_pil(record["image"]))
        top, left, h, w = augment.random_resized_crop_box(image.height, image.width, rng, cfg.crop_scale)
        box = (left, top, left + w, top + h)
        image = timed("crop + resize (bicubic)", image.resize, (size, size), transform.resample, box)
        image = timed("flip", image.transpose, Image.Transpose.FLIP_LEFT_RIGHT)
        image = timed("RandAugment", transform.randaugment, image, rng)
        array = timed("normalise", augment.normalize, np.asarray(image), cfg.mean, cfg.std)
        timed("random erasing", augment.random_erase, array, rng, cfg.random_erase)
    return {name: round(1e3 * t / count, 3) for name, t in totals.items()}


def main() -> None:
    from cab_jax.summary import markdown_table  # here: grain's workers import this script, and they need no JAX

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--train_per_class", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="of the fake images' sides, when writing them")
    parser.add_argument("--workers", default="1,2,4,8,16")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per worker count")
    parser.add_argument("--stage_images", type=int, default=200)
    args = parser.parse_args()

    from cab_jax import config
    from cab_jax.data import fake_imagenet

    if not (pathlib.Path(args.data_dir) / fake_imagenet.NAME).exists():
        start = time.perf_counter()
        fake_imagenet.write(args.data_dir, train_per_class=args.train_per_class, validation_per_class=1,
                            scale=args.scale)
        print(f"wrote the fake ImageNet in {time.perf_counter() - start:.0f} s", flush=True)
    cfg = config.vision_data(data_dir=args.data_dir)
    print(f"\n{os.cpu_count()} CPUs (os.cpu_count), {len(os.sched_getaffinity(0))} usable\n")
    print("Milliseconds per image, one process:\n")
    print(markdown_table([stage_times(cfg, args.stage_images)]), flush=True)
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        row = {"workers": workers, "images/s": round(pipeline_rate(cfg, workers, args.batch_size, args.batches))}
        rows.append(row)
        print(row, flush=True)
    print(f"\nTraining pipeline, batch {args.batch_size}:\n")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()

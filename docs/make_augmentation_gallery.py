"""Draw docs/augmentation_gallery.png: scikit-learn's two bundled photos, each as the evaluation transform shows it,
then eight draws of the training recipe of configs/vim_small.py (random resized crop, flip, RandAugment
rand-m9-mstd0.5-inc1, random erasing), undone normalisation for display.

    python docs/make_augmentation_gallery.py [--out=docs/augmentation_gallery.png] [--seed=0]
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
from PIL import Image, ImageDraw
from sklearn.datasets import load_sample_images

from cab_jax import config
from cab_jax.data import images

DRAWS, TILE, LABEL_HEIGHT = 8, 160, 18


def to_display(normalised: np.ndarray, mean, std) -> Image.Image:
    pixels = (normalised * np.asarray(std) + np.asarray(mean)) * 255
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8)).resize((TILE, TILE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).with_name("augmentation_gallery.png")))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    d = config.vision_data()
    train, evaluate = images.train_transform(d), images.eval_transform(d)
    photos = load_sample_images().images
    gallery = Image.new("RGB", ((DRAWS + 1) * TILE, len(photos) * TILE + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(gallery)
    draw.text((4, 3), "evaluation view", fill="black")
    draw.text((TILE + 4, 3), f"{DRAWS} training draws: crop, flip, {d.randaugment}, erase p {d.random_erase}",
              fill="black")
    for row, photo in enumerate(photos):
        element = {"image": photo, "label": 0}
        tiles = [evaluate.map(element)["image"]]
        tiles += [train.random_map(element, np.random.default_rng([args.seed, row, k]))["image"] for k in range(DRAWS)]
        for col, tile in enumerate(tiles):
            gallery.paste(to_display(tile, d.mean, d.std), (col * TILE, LABEL_HEIGHT + row * TILE))
    gallery.save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

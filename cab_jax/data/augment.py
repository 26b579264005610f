"""Per-example image transforms: DeiT's training recipe (random resized crop, flip, RandAugment, random erasing)
and its evaluation resize and centre crop.

Images arrive as HWC uint8 arrays and leave as normalised float32 (H, W, 3). Resizing and RandAugment work on PIL
images (bicubic, as the recipe, or bilinear); :func:`resize_bilinear` is a NumPy bilinear filter for code that has
arrays (the embedded digits are generated with it). Randomness comes only from the ``np.random.Generator`` that
grain's ``random_map`` hands to :meth:`TrainTransform.random_map`; grain derives it from (seed, element index), so
a given example in a given epoch is always augmented the same way, also after a resume.

Colour jitter is not applied: the recipe sets it, but timm skips it when a RandAugment policy is given.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from cab_jax.data import randaugment

DEFAULT_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
EVAL_CROP_PCT = 0.875
RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
ERASE_AREA = (0.02, 1.0 / 3.0)  # random erasing: fraction of the image, and aspect-ratio range
ERASE_ASPECT = (0.3, 1.0 / 0.3)


def _resize_taps(in_size: int, out_size: int, antialias: bool) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear taps (half-pixel centres): indices and weights, both (out_size, taps).

    Output pixel ``o`` is ``sum_t weights[o, t] * input[indices[o, t]]``; each row of weights sums
    to 1, taps that fall outside the input get weight 0 (so edges clamp).
    """
    scale = in_size / out_size
    support = max(scale, 1.0) if antialias else 1.0
    centres = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    first = np.floor(centres - support - 0.5).astype(np.int64)
    num_taps = math.ceil(2 * support) + 2
    taps = first[:, None] + np.arange(num_taps)[None, :]
    weights = np.maximum(0.0, 1.0 - np.abs((taps + 0.5 - centres[:, None]) / support))
    weights[(taps < 0) | (taps >= in_size)] = 0.0
    weights /= weights.sum(axis=1, keepdims=True)
    return np.clip(taps, 0, in_size - 1), weights.astype(np.float32)


def _resize_axis0(x: np.ndarray, out_size: int, antialias: bool) -> np.ndarray:
    """Resizes axis 0 of a 2-D float32 array."""
    idx, w = _resize_taps(x.shape[0], out_size, antialias)
    out = w[:, 0, None] * x[idx[:, 0]]
    for t in range(1, idx.shape[1]):
        out += w[:, t, None] * x[idx[:, t]]
    return out


def resize_bilinear(image: np.ndarray, height: int, width: int, *, antialias: bool = True) -> np.ndarray:
    """Resizes an (H, W, C) image to (height, width, C) float32 (same value range as the input).

    Separable bilinear filter; with ``antialias`` the triangle is widened by the downscale factor
    (PIL's ``Image.resize(..., BILINEAR)``, which it matches to within uint8 rounding).
    """
    if image.ndim != 3:
        raise ValueError(f"resize_bilinear expects an (H, W, C) image, got shape {image.shape}")
    in_h, in_w, channels = image.shape
    if (in_h, in_w) == (height, width):
        return np.array(image, dtype=np.float32)
    img = image.astype(np.float32, copy=False).reshape(in_h, in_w * channels)
    rows = _resize_axis0(img, height, antialias).reshape(height, in_w, channels)
    cols = _resize_axis0(rows.transpose(1, 0, 2).reshape(in_w, height * channels), width, antialias)
    return np.ascontiguousarray(cols.reshape(width, height, channels).transpose(1, 0, 2))


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Makes an (H, W, 3) image from grey (H, W) / (H, W, 1) or RGBA (H, W, 4) input."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"expected an (H, W, C) image, got shape {image.shape}")
    channels = image.shape[-1]
    if channels == 3:
        return image
    if channels == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 4:
        return image[:, :, :3]
    raise ValueError(f"expected 1, 3 or 4 channels, got shape {image.shape}")


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: Sequence[float],
    ratio: Sequence[float] = DEFAULT_CROP_RATIO,
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (top, left, h, w): 10 tries, then a clamped center crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_pil(image: np.ndarray | bytes) -> Image.Image:
    """A PIL image: of encoded bytes (JPEG, PNG), opened but not decoded (:func:`decode` does it); of an
    (H, W[, C]) uint8 array, RGB (grey and RGBA as :func:`to_rgb`)."""
    if isinstance(image, bytes):
        return Image.open(io.BytesIO(image))
    return Image.fromarray(np.ascontiguousarray(to_rgb(np.asarray(image, np.uint8))))


def decode(image: Image.Image) -> Image.Image:
    """``image`` (from :func:`to_pil`) decoded as RGB: grey, CMYK, palette and RGBA files become RGB."""
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, size: int, resample: int, crop_pct: float = EVAL_CROP_PCT) -> Image.Image:
    """Eval transform: shorter side -> int(size / crop_pct), then the central (size, size) crop. ``image`` may be
    undecoded (see :func:`to_pil`).

    An image that is already (size, size) is returned unchanged: the embedded digits are stored at the target size.
    """
    image = decode(image)
    width, height = image.size
    if (height, width) == (size, size):
        return image
    short = int(size / crop_pct)
    if height <= width:
        new_h, new_w = short, int(short * width / height)
    else:
        new_h, new_w = int(short * height / width), short
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    return image.resize((new_w, new_h), resample).crop((left, top, left + size, top + size))


def random_erase(image: np.ndarray, rng: np.random.Generator, prob: float) -> np.ndarray:
    """timm's RandomErasing, mode "pixel", one box: with probability ``prob`` a box of 2 %-33 % of the (H, W, C)
    image, aspect ratio in [0.3, 3.3], is replaced by standard normal noise (the image is already normalised).
    Modifies ``image`` in place and returns it."""
    if rng.random() >= prob:
        return image
    height, width, channels = image.shape
    log_aspect = (math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1]))
    for _ in range(10):
        area = rng.uniform(*ERASE_AREA) * height * width
        aspect = math.exp(rng.uniform(*log_aspect))
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if h < height and w < width:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            image[top : top + h, left : left + w] = rng.standard_normal((h, w, channels), dtype=np.float32)
            break
    return image


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """0..255 image -> float32 ``(x / 255 - mean) / std`` with mean/std given on the 0..1 scale."""
    mean_arr = np.asarray(mean, np.float32) * 255.0
    inv_std = 1.0 / (np.asarray(std, np.float32) * 255.0)
    return ((image.astype(np.float32, copy=False) - mean_arr) * inv_std).astype(np.float32)


def _passthrough(element: dict[str, Any], image: np.ndarray) -> dict[str, Any]:
    out = {k: v for k, v in element.items() if k != "image"}
    out["image"] = image
    out["label"] = np.int32(element["label"])
    return out


class TrainTransform(grain.transforms.RandomMap):
    """Random resized crop, horizontal flip, RandAugment (a timm policy string, "" for none), normalisation and
    random erasing (probability ``random_erase``), for one example dict."""

    def __init__(
        self,
        *,
        image_size: int,
        crop_scale: Sequence[float],
        hflip: bool,
        mean: Sequence[float],
        std: Sequence[float],
        crop_ratio: Sequence[float] = DEFAULT_CROP_RATIO,
        interpolation: str = "bicubic",
        randaugment_policy: str = "",
        random_erase: float = 0.0,
    ):
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {tuple(crop_scale)}")
        self.image_size = int(image_size)
        self.crop_scale = tuple(float(s) for s in crop_scale)
        self.crop_ratio = tuple(float(r) for r in crop_ratio)
        self.hflip = bool(hflip)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.resample = RESAMPLING[interpolation]
        fill = tuple(min(255, round(255 * m)) for m in self.mean)  # the mean pixel
        self.randaugment = randaugment.parse(randaugment_policy, fill=fill, resample=self.resample) \
            if randaugment_policy else None
        self.random_erase = float(random_erase)

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = decode(to_pil(element["image"]))
        top, left, h, w = random_resized_crop_box(image.height, image.width, rng, self.crop_scale, self.crop_ratio)
        image = image.resize((self.image_size, self.image_size), self.resample, box=(left, top, left + w, top + h))
        if self.hflip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.randaugment is not None:
            image = self.randaugment(image, rng)
        out = normalize(np.asarray(image), self.mean, self.std)
        if self.random_erase:
            out = random_erase(out, rng, self.random_erase)
        return _passthrough(element, out)


class EvalTransform(grain.transforms.Map):
    """Resize shorter side to image_size / 0.875, center crop, normalise."""

    def __init__(self, *, image_size: int, mean: Sequence[float], std: Sequence[float],
                 interpolation: str = "bicubic"):
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.resample = RESAMPLING[interpolation]

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        image = resize_center_crop(to_pil(element["image"]), self.image_size, self.resample)
        return _passthrough(element, normalize(np.asarray(image), self.mean, self.std))

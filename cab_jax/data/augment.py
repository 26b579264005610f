"""Per-example image transforms in NumPy (DeiT-style train crop/flip, eval resize/center-crop).

Everything here works on HWC uint8 (or float) arrays and returns float32. Randomness comes only from
the ``np.random.Generator`` that grain's ``random_map`` hands to :meth:`TrainTransform.random_map`;
grain derives that generator from (seed, element index), so a given example in a given epoch is
always augmented the same way, also after a resume.

Resizing is our own separable bilinear filter with PIL-style antialiasing (the triangle filter is
widened by the downscale factor), applied as a few weighted row gathers per axis, so no image
library is needed. DeiT itself uses bicubic interpolation; bilinear is what we use everywhere here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

DEFAULT_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
EVAL_CROP_PCT = 0.875


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


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int,
    scale: Sequence[float],
    ratio: Sequence[float] = DEFAULT_CROP_RATIO,
) -> np.ndarray:
    """Random crop of random area/aspect, resized to (size, size); float32 in the input's range."""
    top, left, h, w = random_resized_crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
    return resize_bilinear(image[top : top + h, left : left + w], size, size)


def resize_center_crop(image: np.ndarray, size: int, crop_pct: float = EVAL_CROP_PCT) -> np.ndarray:
    """Eval transform: shorter side -> int(size / crop_pct), then the central (size, size) crop.

    An image that is already (size, size) is returned unchanged (as float32): the embedded digits are
    stored at the target size and need no eval resize.
    """
    height, width = image.shape[:2]
    if (height, width) == (size, size):
        return image.astype(np.float32)
    short = int(size / crop_pct)
    if height <= width:
        new_h, new_w = short, int(short * width / height)
    else:
        new_h, new_w = int(short * height / width), short
    resized = resize_bilinear(image, new_h, new_w)
    top = round((new_h - size) / 2)
    left = round((new_w - size) / 2)
    return resized[top : top + size, left : left + size]


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
    """Random resized crop + optional horizontal flip + normalisation, for one example dict."""

    def __init__(
        self,
        *,
        image_size: int,
        crop_scale: Sequence[float],
        hflip: bool,
        mean: Sequence[float],
        std: Sequence[float],
        crop_ratio: Sequence[float] = DEFAULT_CROP_RATIO,
    ):
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {tuple(crop_scale)}")
        self.image_size = int(image_size)
        self.crop_scale = tuple(float(s) for s in crop_scale)
        self.crop_ratio = tuple(float(r) for r in crop_ratio)
        self.hflip = bool(hflip)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = to_rgb(element["image"])
        image = random_resized_crop(image, rng, self.image_size, self.crop_scale, self.crop_ratio)
        if self.hflip and rng.random() < 0.5:
            image = image[:, ::-1]
        return _passthrough(element, normalize(image, self.mean, self.std))


class EvalTransform(grain.transforms.Map):
    """Resize shorter side to image_size / 0.875, center crop, normalise."""

    def __init__(self, *, image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        image = resize_center_crop(to_rgb(element["image"]), self.image_size)
        return _passthrough(element, normalize(image, self.mean, self.std))

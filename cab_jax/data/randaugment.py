"""RandAugment as DeiT and Vim train with it (timm's ``rand-m9-mstd0.5-inc1``), on PIL images.

Each image gets ``num_ops`` operations drawn with replacement from the 15 of the "increasing" set; each one is
applied with probability ``prob`` (0.5), at a magnitude drawn per application from a normal distribution
(``magnitude``, ``magnitude_std``) clipped to [0, 10]. The increasing set's operations change the image more as the
magnitude grows (posterize keeps fewer bits, solarize inverts from a lower threshold, the enhancements move the
factor further from 1); signed ones (geometry, enhancements) are negated with probability 1/2. Geometric ones fill
uncovered pixels with ``fill`` (the dataset's mean pixel) and resample with ``resample`` (bicubic in the recipe).

All randomness comes from the ``np.random.Generator`` passed in, so an example is augmented the same way on every
run, resume and process count (grain derives the generator from the seed and the example's stream position).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_MAGNITUDE = 10.0


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(image: Image.Image, matrix: tuple[float, ...], fill: tuple[int, ...], resample: int) -> Image.Image:
    return image.transform(image.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


def _lookup(image: Image.Image, table: list[int]) -> Image.Image:
    """Every channel value v of ``image`` replaced by ``table[v]``."""
    return image.point(table * len(image.getbands()))


def _solarize_add(image: Image.Image, add: int) -> Image.Image:
    """Adds ``add`` (clipped at 255) to channel values below 128."""
    return _lookup(image, [min(255, v + add) if v < 128 else v for v in range(256)])


def _posterize(image: Image.Image, bits: int) -> Image.Image:
    """Keeps the ``bits`` high bits of each channel value (0 bits: black; Pillow's posterize wants 1 to 8)."""
    mask = (0xFF << (8 - min(bits, 8))) & 0xFF
    return _lookup(image, [v & mask for v in range(256)])


@dataclasses.dataclass(frozen=True)
class Op:
    """One operation: ``apply(image, argument, fill, resample)``, its argument from the magnitude (``level``, in
    [0, 10], and the generator for a random sign); ``level`` None for the operations without one."""

    apply: Callable[..., Image.Image]
    level: Callable[[float, np.random.Generator], float | int] | None = None


def _enhancement(enhancer: type) -> Op:
    return Op(lambda img, factor, fill, resample: enhancer(img).enhance(factor),
              lambda m, rng: 1.0 + _signed(m / MAX_MAGNITUDE * 0.9, rng))


# The "increasing" set, by timm's names. Translations move by a fraction of the image's size (0.45 at magnitude 10).
OPS: dict[str, Op] = {
    "AutoContrast": Op(lambda img, _, fill, resample: ImageOps.autocontrast(img)),
    "Equalize": Op(lambda img, _, fill, resample: ImageOps.equalize(img)),
    "Invert": Op(lambda img, _, fill, resample: ImageOps.invert(img)),
    "Rotate": Op(lambda img, degrees, fill, resample: img.rotate(degrees, resample=resample, fillcolor=fill),
                 lambda m, rng: _signed(m / MAX_MAGNITUDE * 30.0, rng)),
    "PosterizeIncreasing": Op(lambda img, bits, fill, resample: _posterize(img, bits),
                              lambda m, rng: 4 - int(m / MAX_MAGNITUDE * 4)),
    "SolarizeIncreasing": Op(lambda img, threshold, fill, resample: ImageOps.solarize(img, threshold),
                             lambda m, rng: 256 - int(m / MAX_MAGNITUDE * 256)),
    "SolarizeAdd": Op(lambda img, add, fill, resample: _solarize_add(img, add),
                      lambda m, rng: int(m / MAX_MAGNITUDE * 110)),
    "ColorIncreasing": _enhancement(ImageEnhance.Color),
    "ContrastIncreasing": _enhancement(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhancement(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhancement(ImageEnhance.Sharpness),
    "ShearX": Op(lambda img, s, fill, resample: _affine(img, (1, s, 0, 0, 1, 0), fill, resample),
                 lambda m, rng: _signed(m / MAX_MAGNITUDE * 0.3, rng)),
    "ShearY": Op(lambda img, s, fill, resample: _affine(img, (1, 0, 0, s, 1, 0), fill, resample),
                 lambda m, rng: _signed(m / MAX_MAGNITUDE * 0.3, rng)),
    "TranslateXRel": Op(lambda img, f, fill, resample: _affine(img, (1, 0, f * img.size[0], 0, 1, 0), fill, resample),
                        lambda m, rng: _signed(m / MAX_MAGNITUDE * 0.45, rng)),
    "TranslateYRel": Op(lambda img, f, fill, resample: _affine(img, (1, 0, 0, 0, 1, f * img.size[1]), fill, resample),
                        lambda m, rng: _signed(m / MAX_MAGNITUDE * 0.45, rng)),
}


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """The policy; call it on an RGB ``PIL.Image`` with a generator (see the module docstring)."""

    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.5
    prob: float = 0.5
    fill: tuple[int, int, int] = (128, 128, 128)
    resample: int = Image.Resampling.BICUBIC

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        names = list(OPS)
        for k in rng.integers(0, len(names), size=self.num_ops):
            if rng.random() >= self.prob:
                continue
            image = self.apply(names[k], image, self.draw_magnitude(rng), rng)
        return image

    def draw_magnitude(self, rng: np.random.Generator) -> float:
        m = rng.normal(self.magnitude, self.magnitude_std) if self.magnitude_std > 0 else self.magnitude
        return float(np.clip(m, 0.0, MAX_MAGNITUDE))

    def apply(self, name: str, image: Image.Image, magnitude: float, rng: np.random.Generator) -> Image.Image:
        """Operation ``name`` at ``magnitude`` (its sign, where it has one, drawn from ``rng``)."""
        op = OPS[name]
        return op.apply(image, None if op.level is None else op.level(magnitude, rng), self.fill, self.resample)


def parse(spec: str, *, fill: tuple[int, int, int], resample: int) -> RandAugment:
    """The policy of a timm-style string: ``rand-m9-mstd0.5-inc1`` (``m`` magnitude, ``n`` operations per image,
    ``mstd`` magnitude std, ``p`` probability of each, ``inc1`` the increasing set, the only one here)."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"a RandAugment policy starts with 'rand-', got {spec!r}")
    fields = {}
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|inc|m|n|p)([0-9.]+)", part)
        if not match:
            raise ValueError(f"unknown RandAugment field {part!r} in {spec!r} (known: m, n, mstd, p, inc)")
        fields[match[1]] = float(match[2])
    if fields.get("inc", 1.0) != 1.0:
        raise ValueError(f"only the increasing operation set (inc1) is implemented, got {spec!r}")
    return RandAugment(num_ops=int(fields.get("n", 2)), magnitude=fields.get("m", 9.0),
                       magnitude_std=fields.get("mstd", 0.5), prob=fields.get("p", 0.5), fill=fill, resample=resample)

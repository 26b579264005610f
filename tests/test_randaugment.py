"""RandAugment's operations against their definitions, the policy's draws, and random erasing's statistics."""

import itertools

import numpy as np
import pytest
from PIL import Image

from cab_jax.data import augment, randaugment

FILL = (124, 116, 104)  # ImageNet's mean pixel
POLICY = randaugment.parse("rand-m9-mstd0.5-inc1", fill=FILL, resample=Image.Resampling.BICUBIC)
# The operations that leave the image as it is at magnitude 0 (the rest have no magnitude, or posterize keeps 4 bits).
IDENTITY_AT_ZERO = ["Rotate", "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                    "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                    "TranslateYRel"]


def image(height=24, width=20, seed=0) -> np.ndarray:
    """A smooth colour ramp plus noise: every operation changes it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    ramp = np.stack([x * 255 / width, y * 255 / height, (x + y) * 255 / (width + height)], -1)
    return np.clip(ramp * 0.7 + rng.normal(40, 25, ramp.shape), 0, 255).astype(np.uint8)


def apply(name, array, magnitude, positive=True):
    """Operation ``name`` at ``magnitude``; signed operations with the sign asked for (their one draw from the
    generator, below 1/2, negates)."""
    seed = next(s for s in range(100) if (np.random.default_rng(s).random() < 0.5) != positive)
    return np.asarray(POLICY.apply(name, Image.fromarray(array), magnitude, np.random.default_rng(seed)))


def test_the_policy_string_gives_the_recipe():
    assert (POLICY.num_ops, POLICY.magnitude, POLICY.magnitude_std, POLICY.prob) == (2, 9.0, 0.5, 0.5)
    assert POLICY.fill == FILL and len(randaugment.OPS) == 15
    custom = randaugment.parse("rand-n3-m5-mstd0-p1", fill=FILL, resample=Image.Resampling.BILINEAR)
    assert (custom.num_ops, custom.magnitude, custom.magnitude_std, custom.prob) == (3, 5.0, 0.0, 1.0)
    for bad in ("rand-m9-inc0", "augmix-m5", "rand-q3", "rand-m"):
        with pytest.raises(ValueError):
            randaugment.parse(bad, fill=FILL, resample=0)


@pytest.mark.parametrize("name", IDENTITY_AT_ZERO)
def test_at_magnitude_zero_the_operation_is_the_identity(name):
    x = image()
    np.testing.assert_array_equal(apply(name, x, 0.0), x)


@pytest.mark.parametrize("name", [*IDENTITY_AT_ZERO, "PosterizeIncreasing"])
def test_the_change_grows_with_the_magnitude(name):
    x = image()
    changes = [np.abs(apply(name, x, m).astype(int) - x).mean() for m in (2.0, 5.0, 8.0, 10.0)]
    assert all(a < b for a, b in itertools.pairwise(changes)), changes


def test_point_operations_follow_their_definitions():
    x = image()
    np.testing.assert_array_equal(apply("Invert", x, 9.0), 255 - x)
    threshold = 256 - int(9.0 / 10 * 256)  # 26
    np.testing.assert_array_equal(apply("SolarizeIncreasing", x, 9.0), np.where(x >= threshold, 255 - x, x))
    add = int(9.0 / 10 * 110)  # 99
    np.testing.assert_array_equal(apply("SolarizeAdd", x, 9.0), np.where(x < 128, np.minimum(255, x + add), x))
    bits = 4 - int(9.0 / 10 * 4)  # 1
    np.testing.assert_array_equal(apply("PosterizeIncreasing", x, 9.0), x & (0xFF << (8 - bits) & 0xFF))
    for positive, factor in ((True, 1.9), (False, 0.1)):  # 1 +- 0.9 at magnitude 10
        want = np.clip(np.round(x * factor), 0, 255)
        np.testing.assert_allclose(apply("BrightnessIncreasing", x, 10.0, positive), want, atol=1)
    low = (x // 4 + 100).astype(np.uint8)  # a low-contrast image: autocontrast stretches each channel to 0..255
    stretched = apply("AutoContrast", low, 0.0)
    assert (stretched.reshape(-1, 3).min(0) == 0).all() and (stretched.reshape(-1, 3).max(0) >= 254).all()
    equalized = apply("Equalize", low, 0.0)
    assert np.ptp(equalized) > 200 and np.ptp(low) < 70


def test_translations_shift_and_fill_with_the_mean_pixel():
    x = image(height=20, width=20)
    shift = round(0.45 * 20)  # magnitude 10: 45 % of the side
    moved = apply("TranslateXRel", x, 10.0)
    np.testing.assert_allclose(moved[:, : 20 - shift], x[:, shift:], atol=1)
    np.testing.assert_array_equal(moved[:, 20 - shift :], np.broadcast_to(FILL, moved[:, 20 - shift :].shape))
    moved = apply("TranslateYRel", x, 10.0, positive=False)
    np.testing.assert_allclose(moved[shift:], x[: 20 - shift], atol=1)
    np.testing.assert_array_equal(moved[:shift], np.broadcast_to(FILL, moved[:shift].shape))
    corner = apply("Rotate", x, 10.0)[0, 0]  # 30 degrees: the corners come from outside the image
    np.testing.assert_array_equal(corner, FILL)


def test_the_policy_draws_two_operations_half_of_the_time_at_magnitude_9():
    rng = np.random.default_rng(0)
    magnitudes = np.array([POLICY.draw_magnitude(rng) for _ in range(20000)])
    assert abs(magnitudes.mean() - 9.0) < 0.02 and abs(magnitudes.std() - 0.5) < 0.02
    assert magnitudes.max() <= 10.0 and magnitudes.min() >= 0.0
    x = Image.fromarray(image())
    unchanged = np.mean([np.array_equal(np.asarray(POLICY(x, np.random.default_rng(s))), np.asarray(x))
                         for s in range(400)])
    assert abs(unchanged - 0.25) < 0.07  # neither of the 2 operations applied: (1 - 0.5) ** 2
    one = np.asarray(POLICY(x, np.random.default_rng(7)))
    np.testing.assert_array_equal(one, np.asarray(POLICY(x, np.random.default_rng(7))))  # the generator decides


def test_random_erasing_statistics():
    rng = np.random.default_rng(0)
    erased, areas, aspects, values = 0, [], [], []
    for _ in range(4000):
        img = np.full((40, 50, 3), 7.0, np.float32)
        out = augment.random_erase(img, rng, prob=0.25)
        changed = out[..., 0] != 7.0
        if changed.any():
            erased += 1
            rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
            h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
            assert changed.sum() == h * w  # one box
            areas.append(h * w / (40 * 50))
            aspects.append(h / w)
            values.append(out[changed])
    assert abs(erased / 4000 - 0.25) < 0.03
    assert min(areas) > 0.015 and max(areas) < 0.36 and min(aspects) > 0.25 and max(aspects) < 3.7
    noise = np.concatenate(values)
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1.0) < 0.02  # per-pixel standard normal noise

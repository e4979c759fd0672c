"""repro.data.augment: deterministic, content-preserving where it should be, lazy at 16384 px."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import pyvips

from repro.config import AugmentationSettings
from repro.data.augment import (
    Augmenter,
    adjust_colour,
    augmentation_rng,
    elastic_field,
    flip_rotate,
)


def _image(height: int = 128, width: int = 128) -> pyvips.Image:
    rng = np.random.default_rng(0)
    array = np.full((height, width, 3), 255, np.uint8)
    top, bottom, left, right = height // 8, height * 7 // 8, width * 3 // 16, width * 25 // 32
    array[top:bottom, left:right] = rng.integers(
        60, 230, (bottom - top, right - left, 3), dtype=np.uint8
    )
    return pyvips.Image.new_from_array(array, interpretation="srgb")


def test_deterministic_for_a_seed_and_changes_the_image():
    augmenter = Augmenter(AugmentationSettings())
    image = _image()
    first = augmenter(image, np.random.default_rng(7)).numpy()
    second = augmenter(image, np.random.default_rng(7)).numpy()
    other = augmenter(image, np.random.default_rng(8)).numpy()
    assert first.shape == (128, 128, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first, image.numpy())


def test_disabled_returns_the_image():
    image = _image()
    assert Augmenter(AugmentationSettings(enabled=False))(image, np.random.default_rng(0)) is image


@pytest.mark.parametrize(
    ("horizontal", "vertical", "turns"),
    [(True, False, 0), (False, True, 0), (False, False, 1), (False, False, 2), (True, True, 3)],
)
def test_flips_and_quarter_turns_preserve_pixel_content(horizontal, vertical, turns):
    image = _image(96, 128)
    array = image.numpy()
    out = flip_rotate(image, horizontal, vertical, turns).numpy()
    expected = array[:, ::-1] if horizontal else array
    expected = expected[::-1] if vertical else expected
    expected = np.rot90(expected, k=-turns)  # libvips rotates clockwise
    np.testing.assert_array_equal(out, expected)
    assert Counter(map(tuple, out.reshape(-1, 3))) == Counter(map(tuple, array.reshape(-1, 3)))


def test_geometry_only_settings_preserve_content():
    """Flips and 90-degree turns only (no resampling, no colour): same pixels, moved."""
    settings = AugmentationSettings(
        rotation_degrees=0, elastic_alpha=0, hue=0, saturation=0, brightness=0
    )
    image = _image()
    array = image.numpy()
    seen = set()
    for seed in range(12):
        out = Augmenter(settings)(image, np.random.default_rng(seed)).numpy()
        assert np.array_equal(np.sort(out.ravel()), np.sort(array.ravel()))
        seen.add(out.tobytes())
    assert len(seen) > 3


def test_identity_map_leaves_the_image_unchanged():
    """The rotation/elastic map with angle 0 and no displacement is exactly the identity."""
    settings = AugmentationSettings(elastic_alpha=0)
    augmenter = Augmenter(settings)
    assert augmenter.displacement_map(64, 48, 0.0, np.random.default_rng(0)) is None
    index = augmenter.displacement_map(64, 48, 1e-9, np.random.default_rng(0))
    image = _image(48, 64)
    out = image.mapim(index, interpolate=pyvips.Interpolate.new("bilinear")).cast("uchar")
    np.testing.assert_array_equal(out.numpy(), image.numpy())


def test_elastic_field_is_smooth_and_bounded():
    field = elastic_field(256, 192, alpha=10, sigma=40, rng=np.random.default_rng(0)).numpy()
    assert field.shape == (192, 256, 2)
    assert np.abs(field).max() <= 10 + 1e-4
    assert np.abs(field).max() > 5
    assert np.abs(np.diff(field, axis=1)).max() < 1  # smooth: small change per pixel


def test_small_rotation_keeps_size_and_fills_white():
    settings = AugmentationSettings(
        flips=False, rotate_90=False, rotation_degrees=30, elastic_alpha=0,
        hue=0, saturation=0, brightness=0,
    )  # fmt: skip
    augmenter = Augmenter(settings)
    image = pyvips.Image.new_from_array(np.full((100, 100, 3), 90, np.uint8), interpretation="srgb")
    for seed in range(20):
        rng = np.random.default_rng(seed)
        if abs(augmenter.draw(np.random.default_rng(seed)).angle) > 10:
            out = augmenter(image, rng).numpy()
            break
    assert out.shape == (100, 100, 3)
    assert (out[0, 0] == 255).all()  # a corner uncovered by the rotated square
    assert (out[50, 50] == 90).all()


def test_colour_changes_keep_white_and_follow_settings():
    image = _image()
    brighter = adjust_colour(image, 1.05, 1.0, 0.0).numpy().astype(int)
    array = image.numpy().astype(int)
    assert (brighter[0, 0] == 255).all()
    tissue = array[16:112, 24:100]
    assert brighter[16:112, 24:100].mean() > tissue.mean()
    greyer = adjust_colour(image, 1.0, 0.5, 0.0).numpy().astype(int)[16:112, 24:100]
    spread = lambda a: (a.max(2) - a.min(2)).mean()  # noqa: E731
    assert spread(greyer) < spread(tissue)
    shifted = adjust_colour(image, 1.0, 1.0, 18.0).numpy()
    assert shifted.dtype == np.uint8 and not np.array_equal(shifted, image.numpy())


def test_draws_stay_within_the_settings():
    settings = replace(AugmentationSettings(), hue=0.05, saturation=0.1, brightness=0.2)
    augmenter = Augmenter(settings)
    for seed in range(50):
        draw = augmenter.draw(np.random.default_rng(seed))
        assert abs(draw.hue) <= 18.0 and abs(draw.chroma - 1) <= 0.1
        assert abs(draw.lightness - 1) <= 0.2 and abs(draw.angle) <= settings.rotation_degrees
        assert draw.quarter_turns in range(4)


def test_cheap_at_paper_size():
    """16384 x 16384: building the pipeline is cheap, and a region costs only its own pixels."""
    big = pyvips.Image.black(16384, 16384).new_from_image([230, 160, 190]).cast("uchar")
    big = big.copy(interpretation="srgb")
    start = time.perf_counter()
    out = Augmenter(AugmentationSettings())(big, np.random.default_rng(0))
    built = time.perf_counter() - start
    assert (out.width, out.height) == (16384, 16384)
    region = out.crop(8000, 8000, 256, 256).numpy()
    total = time.perf_counter() - start
    assert built < 5 and total < 10
    assert region.shape == (256, 256, 3)


def test_augmentation_rng_is_seeded_by_seed_epoch_image_and_patch_position():
    def draw(*key):
        return augmentation_rng(*key).random()

    assert draw(0, 1, "a", 16, 32) == draw(0, 1, "a", 16, 32)
    others = [(0, 1, "a", 32, 16), (0, 1, "a"), (0, 2, "a", 16, 32), (1, 1, "a", 16, 32)]
    others.append((0, 1, "b", 16, 32))
    values = {draw(0, 1, "a", 16, 32), *(draw(*key) for key in others)}
    assert len(values) == 1 + len(others)

"""repro.data.slides: levels, mpp, regions, resampling and errors that name the file."""

from __future__ import annotations

import numpy as np
import pytest
import pyvips

from repro.data.slides import SlideError, open_slide, resample


def _save(array: np.ndarray, path, mpp: float | None = 0.48, pyramid: bool = True) -> None:
    """A tiled TIFF, lossless (deflate) so pixel values can be compared exactly."""
    image = pyvips.Image.new_from_array(np.ascontiguousarray(array), interpretation="srgb")
    options = {"xres": 1000 / mpp, "yres": 1000 / mpp} if mpp else {}
    image.tiffsave(
        str(path), tile=True, tile_width=64, tile_height=64, pyramid=pyramid,
        compression="deflate", **options,
    )  # fmt: skip


def _tissue_slide(height: int = 256, width: int = 512) -> np.ndarray:
    """White slide with a pink rectangle at rows 64:128, columns 96:224."""
    array = np.full((height, width, 3), 255, np.uint8)
    array[64:128, 96:224] = (220, 120, 170)
    return array


def test_levels_and_mpp_from_resolution_tags(tmp_path):
    path = tmp_path / "slide.tiff"
    _save(_tissue_slide(), path, mpp=0.48)
    slide = open_slide(path)
    assert slide.mpp == pytest.approx(0.48, rel=1e-4)
    assert slide.mpp_source == "resolution tags"
    assert slide.dimensions == (512, 256)
    widths = [level.width for level in slide.levels]
    assert widths[:3] == [512, 256, 128]
    assert [level.mpp for level in slide.levels[:3]] == pytest.approx([0.48, 0.96, 1.92], rel=1e-4)
    assert slide.best_level(0.96).width == 256  # the coarsest level not coarser than the target
    assert slide.best_level(0.7).width == 512
    assert slide.best_level(0.2).width == 512  # nothing finer: level 0


def test_missing_mpp_fails_loudly_and_override_applies(tmp_path):
    path = tmp_path / "no_resolution.tiff"
    _save(_tissue_slide(), path, mpp=None)
    with pytest.raises(SlideError, match=r"no_resolution.tiff.*mpp_override"):
        open_slide(path)
    slide = open_slide(path, mpp_override=0.5)
    assert slide.mpp == 0.5
    assert slide.mpp_source == "mpp_override"
    assert slide.levels[1].mpp == pytest.approx(1.0)


def test_tags_win_over_the_override(tmp_path):
    path = tmp_path / "tagged.tiff"
    _save(_tissue_slide(), path, mpp=0.25)
    assert open_slide(path, mpp_override=0.5).mpp == pytest.approx(0.25, rel=1e-4)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(SlideError, match=r"absent.tiff.*no such file"):
        open_slide(tmp_path / "absent.tiff")


def test_truncated_file_names_the_file(tmp_path):
    good = tmp_path / "good.tiff"
    _save(_tissue_slide(), good)
    truncated = tmp_path / "truncated.tiff"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SlideError, match=r"truncated.tiff.*truncated or damaged"):
        open_slide(truncated)


def test_non_image_file_names_the_file(tmp_path):
    text = tmp_path / "notes.tiff"
    text.write_text("this is not a slide\n")
    with pytest.raises(SlideError, match=r"notes.tiff.*not an image"):
        open_slide(text)
    empty = tmp_path / "empty.tiff"
    empty.write_bytes(b"")
    with pytest.raises(SlideError, match=r"empty.tiff"):
        open_slide(empty)


def test_damaged_tiles_fail_on_read_naming_the_file(tmp_path):
    path = tmp_path / "damaged.tiff"
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)
    pyvips.Image.new_from_array(noise).tiffsave(
        str(path), tile=True, compression="jpeg", xres=1000 / 0.5, yres=1000 / 0.5
    )
    data = bytearray(path.read_bytes())
    size = len(data)
    damaged = bytearray(data)
    damaged[2000:60000] = bytes(58000)  # zero the first tiles' JPEG data, keep the directory
    path.write_bytes(bytes(damaged))
    with pytest.raises(SlideError, match=r"damaged\.tiff"):
        open_slide(path)  # the first tile is probed when opening
    damaged = bytearray(data)
    damaged[size // 2 : size // 2 + 30000] = bytes(30000)  # a later tile only
    path.write_bytes(bytes(damaged))
    slide = open_slide(path)
    with pytest.raises(SlideError, match=r"damaged\.tiff"):
        slide.read_region(0, 0, 512, 512)


def test_openslide_formats_get_a_clear_message(tmp_path):
    path = tmp_path / "slide.mrxs"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(SlideError, match=r"slide.mrxs.*OpenSlide"):
        open_slide(path)


def test_read_region_level0_coordinates(tmp_path):
    rng = np.random.default_rng(1)
    array = rng.integers(0, 255, (256, 384, 3), dtype=np.uint8)
    path = tmp_path / "random.tiff"
    _save(array, path)
    slide = open_slide(path)
    np.testing.assert_array_equal(slide.read_region(40, 30, 100, 50), array[30:80, 40:140])
    # Level 1: location in level-0 coordinates, size in level-1 pixels.
    level1 = slide.read_level(1).numpy()
    np.testing.assert_array_equal(slide.read_region(40, 30, 20, 10, level=1), level1[15:25, 20:40])
    # Outside the slide: white.
    corner = slide.read_region(370, 250, 20, 10)
    np.testing.assert_array_equal(corner[:6, :14], array[250:256, 370:384])
    assert (corner[6:] == 255).all() and (corner[:, 14:] == 255).all()


def test_2x_shrink_keeps_mean_colour_and_tissue_position(tmp_path):
    rng = np.random.default_rng(2)
    array = _tissue_slide(256, 512)
    array[64:128, 96:224] = rng.integers(100, 240, (64, 128, 3), dtype=np.uint8)  # texture
    path = tmp_path / "single_level.tiff"
    _save(array, path, mpp=0.48, pyramid=False)  # no 0.96 level: must shrink level 0
    slide = open_slide(path)
    assert len(slide.levels) == 1
    half = slide.read_at_mpp(0.96).numpy()
    assert half.shape == (128, 256, 3)
    np.testing.assert_allclose(half.reshape(-1, 3).mean(0), array.reshape(-1, 3).mean(0), atol=0.5)
    tissue = (half < 250).any(axis=2)
    rows, cols = np.flatnonzero(tissue.any(1)), np.flatnonzero(tissue.any(0))
    assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (32, 64, 48, 112)
    # The 2x2 box average: antialiased, not decimated.
    expected = array.reshape(128, 2, 256, 2, 3).mean(axis=(1, 3))
    assert np.abs(half - expected).max() <= 1


def test_non_integer_ratio_resamples_with_antialiasing(tmp_path):
    array = _tissue_slide(256, 512)
    path = tmp_path / "half_micron.tiff"
    _save(array, path, mpp=0.5, pyramid=False)
    image = open_slide(path).read_at_mpp(0.96)
    assert (image.width, image.height) == (267, 133)  # 512 * 0.5 / 0.96, rounded
    mean = image.numpy().reshape(-1, 3).mean(0)
    np.testing.assert_allclose(mean, array.reshape(-1, 3).mean(0), atol=1.5)


def test_resample_identity_and_box():
    image = pyvips.Image.new_from_array(np.arange(16, dtype=np.uint8).reshape(4, 4))
    assert resample(image, 1.0) is image
    # 2x2 means 2.5, 4.5, 10.5, 12.5, rounded half up.
    np.testing.assert_array_equal(resample(image, 0.5).numpy(), [[3, 5], [11, 13]])


def test_aperio_mpp_from_the_description(tmp_path):
    image = pyvips.Image.new_from_array(_tissue_slide(), interpretation="srgb").copy()
    description = "Aperio Image Library v12\n512x256 |AppMag = 20|MPP = 0.4990|Filename = x"
    image.set_type(pyvips.GValue.gstr_type, "image-description", description)
    path = tmp_path / "aperio.svs"
    image.tiffsave(str(path), tile=True, tile_width=64, tile_height=64, pyramid=True)
    slide = open_slide(path, backend="pyvips")
    assert (slide.mpp, slide.mpp_source) == (0.499, "aperio description")
    slide = open_slide(path)  # auto: an Aperio file goes to OpenSlide, which reads the same MPP
    assert (slide.backend, slide.mpp) == ("openslide", 0.499)


def test_subifd_pyramid_levels(tmp_path):
    image = pyvips.Image.new_from_array(_tissue_slide(), interpretation="srgb")
    path = tmp_path / "subifd.tiff"
    image.tiffsave(
        str(path), tile=True, tile_width=64, tile_height=64, pyramid=True, subifd=True,
        compression="deflate", xres=1000 / 0.5, yres=1000 / 0.5,
    )  # fmt: skip
    slide = open_slide(path)
    assert [level.width for level in slide.levels[:3]] == [512, 256, 128]
    assert slide.levels[1].subifd and slide.levels[1].mpp == pytest.approx(1.0, rel=1e-4)
    level1 = slide.read_level(1).numpy()
    np.testing.assert_array_equal(slide.read_region(0, 0, 64, 32, level=1), level1[:32, :64])


def test_jpeg2000_slides_get_a_clear_message(tmp_path):
    """A TIFF whose compression tag says Aperio JPEG 2000 (33003): pyvips cannot decode it."""
    import struct

    path = tmp_path / "j2k.svs"
    image = pyvips.Image.new_from_array(_tissue_slide(64, 64), interpretation="srgb")
    image.tiffsave(str(path), tile=True, tile_width=16, tile_height=16, xres=2000, yres=2000)
    data = bytearray(path.read_bytes())
    directory = struct.unpack("<I", data[4:8])[0]
    for entry in range(struct.unpack("<H", data[directory : directory + 2])[0]):
        start = directory + 2 + 12 * entry
        if struct.unpack("<H", data[start : start + 2])[0] == 259:  # Compression
            data[start + 8 : start + 10] = struct.pack("<H", 33003)
    path.write_bytes(bytes(data))
    with pytest.raises(SlideError, match=r"j2k\.svs: .*level 0.*JPEG 2000"):
        open_slide(path)

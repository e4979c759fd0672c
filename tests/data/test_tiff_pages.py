"""PANDA's page layout (1, 1/4, 1/16) from save_pyramid and the TIFF page joiner behind it."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import pyvips

from repro.data.slides import PANDA_DOWNSAMPLES, open_slide, save_pyramid
from repro.data.synthetic import generate_synthetic_panda
from repro.data.tiff import join_pages, read_directories


def _image(height: int = 512, width: int = 1024) -> pyvips.Image:
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    return pyvips.Image.new_from_array(pixels, interpretation="srgb")


def test_panda_layout_pages_and_resolution_tags(tmp_path):
    path = tmp_path / "panda.tiff"
    save_pyramid(_image(), path, mpp=0.48, layout="panda")
    pages = read_directories(path)
    assert [(p.width, p.height) for p in pages] == [(1024, 512), (256, 128), (64, 32)]
    assert all(p.tiled and p.compression == 7 for p in pages)  # tiled JPEG
    assert [p.get(254) for p in pages] == [0, 1, 1]  # NewSubfileType: reduced resolution
    for page, factor in zip(pages, PANDA_DOWNSAMPLES, strict=True):
        image = pyvips.Image.new_from_file(str(path), page=pages.index(page))
        assert 1000 / image.xres == pytest.approx(0.48 * factor, rel=1e-5), "tags per page"
    slide = open_slide(path)
    assert slide.backend == "pyvips"
    assert [lv.downsample for lv in slide.levels] == [1, 4, 16]
    assert [lv.mpp for lv in slide.levels] == pytest.approx([0.48, 1.92, 7.68], rel=1e-5)
    assert slide.best_level(0.96).index == 0  # PANDA: level 0 is shrunk 2x to 0.96 um/px
    # OpenSlide reads the same levels and pixels (generic TIFF).
    other = open_slide(path, backend="openslide")
    assert [(lv.width, lv.height) for lv in other.levels] == [(1024, 512), (256, 128), (64, 32)]
    assert other.mpp == pytest.approx(0.48, rel=1e-5)
    for level in range(3):
        np.testing.assert_array_equal(
            slide.read_region(16, 16, 40, 30, level), other.read_region(16, 16, 40, 30, level)
        )
    # Page 1 is the 4x4 box average of the image (then JPEG at Q90).
    expected = _image().shrink(4, 4).numpy().astype(int)
    assert np.abs(slide.read_level(1).numpy().astype(int) - expected).mean() < 6


def test_synthetic_raw_slides_have_pandas_layout(tmp_path):
    root = generate_synthetic_panda(tmp_path / "raw", n_images=4, size=512, seed=0)
    for path in sorted((root / "train_images").glob("*.tiff")):
        slide = open_slide(path)
        assert [(lv.width, lv.height) for lv in slide.levels] == [(512, 256), (128, 64), (32, 16)]
        assert slide.mpp == pytest.approx(0.48, rel=1e-5)


@pytest.mark.parametrize("bigtiff", [False, True])
def test_join_pages_keeps_pixels_and_handles_bigtiff(tmp_path, bigtiff):
    first, second = _image(64, 96), _image(32, 48)
    options = {"tile": True, "tile_width": 16, "tile_height": 16, "compression": "deflate"}
    sources = []
    for index, image in enumerate((first, second)):
        sources.append(tmp_path / f"page{index}.tif")
        image.tiffsave(str(sources[-1]), bigtiff=bigtiff, **options)
    out = tmp_path / "joined.tif"
    join_pages(sources, out)
    assert (out.read_bytes()[2:4] == b"+\x00") == bigtiff
    for page, image in enumerate((first, second)):
        read = pyvips.Image.new_from_file(str(out), page=page, fail_on="error")
        np.testing.assert_array_equal(read.numpy(), image.numpy())
    with openslide.OpenSlide(str(out)) as reference:
        assert reference.level_dimensions == ((96, 64), (48, 32))

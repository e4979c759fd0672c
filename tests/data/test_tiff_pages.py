"""PANDA's page layout (1, 1/4, 1/16) from save_pyramid and the TIFF page joiner behind it."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import pyvips

from repro.data.slides import PANDA_DOWNSAMPLES, nearest_shrink, open_slide, save_pyramid
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


@pytest.mark.parametrize("layout", ["panda", "halving"])
def test_label_pyramids_are_lossless_and_nearest(tmp_path, layout):
    """``labels=True``: deflate instead of JPEG, and every page holds label values only (the
    centre pixel of each block), at the sizes the image's pages have."""
    labels = np.random.default_rng(1).integers(0, 6, (300, 1000), dtype=np.uint8)
    image = pyvips.Image.new_from_array(labels)
    image = image.bandjoin([image, image]).copy(interpretation="srgb")
    path, reference = tmp_path / "labels.tiff", tmp_path / "image.tiff"
    save_pyramid(image, path, mpp=0.48, layout=layout, labels=True)
    save_pyramid(image, reference, mpp=0.48, layout=layout)
    pages, image_pages = read_directories(path), read_directories(reference)
    assert [(p.width, p.height) for p in pages] == [(p.width, p.height) for p in image_pages]
    assert all(p.tiled and p.compression == 8 for p in pages)  # tiled deflate
    page0 = pyvips.Image.new_from_file(str(path), page=0).numpy()[..., 0]
    np.testing.assert_array_equal(page0, labels)
    for index in range(1, len(pages)):
        page = pyvips.Image.new_from_file(str(path), page=index).numpy()[..., 0]
        assert set(np.unique(page).tolist()) <= set(range(6)), index
    if layout == "panda":
        page1 = pyvips.Image.new_from_file(str(path), page=1).numpy()[..., 0]
        np.testing.assert_array_equal(page1, labels[2::4, 2::4])


def test_nearest_shrink_takes_block_centres_at_the_shrink_size():
    values = np.arange(50 * 1027, dtype=np.int32).reshape(50, 1027) % 251
    image = pyvips.Image.new_from_array(values.astype(np.uint8))
    for factor in (2, 4, 16):
        shrunk = nearest_shrink(image, factor)
        assert (shrunk.width, shrunk.height) == (
            image.shrink(factor, factor).width,
            image.shrink(factor, factor).height,
        )
        inside = values[factor // 2 :: factor, factor // 2 :: factor]
        rows, cols = inside.shape
        np.testing.assert_array_equal(shrunk.numpy()[:rows, :cols], inside)


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

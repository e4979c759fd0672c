"""repro.data.store: prepared images, regions and tissue masks on a small prepared synthetic set."""

from __future__ import annotations

import numpy as np
import pytest

from repro.data.store import load_tissue_mask, open_prepared, read_region
from repro.exceptions import SlideError


def test_read_region_matches_the_image_and_pads_white(prepared_set):
    params, manifest = prepared_set
    size = params.data.input_size  # 192
    prepared = params.prepared
    image_id = manifest["image_id"].iloc[2]
    full = open_prepared(prepared, image_id).numpy()
    region = read_region(prepared, image_id, 30, 50, 48, 40)
    np.testing.assert_array_equal(region, full[50:90, 30:78])
    edge = read_region(prepared, image_id, size - 16, -8, 32, 32)
    assert edge.shape == (32, 32, 3)
    np.testing.assert_array_equal(edge[8:, :16], full[:24, size - 16 :])
    assert (edge[:8] == 255).all() and (edge[:, 16:] == 255).all()
    with pytest.raises(SlideError, match="nothere"):
        read_region(prepared, "nothere", 0, 0, 8, 8)


def test_tissue_mask_and_downsample(prepared_set):
    params, manifest = prepared_set
    size = params.data.input_size  # 192
    image_id = manifest["image_id"].iloc[3]
    mask, downsample = load_tissue_mask(params.prepared, image_id, params.data.tissue_downsample)
    assert downsample == 8
    assert mask.dtype == bool and mask.shape == (size // 8, size // 8)
    fraction = manifest.set_index("image_id").loc[image_id, "tissue_fraction"]
    assert mask.mean() == pytest.approx(fraction)
    # Tissue pixels (saturated) lie inside the mask.
    image = open_prepared(params.prepared, image_id).numpy().astype(int)
    saturated = (image.max(2) - image.min(2)) > 60
    rows, cols = np.nonzero(saturated)
    assert mask[rows // 8, cols // 8].mean() > 0.97


def test_tissue_mask_downsample_comes_from_the_manifest(prepared_set):
    params, manifest = prepared_set
    image_id = manifest["image_id"].iloc[3]
    _, downsample = load_tissue_mask(params.prepared, image_id, default_downsample=2)
    assert downsample == 8  # the manifest's mask_downsample, not the default


def test_open_prepared_levels(prepared_set):
    params, manifest = prepared_set
    size = params.data.input_size  # 192
    image_id = manifest["image_id"].iloc[0]
    level0 = open_prepared(params.prepared, image_id)
    assert (level0.width, level0.height, level0.bands) == (size, size, 3)
    pages = level0.get("n-pages")
    with pytest.raises(SlideError, match=f"{image_id}.tiff: cannot open level {pages}"):
        open_prepared(params.prepared, image_id, level=pages)

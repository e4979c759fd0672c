"""repro.data.dataset and repro.data.stats on a small prepared synthetic set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from repro.config import build_params
from repro.data.dataset import (
    BiopsyDataset,
    augmentation_rng,
    load_tissue_mask,
    open_prepared,
    read_region,
)
from repro.data.prepare import prepare_dataset
from repro.data.slides import SlideError
from repro.data.stats import channel_stats

SIZE = 192


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    params = build_params(
        {
            "experiment": "t",
            "run": {"num_workers": 0, "seed": 2, "out_dir": str(root / "runs")},
            "data": {
                "source": "synthetic",
                "panda_dir": str(root / "raw"),
                "prepared_dir": str(root / "prepared"),
                "input_size": SIZE,
                "synthetic_images": 10,
                "synthetic_size": 384,
                "tissue_downsample": 8,
                "tissue_min_object_px": 1,
            },
        }
    )
    manifest = prepare_dataset(params, progress=False)
    assert (manifest["status"] == "ok").all()
    return params, manifest


def test_items_are_uint8_chw_with_float_labels(prepared):
    params, manifest = prepared
    dataset = BiopsyDataset(manifest, params, augment=False)
    assert len(dataset) == 10
    item = dataset[0]
    assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.uint8
    assert item["label"].dtype == torch.float32 and item["label"].ndim == 0
    assert item["label"].item() == manifest["label"].iloc[0]
    assert item["image_id"] == manifest["image_id"].iloc[0]
    full = open_prepared(params, item["image_id"]).numpy()
    np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), full)


def test_augmentation_is_seeded_by_seed_epoch_and_image(prepared):
    params, manifest = prepared
    dataset = BiopsyDataset(manifest, params, augment=True)
    again = BiopsyDataset(manifest, params, augment=True)
    plain = dataset[1]["image"]
    plain_unaugmented = BiopsyDataset(manifest, params, augment=False)[1]["image"]
    assert not torch.equal(plain, plain_unaugmented)
    assert torch.equal(plain, again[1]["image"])  # same (seed, epoch, image)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[1]["image"], plain)
    again.set_epoch(1)
    assert torch.equal(dataset[1]["image"], again[1]["image"])
    first = augmentation_rng(0, 0, "a").random()
    assert first == augmentation_rng(0, 0, "a").random()
    assert first != augmentation_rng(0, 0, "b").random() != augmentation_rng(0, 1, "a").random()


def test_read_region_matches_the_image_and_pads_white(prepared):
    params, manifest = prepared
    image_id = manifest["image_id"].iloc[2]
    full = open_prepared(params, image_id).numpy()
    np.testing.assert_array_equal(read_region(params, image_id, 30, 50, 48, 40), full[50:90, 30:78])
    edge = read_region(params, image_id, SIZE - 16, -8, 32, 32)
    assert edge.shape == (32, 32, 3)
    np.testing.assert_array_equal(edge[8:, :16], full[:24, SIZE - 16 :])
    assert (edge[:8] == 255).all() and (edge[:, 16:] == 255).all()
    with pytest.raises(SlideError, match="nothere"):
        read_region(params, "nothere", 0, 0, 8, 8)


def test_tissue_mask_and_downsample(prepared):
    params, manifest = prepared
    image_id = manifest["image_id"].iloc[3]
    mask, downsample = load_tissue_mask(params, image_id)
    assert downsample == 8
    assert mask.dtype == bool and mask.shape == (SIZE // 8, SIZE // 8)
    fraction = manifest.set_index("image_id").loc[image_id, "tissue_fraction"]
    assert mask.mean() == pytest.approx(fraction)
    # Tissue pixels (saturated) lie inside the mask, up to its 8 px fringe: the synthetic slides
    # have crisp edges (pixel-replicated level 0), so a few lie in border blocks left out.
    image = open_prepared(params, image_id).numpy().astype(int)
    saturated = (image.max(2) - image.min(2)) > 60
    rows, cols = np.nonzero(saturated)
    assert mask[rows // 8, cols // 8].mean() > 0.93
    grown = ndimage.binary_dilation(mask)
    assert grown[rows // 8, cols // 8].all()


def test_channel_stats_match_numpy(prepared):
    params, manifest = prepared
    mean, std = channel_stats(manifest, params)
    pixels = np.concatenate(
        [open_prepared(params, i).numpy().reshape(-1, 3) / 255.0 for i in manifest["image_id"]]
    )
    np.testing.assert_allclose(mean, pixels.mean(0), atol=1e-6)
    np.testing.assert_allclose(std, pixels.std(0), atol=1e-6)
    low_mean, low_std = channel_stats(manifest, params, max_size=96)  # a pyramid level
    np.testing.assert_allclose(low_mean, mean, atol=0.01)
    assert all(low < full for low, full in zip(low_std, std, strict=True))


def test_open_prepared_levels(prepared):
    params, manifest = prepared
    image_id = manifest["image_id"].iloc[0]
    level0 = open_prepared(params, image_id)
    assert (level0.width, level0.height, level0.bands) == (SIZE, SIZE, 3)
    pages = level0.get("n-pages")
    with pytest.raises(SlideError, match=f"{image_id}.tiff: cannot open level {pages}"):
        open_prepared(params, image_id, level=pages)

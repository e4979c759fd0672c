"""repro.data.datasets and repro.data.stats on a small prepared synthetic set."""

from __future__ import annotations

import numpy as np
import torch

from repro.data.augment import augmentation_rng
from repro.data.datasets import BiopsyDataset
from repro.data.stats import channel_stats
from repro.data.store import open_prepared


def _dataset(params, rows, augment):
    return BiopsyDataset(
        rows, params.prepared, params.augmentation, seed=params.run.seed, augment=augment
    )


def test_items_are_uint8_chw_with_float_labels(prepared_set):
    params, manifest = prepared_set
    size = params.data.input_size  # 192
    dataset = _dataset(params, manifest, augment=False)
    assert len(dataset) == 10
    item = dataset[0]
    assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.uint8
    assert item["label"].dtype == torch.float32 and item["label"].ndim == 0
    assert item["label"].item() == manifest["label"].iloc[0]
    assert item["image_id"] == manifest["image_id"].iloc[0]
    full = open_prepared(params.prepared, item["image_id"]).numpy()
    np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), full)


def test_augmentation_is_seeded_by_seed_epoch_and_image(prepared_set):
    params, manifest = prepared_set
    dataset = _dataset(params, manifest, augment=True)
    again = _dataset(params, manifest, augment=True)
    plain = dataset[1]["image"]
    plain_unaugmented = _dataset(params, manifest, augment=False)[1]["image"]
    assert not torch.equal(plain, plain_unaugmented)
    assert torch.equal(plain, again[1]["image"])  # same (seed, epoch, image)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[1]["image"], plain)
    again.set_epoch(1)
    assert torch.equal(dataset[1]["image"], again[1]["image"])
    first = augmentation_rng(0, 0, "a").random()
    assert first == augmentation_rng(0, 0, "a").random()
    assert first != augmentation_rng(0, 0, "b").random() != augmentation_rng(0, 1, "a").random()


def test_channel_stats_match_numpy(prepared_set):
    params, manifest = prepared_set
    mean, std = channel_stats(manifest, params.prepared)
    pixels = np.concatenate(
        [
            open_prepared(params.prepared, i).numpy().reshape(-1, 3) / 255.0
            for i in manifest["image_id"]
        ]
    )
    np.testing.assert_allclose(mean, pixels.mean(0), atol=1e-6)
    np.testing.assert_allclose(std, pixels.std(0), atol=1e-6)
    low_mean, low_std = channel_stats(manifest, params.prepared, max_size=96)  # a pyramid level
    np.testing.assert_allclose(low_mean, mean, atol=0.01)
    assert all(low < full for low, full in zip(low_std, std, strict=True))

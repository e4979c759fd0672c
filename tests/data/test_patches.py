"""repro.data.patches: the MIL patch grid (pure parts), the patch table and its cache, patch
reading and augmentation, and the patch loader."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from repro.data import patches
from repro.data.patches import (
    PatchDataset,
    PatchGrid,
    PatchLoader,
    augmentation_margin,
    patch_keys,
    patch_table,
)
from repro.data.splits import load_split
from repro.data.store import read_region


def _brute_force_fractions(mask, downsample, xs, ys, patch_size, width, height):
    """Tissue fraction per patch from the mask blown up to full resolution, pixel by pixel."""
    full = np.kron(mask.astype(np.float64), np.ones((downsample, downsample)))[:height, :width]
    return np.array([[full[y : y + patch_size, x : x + patch_size].mean() for x in xs] for y in ys])


@pytest.mark.parametrize(
    ("length", "patch", "stride", "expected"),
    [
        (10, 5, 5, [0, 5]),
        (11, 5, 5, [0, 5, 6]),  # one more patch aligned with the edge
        (5, 5, 3, [0]),
        (12, 4, 2, [0, 2, 4, 6, 8]),
        (9, 4, 8, [0, 5]),
    ],
)
def test_grid_positions(length, patch, stride, expected):
    positions = patches.grid_positions(length, patch, stride)
    assert positions.tolist() == expected
    assert positions[-1] + patch == length  # the last patch reaches the edge


def test_grid_positions_rejects_bad_sizes():
    with pytest.raises(ValueError, match="larger than the image"):
        patches.grid_positions(10, 11, 5)
    with pytest.raises(ValueError, match="must be > 0"):
        patches.grid_positions(10, 5, 0)


@pytest.mark.parametrize("downsample", [1, 4, 8])
@pytest.mark.parametrize(("patch", "stride"), [(16, 16), (24, 10), (20, 32)])
def test_tissue_fractions_match_brute_force(downsample, patch, stride):
    rng = np.random.default_rng(downsample * 100 + patch)
    width, height = 96, 80
    mask = rng.random((height // downsample, width // downsample)) > 0.6
    xs = patches.grid_positions(width, patch, stride)
    ys = patches.grid_positions(height, patch, stride)
    fast = patches.tissue_fractions(mask, downsample, xs, ys, patch)
    slow = _brute_force_fractions(mask, downsample, xs, ys, patch, width, height)
    np.testing.assert_allclose(fast, slow, atol=1e-12)


@pytest.mark.parametrize("stride", [8, 12, 16])  # stride <= patch size: no gaps between patches
def test_grid_covers_all_tissue_and_no_background(stride):
    rng = np.random.default_rng(stride)
    downsample, width, height, patch = 4, 100, 84, 16
    mask = np.zeros((height // downsample, width // downsample), dtype=bool)
    for _ in range(4):  # a few blobs and single specks of tissue
        y, x = rng.integers(0, mask.shape[0]), rng.integers(0, mask.shape[1])
        mask[y : y + rng.integers(1, 6), x : x + rng.integers(1, 6)] = True
    mask[-1, -1] = True  # tissue in the bottom-right corner, only an edge-aligned patch sees it
    grid = patches.grid_from_mask(mask, downsample, width, height, patch, stride, 0.0)
    full = np.kron(mask, np.ones((downsample, downsample), dtype=bool))[:height, :width]
    covered = np.zeros_like(full)
    for x, y, fraction in grid.itertuples(index=False):
        window = full[y : y + patch, x : x + patch]
        assert window.any(), f"patch at ({x}, {y}) is pure background"
        assert fraction == pytest.approx(window.mean(), abs=1e-6)
        covered[y : y + patch, x : x + patch] = True
    assert not (full & ~covered).any(), "tissue pixels without a patch"


def test_grid_minimum_tissue_fraction():
    mask = np.zeros((8, 8), dtype=bool)
    mask[:2, :2] = True  # 2x2 cells of 4 px: 64 tissue px, all in the first 16 px patch
    mask[7, 7] = True  # 16 px of tissue: 1/16 of the last patch
    grid = patches.grid_from_mask(mask, 4, 32, 32, 16, 16, 0.1)
    assert grid[["x", "y"]].values.tolist() == [[0, 0]]
    assert grid["tissue_fraction"].tolist() == [0.25]
    everything = patches.grid_from_mask(mask, 4, 32, 32, 16, 16, 0.0)
    assert everything[["x", "y"]].values.tolist() == [[0, 0], [16, 16]]


# ----------------------------------------------------------------------------- on files


def test_patch_table_matches_the_grid_and_is_cached(mil_params, monkeypatch):
    params = mil_params()
    rows = load_split(params, "tune")
    grid, files = PatchGrid.from_settings(params.data, params.mil), params.layout.mil
    table = patch_table(rows, params.prepared, grid, files)
    expected = pd.concat(
        [patches.patch_grid(params.prepared, i, grid).assign(image_id=i) for i in rows["image_id"]],
        ignore_index=True,
    )
    pd.testing.assert_frame_equal(
        table[["image_id", "x", "y"]], expected[["image_id", "x", "y"]], check_dtype=False
    )
    assert (table["tissue_fraction"] >= params.mil.min_tissue_fraction).all()
    labels = dict(zip(rows["image_id"], rows["label"], strict=True))
    assert (table["label"] == table["image_id"].map(labels)).all()
    assert files.patch_grid.exists() and files.patch_grid_key.exists()

    def recompute(*_):
        raise AssertionError("the cached grid was recomputed")

    monkeypatch.setattr(patches, "patch_grid", recompute)
    pd.testing.assert_frame_equal(patch_table(rows, params.prepared, grid, files), table)


def _train_patches(params):
    """The patch table of the training split."""
    grid = PatchGrid.from_settings(params.data, params.mil)
    return patch_table(load_split(params, "train"), params.prepared, grid, params.layout.mil)


def _patch_dataset(params, augment):
    augmentation = params.augmentation if augment else None
    return PatchDataset(params.prepared, params.mil.patch_size, augmentation, seed=params.run.seed)


def test_patch_dataset_reads_and_augments_per_patch(mil_params):
    params = mil_params()
    table = _train_patches(params).head(6)
    first = _patch_dataset(params, augment=True)
    second = _patch_dataset(params, augment=True)
    size = params.mil.patch_size
    for image_id, x, y, _ in patch_keys(table, None):
        item = first[(image_id, x, y, 3)]
        assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.uint8
        assert (item["image_id"], item["x"], item["y"]) == (image_id, x, y)
        # the same patch in the same epoch is the same augmented patch (inference = training phase)
        assert torch.equal(item["image"], second[(image_id, x, y, 3)]["image"])
        assert not torch.equal(item["image"], first[(image_id, x, y, 4)]["image"])
        # epoch None, or no augmentation: the patch as stored
        plain = read_region(params.prepared, image_id, x, y, size, size)
        assert np.array_equal(first[(image_id, x, y, None)]["image"].permute(1, 2, 0), plain)
        unaugmented = _patch_dataset(params, augment=False)[(image_id, x, y, 3)]["image"]
        assert np.array_equal(unaugmented.permute(1, 2, 0), plain)


def test_patch_loader_with_spawned_workers_gives_the_same_batches(mil_params):
    params = mil_params()
    table = _train_patches(params).head(10)
    keys = patch_keys(table, 1) + patch_keys(table, None)
    batches = {}
    for workers in (0, 2):
        with PatchLoader(_patch_dataset(params, augment=False), num_workers=workers) as loader:
            for _ in range(2):  # a second pass reuses the workers
                images = torch.cat([b["image"] for b in loader.batches(keys, 6)])
        batches[workers] = images
    assert torch.equal(batches[0], batches[2])


def test_augmentation_margin_covers_rotation_and_elastic_displacement():
    from repro.config import AugmentationSettings

    plain = AugmentationSettings(rotation_degrees=0, elastic_alpha=0, elastic_sigma=0)
    assert augmentation_margin(plain, 48) == 0
    rotated = AugmentationSettings(rotation_degrees=45, elastic_alpha=0, elastic_sigma=0)
    assert augmentation_margin(rotated, 48) == math.ceil(48 * (math.sqrt(2) - 1) / 2)
    elastic = AugmentationSettings(rotation_degrees=0, elastic_alpha=5.0, elastic_sigma=3.0)
    assert augmentation_margin(elastic, 48) == 5

"""Unit tests of the MIL baseline's pure parts: patch grid, top-1 selection, biopsy scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from repro import mil


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
    positions = mil.grid_positions(length, patch, stride)
    assert positions.tolist() == expected
    assert positions[-1] + patch == length  # the last patch reaches the edge


def test_grid_positions_rejects_bad_sizes():
    with pytest.raises(ValueError, match="larger than the image"):
        mil.grid_positions(10, 11, 5)
    with pytest.raises(ValueError, match="must be > 0"):
        mil.grid_positions(10, 5, 0)


@pytest.mark.parametrize("downsample", [1, 4, 8])
@pytest.mark.parametrize(("patch", "stride"), [(16, 16), (24, 10), (20, 32)])
def test_tissue_fractions_match_brute_force(downsample, patch, stride):
    rng = np.random.default_rng(downsample * 100 + patch)
    width, height = 96, 80
    mask = rng.random((height // downsample, width // downsample)) > 0.6
    xs = mil.grid_positions(width, patch, stride)
    ys = mil.grid_positions(height, patch, stride)
    fast = mil.tissue_fractions(mask, downsample, xs, ys, patch)
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
    grid = mil.grid_from_mask(mask, downsample, width, height, patch, stride, 0.0)
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
    grid = mil.grid_from_mask(mask, 4, 32, 32, 16, 16, 0.1)
    assert grid[["x", "y"]].values.tolist() == [[0, 0]]
    assert grid["tissue_fraction"].tolist() == [0.25]
    everything = mil.grid_from_mask(mask, 4, 32, 32, 16, 16, 0.0)
    assert everything[["x", "y"]].values.tolist() == [[0, 0], [16, 16]]


def _random_patches(seed: int, ties: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for image in range(12):
        for patch in range(rng.integers(1, 30)):
            score = float(rng.integers(0, 4)) / 4 if ties else float(rng.random())
            rows.append((f"img{image:02d}", patch * 8, image, score))
    frame = pd.DataFrame(rows, columns=["image_id", "x", "y", "score"])
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # interleave biopsies


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True])
def test_select_top1_matches_brute_force(seed, ties):
    patches = _random_patches(seed, ties)
    top = mil.select_top1(patches)
    assert top["image_id"].is_unique
    assert set(top["image_id"]) == set(patches["image_id"])
    for row in top.itertuples(index=False):
        best, best_score = None, -np.inf
        for candidate in patches.itertuples(index=False):  # first maximum in table order
            if candidate.image_id == row.image_id and candidate.score > best_score:
                best, best_score = candidate, candidate.score
        assert (row.x, row.y, row.score) == (best.x, best.y, best.score)


def test_select_top1_rejects_nan_and_missing_columns():
    patches = _random_patches(0)
    patches.loc[3, "score"] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        mil.select_top1(patches)
    with pytest.raises(ValueError, match="missing columns"):
        mil.select_top1(patches.drop(columns="score"))


@pytest.mark.parametrize("seed", range(3))
def test_biopsy_score_is_max_patch_score(seed):
    patches = _random_patches(seed)
    scores = mil.biopsy_scores(patches).set_index("image_id")["score"]
    for image_id, group in patches.groupby("image_id"):
        assert scores[image_id] == max(group["score"])
    assert len(scores) == patches["image_id"].nunique()


def test_patch_score_map_is_the_max_of_the_covering_patches():
    from repro.config import Params

    params = Params()
    params.data.input_size, params.mil.patch_size = 40, 16
    patches = pd.DataFrame({"x": [0, 8, 24], "y": [0, 8, 24], "score": [0.2, 0.7, 0.4]})
    heat = mil.patch_score_map(patches, params)
    expected = np.full((40, 40), np.nan)
    for x, y, score in patches.itertuples(index=False):
        window = expected[y : y + 16, x : x + 16]
        window[np.isnan(window) | (window < score)] = score
    np.testing.assert_array_equal(heat, expected)
    coarse = mil.patch_score_map(patches, params, downsample=8)
    assert coarse.shape == (5, 5)
    assert coarse[1, 1] == 0.7 and coarse[0, 0] == 0.2 and np.isnan(coarse[0, 4])

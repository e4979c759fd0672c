"""repro.methods.mil's pure parts: top-1 selection and biopsy scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from repro.methods import mil


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

"""repro.evaluation.localisation: pixel AUC and pointing game on hand-made maps and masks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.exceptions import UndefinedMetricWarning

from repro.evaluation.localisation import (
    localisation_row,
    localisation_summary,
    pixel_auc,
    pointing_hit,
)


def _mask() -> np.ndarray:
    mask = np.zeros((4, 5), bool)
    mask[1:3, 1:3] = True  # 4 tumour pixels of 20
    return mask


def test_pixel_auc_by_hand():
    mask = _mask()
    perfect = mask.astype(float)
    assert pixel_auc(perfect, mask) == 1.0
    assert pixel_auc(1 - perfect, mask) == 0.0
    heatmap = perfect.copy()
    heatmap[0, 4] = 2.0  # one other pixel above every tumour pixel: 4 of 4 x 16 pairs wrong
    assert pixel_auc(heatmap, mask) == pytest.approx(1 - 4 / 64)
    assert pixel_auc(np.zeros((4, 5)), mask) == 0.5  # a constant map is chance
    assert pixel_auc(np.where(mask, 0.1, np.nan), mask) == 1.0  # NaN: the lowest score


def test_pixel_auc_over_valid_pixels_only():
    mask = _mask()
    heatmap = np.where(mask, 0.5, 0.0)
    heatmap[:, 4] = 1.0  # high scores outside the valid pixels only
    valid = np.ones((4, 5), bool)
    valid[:, 4] = False
    assert pixel_auc(heatmap, mask) < 1.0
    assert pixel_auc(heatmap, mask, valid) == 1.0


def test_pointing_game():
    mask = _mask()
    heatmap = np.zeros((4, 5))
    heatmap[2, 2] = 1.0
    assert pointing_hit(heatmap, mask)
    heatmap[0, 0] = 3.0
    assert not pointing_hit(heatmap, mask)
    valid = np.ones((4, 5), bool)
    valid[0, 0] = False
    assert pointing_hit(heatmap, mask, valid)
    plateau = np.where(mask, 1.0, np.nan)
    plateau[0, 0] = 1.0  # 4 of the 5 maximal pixels in tumour
    assert pointing_hit(plateau, mask)
    assert not pointing_hit(np.full((4, 5), np.nan), mask)


def test_input_checks_name_the_problem():
    mask = _mask()
    with pytest.raises(ValueError, match="same shape"):
        pixel_auc(np.zeros((4, 4)), mask)
    with pytest.raises(ValueError, match="2-D"):
        pixel_auc(np.zeros(20), mask.ravel())
    with pytest.raises(ValueError, match="boolean or 0/1"):
        pixel_auc(np.zeros((4, 5)), mask * 3)
    with pytest.raises(ValueError, match="numeric"):
        pointing_hit(np.full((4, 5), "a"), mask)
    with pytest.raises(ValueError, match="inf"):
        pixel_auc(np.full((4, 5), np.inf), mask)
    with pytest.raises(ValueError, match="valid must be boolean"):
        pixel_auc(np.zeros((4, 5)), mask, np.ones((4, 5)))
    with pytest.warns(UndefinedMetricWarning, match="one class"):
        assert np.isnan(pixel_auc(np.zeros((4, 5)), np.zeros((4, 5), bool)))


def test_rows_leave_background_out_and_summarise_per_method():
    labels = np.zeros((4, 5), np.uint8)
    labels[:, :3] = 1  # tissue: columns 0-2; background: 3-4
    labels[1:3, 1:3] = 4  # tumour
    heatmap = np.where(labels >= 3, 0.5, 0.0)
    heatmap[:, 4] = 1.0  # high on the background only: not counted
    row = localisation_row("x", "streaming", heatmap, labels)
    assert row == {
        "image_id": "x",
        "method": "streaming",
        "tumour_fraction": pytest.approx(4 / 12),
        "pixel_auc": 1.0,
        "pointing_hit": True,
    }
    assert localisation_row("y", "mil", heatmap, np.minimum(labels, 2)) is None  # no tumour
    every = np.full((4, 5), 3, np.uint8)
    assert np.isnan(localisation_row("z", "mil", heatmap, every)["pixel_auc"])

    other = {**row, "image_id": "y", "pixel_auc": 0.5, "pointing_hit": False}
    rows = pd.DataFrame([row, other, {**row, "method": "mil", "pixel_auc": 0.7}])
    summary = localisation_summary(rows)
    assert summary["method"].tolist() == ["streaming (SmoothGrad)", "mil (patch probability)"]
    assert summary["biopsies"].tolist() == [2, 1]
    assert summary["pixel_auc_mean"].tolist() == pytest.approx([0.75, 0.7])
    assert summary["pointing_game"].tolist() == pytest.approx([0.5, 1.0])

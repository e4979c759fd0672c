"""repro.localisation: pixel AUC and pointing game on hand-made maps and masks."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.exceptions import UndefinedMetricWarning

from repro.localisation import pixel_auc, pointing_hit, resize_labels


def _mask() -> np.ndarray:
    mask = np.zeros((4, 5), bool)
    mask[1:3, 1:3] = True  # 4 tumour pixels of 20
    return mask


def test_pixel_auc_by_hand():
    mask = _mask()
    perfect = mask.astype(float)
    assert pixel_auc(perfect, mask) == 1.0
    assert pixel_auc(1 - perfect, mask) == 0.0
    # one non-tumour pixel above every tumour pixel: 1 of 4 x 16 pairs wrong
    heatmap = perfect.copy()
    heatmap[0, 4] = 2.0
    assert pixel_auc(heatmap, mask) == pytest.approx(1 - 4 / 64)
    # a constant map is chance; NaN counts as the lowest score
    assert pixel_auc(np.zeros((4, 5)), mask) == 0.5
    nan_outside = np.where(mask, 0.1, np.nan)
    assert pixel_auc(nan_outside, mask) == 1.0


def test_pixel_auc_over_valid_pixels_only():
    mask = _mask()
    heatmap = np.zeros((4, 5))
    heatmap[mask] = 0.5
    heatmap[:, 4] = 1.0  # high scores on "background" only
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
    plateau[0, 0] = 1.0  # 4 of 5 maximal pixels in tumour
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
    with pytest.warns(UndefinedMetricWarning, match="one class"):
        assert np.isnan(pixel_auc(np.zeros((4, 5)), np.zeros((4, 5), bool)))


def test_resize_labels_nearest():
    labels = np.array([[0, 1], [3, 5]], np.uint8)
    big = resize_labels(labels, (4, 4))
    assert big.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [3, 3, 5, 5], [3, 3, 5, 5]]
    assert resize_labels(big, (2, 2)).tolist() == labels.tolist()

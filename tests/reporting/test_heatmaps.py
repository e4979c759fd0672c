"""repro.reporting.heatmaps: the display maps of Fig. 4-6 (SmoothGrad map, MIL patch
probabilities), the choice of examples, and the examples of a run."""

import numpy as np
import pandas as pd
import pytest

from repro.evaluation.tables import load_patch_scores, load_run_predictions
from repro.reporting.heatmaps import (
    choose_examples,
    heatmap_examples,
    patch_probability_map,
    sensitivity_heatmap,
)


def test_sensitivity_heatmap_range():
    rng = np.random.default_rng(0)
    heat = sensitivity_heatmap(rng.exponential(size=(64, 48)).astype(np.float32))
    assert heat.shape == (64, 48) and heat.min() >= 0 and heat.max() == 1
    assert (sensitivity_heatmap(np.zeros((8, 8))) == 0).all()


def test_patch_probability_map_hand_checked():
    patches = pd.DataFrame({"x": [0, 50, 50], "y": [0, 0, 25], "score": [0.2, 0.9, 0.4]})
    heat = patch_probability_map(patches, image_size=(100, 200), patch_size=50, size=20)
    assert heat.shape == (10, 20)
    assert np.allclose(heat[0:5, 0:5], 0.2)
    assert np.allclose(heat[0:5, 5:10], 0.9)  # overlap: the highest probability
    assert np.allclose(heat[5:8, 5:10], 0.4)
    assert np.isnan(heat[:, 10:]).all() and np.isnan(heat[8:, :]).all()


def test_patch_probability_map_is_the_max_of_the_covering_patches():
    patches = pd.DataFrame({"x": [0, 8, 24], "y": [0, 8, 24], "score": [0.2, 0.7, 0.4]})
    heat = patch_probability_map(patches, image_size=(40, 40), patch_size=16, size=40)
    expected = np.full((40, 40), np.nan, dtype=np.float32)
    for x, y, score in patches.itertuples(index=False):
        window = expected[y : y + 16, x : x + 16]
        window[np.isnan(window) | (window < score)] = score
    np.testing.assert_array_equal(heat, expected)
    coarse = patch_probability_map(patches, image_size=(40, 40), patch_size=16, size=5)  # 1/8
    assert coarse.shape == (5, 5)
    assert coarse[1, 1] == np.float32(0.7) and coarse[0, 0] == np.float32(0.2)
    assert np.isnan(coarse[0, 4])
    with pytest.raises(ValueError, match=r"missing columns \['score'\]"):
        patch_probability_map(patches.drop(columns="score"), (40, 40), 16, 40)


def test_choose_examples_prefers_correct_cancers():
    streaming = pd.DataFrame(
        {"image_id": list("abcde"), "label": [1, 1, 0, 0, 1], "score": [0.9, 0.3, 0.2, 0.6, 0.8]}
    )
    mil = streaming.assign(score=[0.8, 0.7, 0.1, 0.75, 0.95])
    # streaming: threshold 0.8 (a, e right; b FN; d right); MIL: threshold 0.7 (d FP)
    chosen = choose_examples({"streaming": streaming, "mil": mil}, 3)
    assert chosen == ["e", "a", "c"]


def test_heatmap_examples_maps_align_with_thumbnail(evaluated_run):
    (example,) = heatmap_examples(
        evaluated_run,
        ["b"],
        load_run_predictions(evaluated_run),
        load_patch_scores(evaluated_run.run_dir),
    )
    assert example.thumbnail.shape == (32, 32, 3) and example.thumbnail.dtype == np.uint8
    assert example.saliency.shape == example.patches.shape == (32, 32)
    assert np.isnan(example.patches[:8]).all()  # no patch in the top 16 image px
    assert example.patches[8:24, 0:8] == pytest.approx(0.1)
    assert example.caption == "label 1, streaming 0.30, MIL 0.70"

"""The run the reporting tests draw from: what notebooks 01-05 leave behind."""

import numpy as np
import pandas as pd
import pytest

import repro.evaluation.saliency as saliency
from repro.config import Params
from repro.io.atomic import write_text_atomic


@pytest.fixture
def evaluated_run(tmp_path):
    """A run with saved predictions, MIL patch scores, cached SmoothGrad maps and prepared
    images, as notebooks 01-05 leave it (no model needed: every map is cached)."""
    import pyvips

    params = Params(experiment="fig")
    params.run.out_dir = str(tmp_path / "runs")
    params.data.prepared_dir = str(tmp_path / "prepared")
    params.data.input_size = 64
    params.mil.patch_size = 16
    params.evaluation.heatmap_size = 32
    params.evaluation.heatmap_examples = 2
    params.evaluation.figures_dir = str(tmp_path / "figures")
    params.evaluation.labels_dir = str(tmp_path / "labels")
    ids = ["a", "b", "c", "d"]
    streaming = pd.DataFrame(
        {"image_id": ids, "label": [1, 1, 0, 0], "score": [0.9, 0.3, 0.2, 0.6]}
    )
    mil = streaming.assign(score=[0.8, 0.7, 0.1, 0.85])  # b FN of streaming, d FP of MIL
    layout = params.layout
    write_text_atomic(layout.streaming.predictions("test"), streaming.to_csv(index=False))
    write_text_atomic(layout.mil.predictions("test"), mil.to_csv(index=False))
    patches = pd.DataFrame(
        [(i, x, y, 0.1 + 0.05 * x / 16) for i in ids for x in (0, 16, 32) for y in (16, 32)],
        columns=["image_id", "x", "y", "score"],
    )
    write_text_atomic(layout.mil.patch_scores("test"), patches.to_csv(index=False))
    params.prepared.images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for image_id in ids:
        pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        pyvips.Image.new_from_array(pixels, interpretation="srgb").tiffsave(
            str(params.prepared.image(image_id)), tile=True, pyramid=True
        )
        reduced = rng.random((32, 32)).astype(np.float32)
        path = layout.streaming.saliency / f"{image_id}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, heatmap=reduced, **saliency._cache_key(params))
    return params

"""The synthetic local and context tasks have no shortcut: the label cannot be read from colour
or a thumbnail.

On a generated set of 100 slides per task (512 px slides, so the file stays cheap), 5-fold
logistic regressions on per-slide features of the raw slides, read as the pipeline reads them
(the slide at 0.96 um/px, tissue by the package's saturation threshold), must stay near chance
(AUC <= 0.65):

(a) colour statistics over the tissue: RGB mean and std, tissue fraction;
(b) per-channel 16-bin colour histograms over the tissue;
(c) a 16 x 8 thumbnail of the whole slide.

The ``plain`` task (tumour is the only dark tissue) scores 1.0 / 1.0 / 0.83 on (a) / (b) / (c)
here; it is left out of the test (it has the shortcut by design).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pyvips
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from repro.data.prepare import parse_gleason
from repro.data.slides import open_slide, to_numpy
from repro.data.synthetic import generate_synthetic_panda
from repro.data.tissue import tissue_mask
from repro.layout import PandaLayout

N_SLIDES = 100
SIZE = 512  # level-0 width: 256 x 128 px at 0.96 um/px
SEED = 13
MAX_AUC = 0.65
THUMBNAIL = (16, 8)


def slide_features(path: Path) -> dict[str, np.ndarray]:
    """The three feature sets (a), (b), (c) of one raw slide."""
    image = to_numpy(open_slide(path).read_at_mpp(0.96), path)
    tissue = tissue_mask(image, 0.07, 1)
    pixels = image[tissue].astype(np.float64) / 255
    stats = np.concatenate([pixels.mean(0), pixels.std(0), [tissue.mean()]])
    histograms = np.concatenate(
        [np.histogram(pixels[:, c], bins=16, range=(0, 1))[0] / len(pixels) for c in range(3)]
    )
    thumb = pyvips.Image.thumbnail(str(path), THUMBNAIL[0], height=THUMBNAIL[1], size="force")
    return {"colour_stats": stats, "histograms": histograms, "thumbnail": thumb.numpy().ravel()}


def shortcut_aucs(raw: PandaLayout) -> dict[str, float]:
    """Cross-validated AUC (5 stratified folds) of a logistic regression per feature set."""
    table = pd.read_csv(raw.labels, dtype={"image_id": str})
    labels = np.array([parse_gleason(score)[0] for score in table["gleason_score"]])
    features = [slide_features(raw.image(image_id)) for image_id in table["image_id"]]
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    aucs = {}
    for name in features[0]:
        x = np.stack([f[name] for f in features])
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
        scores = cross_val_predict(model, x, labels, cv=folds, method="predict_proba")[:, 1]
        aucs[name] = float(roc_auc_score(labels, scores))
    return aucs


@pytest.fixture(scope="module", params=["local", "context"])
def measured(request, tmp_path_factory) -> tuple[str, dict[str, float]]:
    root = tmp_path_factory.mktemp(f"shortcuts-{request.param}")
    generate_synthetic_panda(root, N_SLIDES, SIZE, SEED, request.param)
    aucs = shortcut_aucs(PandaLayout(root))
    print(f"shortcut AUCs, {request.param} task:", {k: round(v, 3) for k, v in aucs.items()})
    return request.param, aucs


@pytest.mark.parametrize("features", ["colour_stats", "histograms", "thumbnail"])
def test_no_shortcut(measured, features):
    task, aucs = measured
    assert aucs[features] <= MAX_AUC, (task, aucs)

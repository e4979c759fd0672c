"""Scoring the test set (notebook 05): the only code that runs the final models on it.

Streaming: whole images, streamed inference (:func:`repro.methods.streaming.predict`). MIL: every
patch, the biopsy's highest patch probability (:func:`repro.methods.mil.predict`), whose patch
probabilities are saved too (Fig. 4-6 and the heatmap analysis read them).
"""

from __future__ import annotations

import pandas as pd

from repro.config import Params
from repro.data.splits import load_split
from repro.evaluation.tables import PATCH_COLUMNS, PREDICTION_COLUMNS, load_predictions
from repro.io.atomic import write_text_atomic
from repro.layout import METHODS
from repro.methods import mil, streaming
from repro.training.runtime import set_torch_threads

_PREDICT = {"streaming": streaming.predict, "mil": mil.predict}


def predict_test_set(params: Params, methods=METHODS) -> dict[str, pd.DataFrame]:
    """Run the final model(s) on the test set and save the predictions.

    Returns:
        method -> DataFrame(image_id, label, score), as written to the method's
        ``predictions_test.csv`` (MIL also writes ``patch_scores_test.csv``).
    """
    set_torch_threads(params.run.torch_threads)
    rows = load_split(params, "test")
    results = {}
    for method in methods:
        if method not in _PREDICT:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        files = params.layout.method(method)
        predictions = _PREDICT[method](params, rows)
        if predictions.patches is not None:
            patches = predictions.patches[PATCH_COLUMNS]
            write_text_atomic(files.patch_scores("test"), patches.to_csv(index=False))
        biopsies = predictions.biopsies[PREDICTION_COLUMNS].sort_values("image_id", kind="stable")
        write_text_atomic(files.predictions("test"), biopsies.to_csv(index=False))
        results[method] = load_predictions(files.predictions("test"))
    return results

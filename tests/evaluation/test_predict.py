"""repro.evaluation.predict: the test set scored by both methods and saved where Table II and
the heatmaps read it (the methods' own predict functions are tested in tests/methods/)."""

import pandas as pd

from repro.config import Params
from repro.evaluation.tables import load_patch_scores, load_predictions
from repro.methods.base import Predictions


def test_predict_test_set_saves_both_methods(tmp_path, monkeypatch):
    from repro.evaluation import predict as module
    from repro.evaluation.predict import predict_test_set

    params = Params(experiment="pred")
    params.run.out_dir = str(tmp_path)
    rows = pd.DataFrame({"image_id": ["b", "a"], "label": [1, 0]})
    monkeypatch.setattr(module, "load_split", lambda p, split: rows)
    patches = pd.DataFrame({"image_id": ["a", "b"], "x": [0, 0], "y": [0, 16], "score": [0.2, 0.9]})
    methods = {
        "streaming": lambda p, r: Predictions(r.assign(score=[0.9, 0.2], extra=1)),
        "mil": lambda p, r: Predictions(r.assign(score=[0.8, 0.3]), patches),
    }
    for method, predict in methods.items():
        monkeypatch.setitem(module._PREDICT, method, predict)
    result = predict_test_set(params)
    assert list(result) == ["streaming", "mil"]
    streaming = load_predictions(params.layout.streaming.predictions("test"))
    assert streaming.to_dict("list") == {
        "image_id": ["a", "b"],
        "label": [0, 1],
        "score": [0.2, 0.9],
    }
    pd.testing.assert_frame_equal(load_patch_scores(params.run_dir), patches)
    assert not params.layout.streaming.patch_scores("test").exists()  # MIL only
    pd.testing.assert_frame_equal(
        result["mil"], load_predictions(params.layout.mil.predictions("test"))
    )

"""The streaming trainer learns the synthetic set (stage 1 + stage 2), end to end on files.

A small configuration of the real pipeline: synthetic slides -> prepared TIFFs -> splits ->
:func:`repro.methods.streaming.train_streaming` (ResNet-18 from random init, batch-norm
statistics from training images, streamed in 2 x 2 tiles, both stages, weight averaging) ->
tuning AUC. The signal the network learns (``data.synthetic_task: plain``, stated here so that the
test keeps it when the default changes): cancer biopsies hold one or two small regions of dense,
dark blue-purple tumour (a few percent of the tissue) that negatives never have; with global max
pooling one confident location is enough.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from repro.data.prepare import prepare_dataset
from repro.data.splits import make_splits
from repro.data.synthetic import generate_synthetic_panda
from repro.exceptions import CheckpointError
from repro.methods.streaming import load_final_model, predict, streaming_files, train_streaming
from repro.reporting.curves import save_loss_curves
from repro.training.loop import tuning_metrics

pytestmark = pytest.mark.slow


LEARNING = {
    "experiment": "learn",
    "run": {"torch_threads": 1},
    "data": {"synthetic_images": 30, "synthetic_task": "plain"},  # does training work at all?
    "splits": {"tune_fraction": 0.35, "test_fraction": 0.1},
    "streaming": {"arch": "resnet18", "weights": None, "tile_size": 352},
    "train": {
        "optimizer": "adam",
        "lr": 1e-4,
        "stage2_lr": 3e-5,
        "batch_size": 4,
        "epochs": 2,
        "stage2_epochs": 1,
        "window": 1,
        "epoch_images": 16,
        "calibrate_batchnorm_images": 8,
    },
}
"""30 synthetic biopsies prepared at 256 px, ResNet-18 from random init in 352 px tiles."""


def test_stage_one_and_two_reach_a_high_tuning_auc(tmp_path, make_params):
    params = make_params(tmp_path, **LEARNING)  # run.torch_threads=1; restored below
    generate_synthetic_panda(params.data.panda_dir, 30, 512, params.run.seed, "plain")
    make_splits(prepare_dataset(params, progress=False), params)

    threads = torch.get_num_threads()
    try:
        result = train_streaming(params, progress=False)
    finally:
        torch.set_num_threads(threads)

    out = streaming_files(params)
    metrics = pd.read_csv(out.metrics)
    assert list(metrics["stage"]) == [1, 1, 2]
    predictions = pd.read_csv(out.predictions("tune"))
    assert predictions["label"].nunique() == 2 and len(predictions) >= 8
    final = tuning_metrics(predictions)
    print(f"final tuning metrics: {final}\n{metrics.round(4).to_string()}")
    assert final["tune_auc"] >= 0.9, (final, metrics.to_dict("records"))
    assert json.loads(out.batchnorm_calibration.read_text())["calibrated"]
    assert result.selection["final"]["stage"] == 2
    for path in (out.final, out.params, out.selection, out.init):
        assert path.exists(), path
    save_loss_curves(out)  # the notebook draws the curves from the run's files
    assert out.loss_curves.exists()

    # load_final_model + predict reproduce the tuning predictions written by the trainer
    model = load_final_model(params, device="cpu")
    again = predict(params, predictions[["image_id", "label"]], model=model, progress=False)
    assert again.patches is None
    pd.testing.assert_frame_equal(again.biopsies, predictions, check_dtype=False, atol=1e-6)

    # the same command again finds the finished run: nothing is trained, the outputs are the same
    before = out.metrics.read_text()
    threads = torch.get_num_threads()
    try:
        train_streaming(params, progress=False)
        with pytest.raises(CheckpointError, match="delete"):  # other params, same run dir
            head_pool = {"streaming": {**LEARNING["streaming"], "head_pool": "avg"}}
            other = make_params(tmp_path, **{**LEARNING, **head_pool})
            train_streaming(other, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert out.metrics.read_text() == before
    pd.testing.assert_frame_equal(pd.read_csv(out.predictions("tune")), predictions)

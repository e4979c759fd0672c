"""The streaming trainer learns the synthetic set (stage 1 + stage 2), end to end on files.

A small configuration of the real pipeline: synthetic slides -> prepared TIFFs -> splits ->
:func:`repro.train.train_streaming` (ResNet-18 from random init, batch-norm statistics from
training images, streamed in 2 x 2 tiles, both stages, weight averaging) -> tuning AUC. The signal
the network learns (``data.synthetic_task: plain``, the synthetic set without mimics): cancer
biopsies hold one or two small regions of dense, dark blue-purple tumour (a few percent of the
tissue) that negatives never have; with global max pooling one confident location is enough.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from repro.checkpoints import CheckpointError
from repro.config import build_params
from repro.data.prepare import prepare_dataset
from repro.data.splits import make_splits
from repro.data.synthetic import generate_synthetic_panda
from repro.train import load_final_model, predict, streaming_dir, train_streaming, tuning_metrics

pytestmark = pytest.mark.slow


def _params(root, **streaming):
    return build_params(
        {
            "experiment": "learn",
            "run": {
                "out_dir": str(root / "runs"),
                "num_workers": 0,
                "seed": 0,
                "torch_threads": 1,
            },
            "data": {
                "source": "synthetic",
                "panda_dir": str(root / "raw"),
                "prepared_dir": str(root / "prepared"),
                "input_size": 256,
                "synthetic_images": 30,
                "synthetic_size": 512,
                "synthetic_task": "plain",  # tumour is the only dark tissue: does training work?
                "tissue_downsample": 8,
                "tissue_min_object_px": 1,
            },
            "splits": {"tune_fraction": 0.35, "test_fraction": 0.1},
            "streaming": {"arch": "resnet18", "weights": None, "tile_size": 352, **streaming},
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
    )


def test_stage_one_and_two_reach_a_high_tuning_auc(tmp_path):
    params = _params(tmp_path)  # run.torch_threads=1; restored below
    generate_synthetic_panda(params.data.panda_dir, 30, 512, seed=params.run.seed, task="plain")
    make_splits(prepare_dataset(params, progress=False), params)

    threads = torch.get_num_threads()
    try:
        result = train_streaming(params, progress=False)
    finally:
        torch.set_num_threads(threads)

    out = streaming_dir(params)
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["stage"]) == [1, 1, 2]
    predictions = pd.read_csv(out / "predictions_tune.csv")
    assert predictions["label"].nunique() == 2 and len(predictions) >= 8
    final = tuning_metrics(predictions)
    print(f"final tuning metrics: {final}\n{metrics.round(4).to_string()}")
    assert final["tune_auc"] >= 0.9, (final, metrics.to_dict("records"))
    assert json.loads((out / "batchnorm_calibration.json").read_text())["calibrated"]
    assert result.selection["final"]["stage"] == 2
    for name in ("final.pt", "params.yaml", "selection.json", "loss_curves.png", "init.pt"):
        assert (out / name).exists(), name

    # load_final_model + predict reproduce the tuning predictions written by the trainer
    model = load_final_model(params, device="cpu")
    again = predict(model, predictions[["image_id", "label"]], params, progress=False)
    pd.testing.assert_frame_equal(again, predictions, check_dtype=False, atol=1e-6)

    # the same command again finds the finished run: nothing is trained, the outputs are the same
    before = (out / "metrics.csv").read_text()
    threads = torch.get_num_threads()
    try:
        train_streaming(params, progress=False)
        with pytest.raises(CheckpointError, match="delete"):  # other params, same run dir
            train_streaming(_params(tmp_path, head_pool="avg"), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert (out / "metrics.csv").read_text() == before
    pd.testing.assert_frame_equal(pd.read_csv(out / "predictions_tune.csv"), predictions)

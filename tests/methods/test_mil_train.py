"""The MIL baseline on files: the two phases of an epoch, resume, predictions, learning.

A small synthetic set is prepared once per session (``mil_dataset`` in ``tests/conftest.py``: the
real pipeline, synthetic slides -> prepared TIFFs -> splits); every test makes its own run
directory.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from repro.data.patches import PatchDataset, PatchLoader, patch_keys
from repro.data.splits import load_split
from repro.exceptions import CheckpointError
from repro.io.checkpoints import load_checkpoint
from repro.methods import mil
from repro.reporting.curves import save_loss_curves
from repro.training import loop
from repro.training.runtime import Runtime

pytestmark = pytest.mark.usefixtures("one_thread")  # deterministic and fair on a shared CPU


# ----------------------------------------------------------------------------- training


def test_epoch_trains_on_the_top1_patch_of_every_biopsy(mil_params):
    """The inference phase's top-1 patch per biopsy (brute force over the same model's patch
    logits) is what the training phase trains on, augmented exactly as it was scored."""
    import copy

    from repro.data.sampling import BalancedSampler
    from repro.training.schedule import EpochRun

    params = mil_params(splits={"subset_size": 6})
    rows = load_split(params, "train")
    train = mil.experiment_patches(params, rows)
    tune = mil.experiment_patches(params, load_split(params, "tune"))
    sampler = BalancedSampler(rows["label"].tolist(), seed=0)
    runtime = Runtime(progress=False)
    dataset = PatchDataset(
        params.prepared, params.mil.patch_size, params.augmentation, seed=params.run.seed
    )
    with PatchLoader(dataset) as loader:
        data = mil.TopOnePatches(
            train, tune, sampler, loader,
            batch_size=params.mil.batch_size,
            inference_batch_size=params.mil.inference_batch_size,
            runtime=runtime,
        )  # fmt: skip
        trainer = loop.Trainer(
            mil.build_model(params), data, batch_size=params.mil.batch_size,
            momentum=params.mil.momentum, optimizer=params.mil.optimizer, runtime=runtime,
        )  # fmt: skip
        trainer.begin_stage(1, params.mil.lr)
        before = copy.deepcopy(trainer.model)
        trained = []
        items = data.items

        def recording(indices, epoch):
            for item in items(indices, epoch):
                trained.append(item)
                yield item

        data.items = recording
        trainer.train_epoch(EpochRun(1, 1, 5, params.mil.lr))

        logits = mil.score_patches(
            before, loader, patch_keys(train, 5),
            batch_size=params.mil.inference_batch_size, runtime=runtime,
        )  # fmt: skip
        expected = {}
        for image_id, group in train.assign(logit=logits).groupby("image_id"):
            best = group.iloc[int(np.argmax(group["logit"].to_numpy()))]
            expected[image_id] = (int(best["x"]), int(best["y"]))
        top = data.last_top1
        assert top["image_id"].tolist() == rows["image_id"].tolist()  # the sampler's order
        assert {row.image_id: (row.x, row.y) for row in top.itertuples()} == expected
        assert len(trained) == len(sampler)
        labels = dict(zip(rows["image_id"], rows["label"], strict=True))
        for item in trained:
            x, y = expected[item["image_id"]]
            patch = loader.dataset[(item["image_id"], x, y, 5)]
            assert torch.equal(item["image"], patch["image"])
            assert item["label"] == labels[item["image_id"]]


def _comparable(metrics):
    timing = [c for c in metrics.columns if "second" in c or "per_hour" in c]
    return metrics.drop(columns=timing)


def test_run_writes_outputs_and_resume_equals_an_uninterrupted_run(
    mil_params, tmp_path, monkeypatch
):
    small = {"splits": {"subset_size": 8}}  # 8 training biopsies: cheap epochs
    reference = mil_params(tmp_path / "reference", **small)
    result = mil.train_mil(reference, progress=False)

    out = mil.mil_files(reference)
    for path in (
        out.params, out.patch_grid, out.init, out.batchnorm_calibration, out.metrics,
        out.selection, out.final, out.predictions("tune"),
    ):  # fmt: skip
        assert path.exists(), path
    save_loss_curves(out)  # the notebook draws the curves from the run's files
    assert out.loss_curves.exists()
    metrics = pd.read_csv(out.metrics)
    assert list(metrics["stage"]) == [1, 1, 2, 2]
    assert list(metrics["lr"]) == [1e-4, 1e-4, 3e-5, 3e-5]
    assert (
        metrics["inference_patches"]
        == len(mil.experiment_patches(reference, load_split(reference, "train")))
    ).all()
    assert (metrics["train_images"] == 8).all()  # 4 + 4 biopsies: balanced already
    assert json.loads(out.batchnorm_calibration.read_text())["calibrated"]
    assert result.selection["final"]["stage"] == 2
    # training predicts the tuning set (the test set is scored by notebook 05 only), and caches
    # the patch probabilities of the final weights
    cached = list(out.patch_probability_cache.glob("*.csv"))
    assert len(cached) == len(load_split(reference, "tune"))

    # the same run, killed twice (before stage 1 epoch 2 and before stage 2 epoch 2), restarted
    resumed = mil_params(tmp_path / "resumed", **small)
    original = loop.Trainer.train_epoch
    kills = {2, 4}

    def crash(self, run):
        if run.global_epoch in kills:
            kills.discard(run.global_epoch)
            raise KeyboardInterrupt(f"killed in epoch {run.global_epoch}")
        return original(self, run)

    monkeypatch.setattr(loop.Trainer, "train_epoch", crash)
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            mil.train_mil(resumed, progress=False)
    mil.train_mil(resumed, progress=False)
    assert not kills

    final = load_checkpoint(out.final)["model"]
    again = load_checkpoint(mil.mil_files(resumed).final)["model"]
    for name, tensor in final.items():
        assert torch.equal(tensor, again[name]), name
    pd.testing.assert_frame_equal(
        _comparable(metrics), _comparable(pd.read_csv(mil.mil_files(resumed).metrics))
    )


def test_predict_biopsy_score_is_the_top_patch_and_is_cached(mil_params, monkeypatch):
    params = mil_params(splits={"subset_size": 4}, mil={"epochs": 1, "stage2_epochs": 0})
    mil.train_mil(params, progress=False)
    rows = load_split(params, "test")
    predictions = mil.predict(params, rows)
    biopsies, patches = predictions.biopsies, predictions.patches

    assert biopsies["image_id"].tolist() == rows["image_id"].tolist()
    assert biopsies["label"].tolist() == rows["label"].tolist()
    table = mil.experiment_patches(params, rows)
    pd.testing.assert_frame_equal(patches[["image_id", "x", "y"]], table[["image_id", "x", "y"]])
    assert patches["score"].between(0, 1).all()
    for image_id, group in patches.groupby("image_id"):
        top = biopsies.set_index("image_id").loc[image_id, "score"]
        assert top == group["score"].max()
        cached = pd.read_csv(mil.mil_files(params).patch_probability_file(image_id))
        np.testing.assert_array_equal(cached["score"], group["score"])

    # no cache: the same numbers from the final model itself
    model = mil.load_final_model(params, device="cpu")
    fresh_patches = mil.predict(params, rows, model=model).patches
    np.testing.assert_allclose(fresh_patches["score"], patches["score"], rtol=1e-6)

    def no_scoring(*args, **kwargs):
        raise AssertionError("cached patch scores were recomputed")

    monkeypatch.setattr(mil, "score_patches", no_scoring)
    cached = mil.predict(params, rows)
    cached_biopsies, cached_patches = cached.biopsies, cached.patches
    pd.testing.assert_frame_equal(cached_biopsies, biopsies)
    pd.testing.assert_frame_equal(cached_patches, patches)

    # the run's checkpoints cannot be resumed with settings that change what the weights mean
    changed = mil_params(write_splits=False, splits={"subset_size": 4},
                         mil={"epochs": 1, "stage2_epochs": 0, "optimizer": "sgd"})  # fmt: skip
    with pytest.raises(CheckpointError, match="other settings"):
        mil.train_mil(changed, progress=False)


@pytest.mark.slow
def test_mil_learns_the_synthetic_set(mil_params):
    """Random init, batch norm calibrated on training patches, Adam (our choice for CPU), two
    stages: the final (averaged) weights reach a tuning AUC >= 0.9."""
    params = mil_params(mil={"epochs": 2, "stage2_epochs": 1, "window": 1})
    mil.train_mil(params, progress=False)
    out = mil.mil_files(params)
    predictions = pd.read_csv(out.predictions("tune"))
    assert predictions["label"].nunique() == 2 and len(predictions) >= 10
    auc = roc_auc_score(predictions["label"], predictions["score"])
    metrics = pd.read_csv(out.metrics)
    assert auc >= 0.9, (auc, metrics.to_dict("records"))

"""The MIL baseline on files: patch reading, the two phases, resume, predictions, learning.

A small synthetic set is generated and prepared once per module (the real pipeline: synthetic
slides -> prepared TIFFs -> splits); every test makes its own run directory.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from repro import mil
from repro.checkpoints import CheckpointError, load_checkpoint
from repro.config import build_params
from repro.data.dataset import read_region
from repro.data.prepare import prepare_dataset
from repro.data.splits import load_split, make_splits
from repro.train import train_minibatch

IMAGES = 40


def _params(root, out, **overrides):
    values = {
        "experiment": "mil",
        "run": {"out_dir": str(out), "num_workers": 0, "seed": 0},
        "data": {
            "source": "synthetic",
            "panda_dir": str(root / "raw"),
            "prepared_dir": str(root / "prepared"),
            "input_size": 256,
            "synthetic_images": IMAGES,
            "synthetic_size": 512,
            "synthetic_task": "plain",  # tumour is the only dark tissue: does training work?
            "tissue_downsample": 8,
            "tissue_min_object_px": 1,
        },
        "splits": {"tune_fraction": 0.3, "test_fraction": 0.1},
        "mil": {
            "arch": "resnet18",
            "weights": None,
            "patch_size": 48,
            "patch_stride": 48,
            "batch_size": 8,
            "optimizer": "adam",  # our choice for random init on CPU, as in params/smoke.yaml
            "lr": 1e-4,
            "stage2_lr": 3e-5,
            "epochs": 2,
            "stage2_epochs": 2,
            "window": 1,
            "calibrate_batchnorm_images": 4,
        },
    }
    for section, changes in overrides.items():
        values.setdefault(section, {}).update(changes)
    return build_params(values)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Root of the prepared synthetic set."""
    root = tmp_path_factory.mktemp("mil-data")
    prepare_dataset(_params(root, root / "runs"), progress=False)
    return root


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and fair on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


def _run_params(dataset, tmp_path, **overrides):
    params = _params(dataset, tmp_path / "runs", **overrides)
    from repro.data.prepare import load_manifest

    make_splits(load_manifest(params), params)
    return params


# ----------------------------------------------------------------------------- patches


def test_patch_table_matches_the_grid_and_is_cached(dataset, tmp_path, monkeypatch):
    params = _run_params(dataset, tmp_path)
    rows = load_split(params, "tune")
    table = mil.patch_table(params, rows)
    expected = pd.concat(
        [mil.patch_grid(params, i).assign(image_id=i) for i in rows["image_id"]], ignore_index=True
    )
    pd.testing.assert_frame_equal(
        table[["image_id", "x", "y"]], expected[["image_id", "x", "y"]], check_dtype=False
    )
    assert (table["tissue_fraction"] >= params.mil.min_tissue_fraction).all()
    labels = dict(zip(rows["image_id"], rows["label"], strict=True))
    assert (table["label"] == table["image_id"].map(labels)).all()
    assert (mil.mil_dir(params) / "patches.csv").exists()

    def recompute(*_):
        raise AssertionError("the cached grid was recomputed")

    monkeypatch.setattr(mil, "patch_grid", recompute)
    pd.testing.assert_frame_equal(mil.patch_table(params, rows), table)


def test_patch_dataset_reads_and_augments_per_patch(dataset, tmp_path):
    params = _run_params(dataset, tmp_path)
    table = mil.patch_table(params, load_split(params, "train")).head(6)
    first = mil.PatchDataset(params, augment=True)
    second = mil.PatchDataset(params, augment=True)
    size = params.mil.patch_size
    for image_id, x, y, _ in mil.patch_keys(table, None):
        item = first[(image_id, x, y, 3)]
        assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.uint8
        assert (item["image_id"], item["x"], item["y"]) == (image_id, x, y)
        # the same patch in the same epoch is the same augmented patch (inference = training phase)
        assert torch.equal(item["image"], second[(image_id, x, y, 3)]["image"])
        assert not torch.equal(item["image"], first[(image_id, x, y, 4)]["image"])
        # epoch None, or no augmentation: the patch as stored
        plain = read_region(params, image_id, x, y, size, size)
        assert np.array_equal(first[(image_id, x, y, None)]["image"].permute(1, 2, 0), plain)
        unaugmented = mil.PatchDataset(params, augment=False)[(image_id, x, y, 3)]["image"]
        assert np.array_equal(unaugmented.permute(1, 2, 0), plain)


def test_patch_loader_with_spawned_workers_gives_the_same_batches(dataset, tmp_path):
    params = _run_params(dataset, tmp_path)
    table = mil.patch_table(params, load_split(params, "train")).head(10)
    keys = mil.patch_keys(table, 1) + mil.patch_keys(table, None)
    batches = {}
    for workers in (0, 2):
        with mil.PatchLoader(mil.PatchDataset(params), num_workers=workers) as loader:
            for _ in range(2):  # a second pass reuses the workers
                images = torch.cat([b["image"] for b in loader.batches(keys, 6)])
        batches[workers] = images
    assert torch.equal(batches[0], batches[2])


def test_stacked_minibatch_step_equals_image_by_image():
    from repro.models import build_resnet

    torch.manual_seed(0)
    items = [
        {"image": torch.randint(0, 255, (3, 48, 48), dtype=torch.uint8), "label": float(i % 2),
         "image_id": f"p{i}"}
        for i in range(5)
    ]  # fmt: skip
    weights = []
    for stack in (False, True):
        torch.manual_seed(1)
        model = build_resnet("resnet18").train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        results = train_minibatch(
            model, items, optimizer, scaler, device=torch.device("cpu"), images_in_step=5,
            stack=stack,
        )  # fmt: skip
        assert [r[0] for r in results] == [item["image_id"] for item in items]
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- training


def test_epoch_trains_on_the_top1_patch_of_every_biopsy(dataset, tmp_path):
    """The inference phase's top-1 patch per biopsy (brute force over the same model's patch
    logits) is what the training phase trains on, augmented exactly as it was scored."""
    import copy

    from repro.data.sampling import BalancedSampler
    from repro.schedule import EpochRun

    params = _run_params(dataset, tmp_path, splits={"subset_size": 6})
    rows = load_split(params, "train")
    train = mil.patch_table(params, rows)
    tune = mil.patch_table(params, load_split(params, "tune"))
    sampler = BalancedSampler(rows["label"].tolist(), seed=0)
    trainer = mil.MILTrainer(mil.build_model(params), params, train, tune, sampler, progress=False)
    trainer.begin_stage(1, params.mil.lr)
    before = copy.deepcopy(trainer.model)
    trained = []
    loader = trainer._loader

    def recording(data, indices, epoch):
        for item in loader(data, indices, epoch):
            trained.append(item)
            yield item

    trainer._loader = recording
    trainer.train_epoch(EpochRun(1, 1, 5, params.mil.lr))

    logits = mil.score_patches(
        before, trainer.patch_loader, mil.patch_keys(train, 5),
        batch_size=params.mil.inference_batch_size,
        device=torch.device("cpu"), progress=False,
    )  # fmt: skip
    expected = {}
    for image_id, group in train.assign(logit=logits).groupby("image_id"):
        best = group.iloc[int(np.argmax(group["logit"].to_numpy()))]
        expected[image_id] = (int(best["x"]), int(best["y"]))
    top = trainer.last_top1
    assert top["image_id"].tolist() == rows["image_id"].tolist()  # the sampler's order
    assert {row.image_id: (row.x, row.y) for row in top.itertuples()} == expected
    assert len(trained) == len(sampler)
    labels = dict(zip(rows["image_id"], rows["label"], strict=True))
    for item in trained:
        x, y = expected[item["image_id"]]
        patch = trainer.patch_loader.dataset[(item["image_id"], x, y, 5)]
        assert torch.equal(item["image"], patch["image"])
        assert item["label"] == labels[item["image_id"]]
    trainer.patch_loader.close()


def _comparable(metrics):
    timing = [c for c in metrics.columns if "second" in c or "per_hour" in c]
    return metrics.drop(columns=timing)


def test_run_writes_outputs_and_resume_equals_an_uninterrupted_run(dataset, tmp_path, monkeypatch):
    small = {"splits": {"subset_size": 8}}  # 8 training biopsies: cheap epochs
    reference = _run_params(dataset, tmp_path / "reference", **small)
    result = mil.train_mil(reference, progress=False)

    out = mil.mil_dir(reference)
    for name in (
        "params.yaml", "patches.csv", "init.pt", "batchnorm_calibration.json", "metrics.csv",
        "selection.json", "final.pt", "predictions_tune.csv", "loss_curves.png",
    ):  # fmt: skip
        assert (out / name).exists(), name
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["stage"]) == [1, 1, 2, 2]
    assert list(metrics["lr"]) == [1e-4, 1e-4, 3e-5, 3e-5]
    assert (
        metrics["inference_patches"]
        == len(mil.patch_table(reference, load_split(reference, "train")))
    ).all()
    assert (metrics["train_images"] == 8).all()  # 4 + 4 biopsies: balanced already
    assert json.loads((out / "batchnorm_calibration.json").read_text())["calibrated"]
    assert result.selection["final"]["stage"] == 2
    test_rows = load_split(reference, "test")
    assert len(list((out / "patch_scores").glob("*.csv"))) == len(test_rows) + len(
        load_split(reference, "tune")
    )

    # the same run, killed twice (before stage 1 epoch 2 and before stage 2 epoch 2), restarted
    resumed = _run_params(dataset, tmp_path / "resumed", **small)
    original = mil.MILTrainer.train_epoch
    kills = {2, 4}

    def crash(self, run):
        if run.global_epoch in kills:
            kills.discard(run.global_epoch)
            raise KeyboardInterrupt(f"killed in epoch {run.global_epoch}")
        return original(self, run)

    monkeypatch.setattr(mil.MILTrainer, "train_epoch", crash)
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            mil.train_mil(resumed, progress=False)
    mil.train_mil(resumed, progress=False)
    assert not kills

    final = load_checkpoint(out / "final.pt")["model"]
    again = load_checkpoint(mil.mil_dir(resumed) / "final.pt")["model"]
    for name, tensor in final.items():
        assert torch.equal(tensor, again[name]), name
    pd.testing.assert_frame_equal(
        _comparable(metrics), _comparable(pd.read_csv(mil.mil_dir(resumed) / "metrics.csv"))
    )


def test_predict_biopsy_score_is_the_top_patch_and_is_cached(dataset, tmp_path, monkeypatch):
    params = _run_params(
        dataset, tmp_path, splits={"subset_size": 4}, mil={"epochs": 1, "stage2_epochs": 0}
    )
    mil.train_mil(params, progress=False)
    rows = load_split(params, "test")
    biopsies, patches = mil.predict(params, rows)

    assert biopsies["image_id"].tolist() == rows["image_id"].tolist()
    assert biopsies["label"].tolist() == rows["label"].tolist()
    table = mil.patch_table(params, rows)
    pd.testing.assert_frame_equal(patches[["image_id", "x", "y"]], table[["image_id", "x", "y"]])
    assert patches["score"].between(0, 1).all()
    for image_id, group in patches.groupby("image_id"):
        top = biopsies.set_index("image_id").loc[image_id, "score"]
        assert top == group["score"].max()
        cached = pd.read_csv(mil.mil_dir(params) / "patch_scores" / f"{image_id}.csv")
        np.testing.assert_array_equal(cached["score"], group["score"])

    # no cache: the same numbers from the final model itself
    model = mil.load_final_model(params, device="cpu")
    _, fresh_patches = mil.predict(params, rows, model=model)
    np.testing.assert_allclose(fresh_patches["score"], patches["score"], rtol=1e-6)

    def no_scoring(*args, **kwargs):
        raise AssertionError("cached patch scores were recomputed")

    monkeypatch.setattr(mil, "score_patches", no_scoring)
    cached_biopsies, cached_patches = mil.predict(params, rows)
    pd.testing.assert_frame_equal(cached_biopsies, biopsies)
    pd.testing.assert_frame_equal(cached_patches, patches)

    # the run's checkpoints cannot be resumed with settings that change what the weights mean
    changed = _params(dataset, tmp_path / "runs", splits={"subset_size": 4},
                      mil={"epochs": 1, "stage2_epochs": 0, "optimizer": "sgd"})  # fmt: skip
    with pytest.raises(CheckpointError, match="other settings"):
        mil.train_mil(changed, progress=False)


@pytest.mark.slow
def test_mil_learns_the_synthetic_set(dataset, tmp_path):
    """Random init, batch norm calibrated on training patches, Adam (our choice for CPU), two
    stages: the final (averaged) weights reach a tuning AUC >= 0.9."""
    params = _run_params(dataset, tmp_path, mil={"epochs": 2, "stage2_epochs": 1, "window": 1})
    mil.train_mil(params, progress=False)
    out = mil.mil_dir(params)
    predictions = pd.read_csv(out / "predictions_tune.csv")
    assert predictions["label"].nunique() == 2 and len(predictions) >= 10
    auc = roc_auc_score(predictions["label"], predictions["score"])
    metrics = pd.read_csv(out / "metrics.csv")
    assert auc >= 0.9, (auc, metrics.to_dict("records"))

"""Fixtures shared by the whole suite: params for tests (:func:`make_params`, the one builder of
small test settings: tests state only what they change), the small prepared synthetic set of the
MIL tests (prepared once per session), and evaluated runs for the evaluation and reporting tests."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from repro.config import Params, build_params, format_params
from repro.io.atomic import write_text_atomic
from repro.layout import RunLayout

MakeParams = Callable[..., Params]


def merge_sections(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied section by section (a dict value updates the section's
    keys, anything else replaces the value)."""
    values = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(values.get(key), Mapping):
            values[key] = {**values[key], **value}
        else:
            values[key] = copy.deepcopy(value)
    return values


def base_values(root: Path | None = None) -> dict[str, Any]:
    """The settings tests start from. With ``root``: runs under ``root/runs``, raw slides in
    ``root/raw``, the prepared set in ``root/prepared``, a small synthetic set (10 biopsies: 256 px
    prepared images from 512 px slides, masks at 1/8), no worker processes, seed 0."""
    if root is None:
        return {"experiment": "test"}
    return {
        "experiment": "test",
        "run": {"out_dir": str(root / "runs"), "num_workers": 0, "seed": 0},
        "data": {
            "source": "synthetic",
            "panda_dir": str(root / "raw"),
            "prepared_dir": str(root / "prepared"),
            "input_size": 256,
            "synthetic_images": 10,
            "synthetic_size": 512,
            "tissue_downsample": 8,
            "tissue_min_object_px": 1,
        },
    }


@pytest.fixture(scope="session")
def make_params() -> MakeParams:
    """``make_params(root=None, **sections)``: validated :class:`repro.config.Params` from
    :func:`base_values` of ``root`` with ``sections`` merged over them (``experiment="x"``,
    ``data={"input_size": 128}``, ...)."""

    def make(root: Path | None = None, **sections: Any) -> Params:
        return build_params(merge_sections(base_values(root), sections))

    return make


# ----------------------------------------------------------------------------- the MIL set

MIL_IMAGES = 40

MIL_SECTIONS: dict[str, Any] = {
    "experiment": "mil",
    "data": {"synthetic_images": MIL_IMAGES, "synthetic_task": "plain"},  # MIL learns it
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
"""The MIL tests' settings: 40 synthetic biopsies, 48 px patches, a ResNet-18 from random init."""


@pytest.fixture(scope="session")
def mil_dataset(make_params, tmp_path_factory) -> Path:
    """Root of the prepared synthetic set of the MIL tests (``raw/`` and ``prepared/``)."""
    from repro.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("mil-data")
    prepare_dataset(make_params(root, **MIL_SECTIONS), progress=False)
    return root


@pytest.fixture
def mil_params(make_params, mil_dataset, tmp_path) -> MakeParams:
    """``mil_params(out=tmp_path, write_splits=True, **sections)``: params of a MIL run on
    :func:`mil_dataset` with runs under ``out/runs`` (its ``splits.csv`` written unless
    ``write_splits`` is False), ``sections`` merged over :data:`MIL_SECTIONS`."""
    from repro.data.prepare import load_manifest
    from repro.data.splits import make_splits

    def make(out: Path | None = None, *, write_splits: bool = True, **sections: Any) -> Params:
        out = tmp_path if out is None else out
        values = merge_sections(MIL_SECTIONS, sections)
        values["run"] = {**values.get("run", {}), "out_dir": str(out / "runs")}
        params = make_params(mil_dataset, **values)
        if write_splits:
            make_splits(load_manifest(params), params)
        return params

    return make


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs two workers) each worker takes its share of the
    cores, so that the workers' torch threads do not outnumber them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture
def one_thread():
    """One torch thread: deterministic, and faster than two on a CPU shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- evaluated runs


@pytest.fixture
def predictions() -> dict[str, pd.DataFrame]:
    """Seven test biopsies of both methods, with known errors (Table III, the labeller)."""
    # Streaming: max accuracy at >= 0.6 (6/7, see test_metrics): one false negative (c, 0.35).
    streaming = pd.DataFrame(
        {
            "image_id": list("abcdefg"),
            "label": [0, 0, 1, 0, 1, 1, 1],
            "score": [0.1, 0.2, 0.35, 0.4, 0.6, 0.8, 0.9],
        }
    )
    # MIL: two negatives above every positive but one: threshold 0.5, 5/7 (b, d FP; none FN).
    mil = streaming.assign(score=[0.3, 0.95, 0.5, 0.9, 0.6, 0.7, 0.8])
    return {"streaming": streaming, "mil": mil}


def _fake_predictions(n=60, separation=2.0, seed=0, ids=None) -> pd.DataFrame:
    """Test predictions (image_id, label, score) of ``n`` biopsies, half of them cancers."""
    rng = np.random.default_rng(seed)
    label = (np.arange(n) % 2).astype(int)
    score = 1 / (1 + np.exp(-(separation * (label - 0.5) + rng.normal(size=n))))
    ids = ids if ids is not None else [f"img{i:03d}" for i in range(n)]
    return pd.DataFrame({"image_id": ids, "label": label, "score": score})


def _make_run(
    root,
    experiment,
    subset_size=None,
    seed=0,
    prepared="data/prepared/x",
    methods=("streaming", "mil"),
    n=60,
) -> Params:
    """An evaluated run under ``root``: resolved params, splits (100 training biopsies) and fake
    test predictions of ``methods``, as notebooks 02-05 leave them."""
    params = Params(experiment=experiment)
    params.run.out_dir = str(root)
    params.data.prepared_dir = prepared
    params.data.source = "synthetic"
    params.data.synthetic_images = 20
    params.splits.subset_size = subset_size
    params.evaluation.n_bootstrap = 200
    params.evaluation.figures_dir = str(root / "figures")
    layout = RunLayout(root / experiment)
    write_text_atomic(layout.streaming.params, format_params(params))
    splits = pd.DataFrame({"image_id": [f"t{i}" for i in range(100)], "split": "train"})
    write_text_atomic(layout.splits, splits.to_csv(index=False))
    for k, method in enumerate(methods):
        frame = _fake_predictions(n=n, separation=2.0 + k + (subset_size or 0) / 100, seed=seed + k)
        write_text_atomic(layout.method(method).predictions("test"), frame.to_csv(index=False))
    return params


@pytest.fixture(scope="session")
def fake_predictions():
    """``fake_predictions(n=60, separation=2.0, seed=0, ids=None)``: a predictions table."""
    return _fake_predictions


@pytest.fixture(scope="session")
def make_run():
    """``make_run(root, experiment, subset_size=None, seed=0, prepared=..., methods=..., n=60)``:
    an evaluated run's files under ``root``; returns its params."""
    return _make_run


@pytest.fixture
def runs_root(tmp_path) -> Params:
    """Params of run "whole" among runs under ``tmp_path/runs``: "half" (a subset, same test
    set), and three that Table II must leave out: other prepared data, another split seed, and a
    folder without params."""
    root = tmp_path / "runs"
    whole = _make_run(root, "whole")
    _make_run(root, "half", subset_size=40, seed=5)
    _make_run(root, "other-data", prepared="data/prepared/y")  # another test set: left out
    _make_run(root, "other-seed", seed=3)
    # another split seed: another test set
    seed_run = RunLayout(root / "other-seed").streaming.params
    data = yaml.safe_load(seed_run.read_text())
    data["run"]["seed"] = 1
    seed_run.write_text(yaml.safe_dump(data))
    no_params = RunLayout(root / "no-params").mil.predictions("test")
    write_text_atomic(no_params, _fake_predictions().to_csv(index=False))
    return whole

"""The small prepared synthetic set of the dataset and store tests (prepared once per session)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def prepared_set(make_params, tmp_path_factory):
    """``(params, manifest)`` of 10 synthetic biopsies prepared at 192 px (masks at 1/8)."""
    from repro.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("dataset")
    params = make_params(
        root,
        experiment="t",
        run={"seed": 2},
        data={"input_size": 192, "synthetic_images": 10, "synthetic_size": 384},
    )
    manifest = prepare_dataset(params, progress=False)
    assert (manifest["status"] == "ok").all()
    return params, manifest

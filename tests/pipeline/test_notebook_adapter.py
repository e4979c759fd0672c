"""repro.pipeline.notebook: params of a notebook run from what papermill injected, and flags."""

import pytest
import yaml

from repro.config import PROJECT_ROOT
from repro.exceptions import ParamsError
from repro.pipeline.notebook import from_notebook, parse_flag


def test_notebook_parameters_from_papermill_injection():
    injected = yaml.safe_load((PROJECT_ROOT / "params" / "5pct.yaml").read_text())
    namespace = {"params_file": None, "dry_run": "true", "In": [], **injected}
    params, dry_run = from_notebook(namespace)
    assert params.experiment == "5pct" and params.splits.subset_size == 250
    assert dry_run is True


def test_notebook_params_file_with_single_key_override():
    namespace = {"params_file": "params/5pct.yaml", "train": {"epochs": 2}, "dry_run": False}
    params, _ = from_notebook(namespace)
    assert params.train.epochs == 2 and params.train.lr == 2e-4
    assert params.splits.subset_size == 250


def test_notebook_typo_is_an_error():
    with pytest.raises(ParamsError, match="did you mean 'train'"):
        from_notebook({"trian": {"lr": 1.0}})


def test_notebook_without_params_uses_demo():
    params, dry_run = from_notebook({"experiment": None, "train": None, "dry_run": False})
    assert params.experiment == "demo" and dry_run is False


@pytest.mark.parametrize(("value", "expected"), [(True, True), ("true", True), ("False", False)])
def test_parse_flag(value, expected):
    assert parse_flag(value, "dry_run") is expected


def test_parse_flag_rejects_garbage():
    with pytest.raises(ParamsError, match="dry_run"):
        parse_flag("maybe", "dry_run")

"""Params files: defaults are the paper's, every file loads, bad files fail clearly and fast."""

import time
from pathlib import Path

import pytest

from repro.config import PROJECT_ROOT, Params, check_data_paths, load_params
from repro.exceptions import ParamsError, ReproError

PARAMS_FILES = sorted((PROJECT_ROOT / "params").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", PARAMS_FILES, ids=lambda p: p.stem)
def test_every_params_file_loads(path):
    params = load_params(path)
    assert params.experiment == path.stem


def test_paper_files_carry_the_paper_settings():
    sizes = {"full": None, "10pct": 500, "5pct": 250}
    for name, subset in sizes.items():
        params = load_params(PROJECT_ROOT / "params" / f"{name}.yaml")
        assert params.splits.subset_size == subset
        assert params.data.source == "panda"
        assert params.data.input_size == 16384
        assert params.data.target_mpp == 0.96
        assert params.streaming.arch == "resnet34"
        assert params.streaming.weights == "imagenet"
        assert params.streaming.tile_size == 2800
        assert (params.train.lr, params.train.epochs) == (2e-4, 25)
        assert (params.train.stage2_lr, params.train.stage2_epochs) == (6e-5, 50)
        assert (params.train.batch_size, params.train.momentum, params.train.window) == (16, 0.9, 5)
        assert (params.mil.lr, params.mil.epochs) == (1e-5, 100)
        assert (params.mil.stage2_lr, params.mil.stage2_epochs) == (3e-6, 100)
        assert params.evaluation.n_bootstrap == 10000
        assert params.evaluation.smoothgrad_samples == 25
        assert params.evaluation.smoothgrad_noise == 0.05


def test_defaults_are_the_paper_settings():
    params = Params()
    assert params.train.lr == 2e-4 and params.mil.lr == 1e-5
    assert params.streaming.stream_until == "layer3"
    assert params.splits.tune_fraction == pytest.approx(497 / 5744)


def test_typo_names_file_key_and_closest_key(tmp_path):
    path = write(tmp_path, "experiment: x\ntrian:\n  lr: 0.1\n")
    start = time.perf_counter()
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert time.perf_counter() - start < 2
    message = str(error.value)
    assert str(path) in message
    assert "trian" in message and "did you mean 'train'" in message


def test_nested_typo_suggests_the_section_key(tmp_path):
    path = write(tmp_path, "train:\n  stage2_epoch: 3\n")
    with pytest.raises(
        ParamsError, match=r"train\.stage2_epoch: unknown key.*'train\.stage2_epochs'"
    ):
        load_params(path)


def test_negative_lr_names_file_and_key(tmp_path):
    path = write(tmp_path, "train:\n  lr: -1\n")
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert str(path) in str(error.value)
    assert "train.lr: must be > 0, got -1.0" in str(error.value)


@pytest.mark.parametrize(("text", "lr"), [("1e-5", 1e-5), ("2.5E-4", 2.5e-4), ("3", 3.0)])
def test_float_in_exponent_notation_without_dot(tmp_path, text, lr):
    assert load_params(write(tmp_path, f"train:\n  lr: {text}\n")).train.lr == lr


def test_float_field_rejects_other_strings(tmp_path):
    with pytest.raises(ParamsError, match=r"train\.lr: expected float, got 'fast'"):
        load_params(write(tmp_path, "train:\n  lr: fast\n"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("streaming:\n  tile_size: 2801\n", "streaming.tile_size: must be a positive multiple"),
        ("streaming:\n  stream_until: layer4.0\n  tile_size: 2800\n", "stride 32"),
        ("streaming:\n  stream_until: layer2\n  tile_size: 2804\n", "stride 8"),
        ("train:\n  epochs: three\n", "train.epochs: expected int, got 'three'"),
        ("streaming:\n  arch: resnet35\n", "streaming.arch: must be one of"),
        ("data:\n  synthetic_task: global\n", "data.synthetic_task: must be one of 'plain'"),
        ("run:\n  device: gpu\n", "run.device"),
        ("splits:\n  tune_fraction: 0.6\n  test_fraction: 0.5\n", "must be < 1"),
        ("train: [1, 2]\n", "train: must be a mapping"),
        ("- a\n- b\n", "expected a mapping of sections"),
        ("train:\n  lr: [\n", "not valid YAML"),
    ],
)
def test_impossible_values_are_rejected(tmp_path, text, expected):
    with pytest.raises(ParamsError, match=expected):
        load_params(write(tmp_path, text))


def test_all_errors_are_reported_at_once(tmp_path):
    path = write(tmp_path, "train:\n  lr: -1\n  epochs: -2\nmil:\n  lr: 0\n")
    with pytest.raises(ParamsError) as error:
        load_params(path)
    for key in ("train.lr", "train.epochs", "mil.lr"):
        assert key in str(error.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match=r"nope\.yaml: cannot read"):
        load_params(tmp_path / "nope.yaml")


def test_environment_variables_expand(tmp_path, monkeypatch):
    path = write(tmp_path, "data:\n  panda_dir: ${MY_PANDA:-fallback}/x\n")
    assert load_params(path).data.panda_dir == "fallback/x"
    monkeypatch.setenv("MY_PANDA", "/somewhere")
    assert load_params(path).data.panda_dir == "/somewhere/x"


def test_base_file_is_extended_key_by_key(tmp_path):
    base = write(tmp_path, "experiment: a\ntrain:\n  lr: 0.001\n  epochs: 3\n", "base.yaml")
    child = write(tmp_path, f"base: {base}\nexperiment: b\ntrain:\n  epochs: 7\n", "child.yaml")
    params = load_params(child)
    assert (params.experiment, params.train.lr, params.train.epochs) == ("b", 0.001, 7)


def test_base_cycle_is_an_error(tmp_path):
    first = tmp_path / "first.yaml"
    second = write(tmp_path, f"base: {first}\n", "second.yaml")
    first.write_text(f"base: {second}\n")
    with pytest.raises(ParamsError, match="cycle"):
        load_params(first)


def test_missing_panda_data_names_the_key(tmp_path):
    params = load_params(write(tmp_path, f"data:\n  panda_dir: {tmp_path}/absent\n"))
    with pytest.raises(ParamsError, match=r"data\.panda_dir: .*train\.csv does not exist"):
        check_data_paths(params)


def test_params_errors_are_repro_errors_and_value_errors(tmp_path):
    path = write(tmp_path, "train:\n  lr: -1\n")
    with pytest.raises(ReproError) as caught:
        load_params(path)
    assert isinstance(caught.value, ParamsError) and isinstance(caught.value, ValueError)

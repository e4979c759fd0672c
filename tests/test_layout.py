"""repro.layout: the one place that names the files of a run and of a prepared set. The names are
spelled here once; every other test asks the layout for its paths."""

from pathlib import Path

import pytest

from repro.layout import METHODS, MethodLayout, PandaLayout, PreparedLayout, RunLayout


def test_run_layout_names(tmp_path):
    run = RunLayout.at(tmp_path / "demo")
    assert run.root == tmp_path / "demo"
    assert run.splits == tmp_path / "demo" / "splits.csv"
    assert run.log == tmp_path / "demo" / "run.log"
    assert METHODS == ("streaming", "mil")
    assert run.streaming == run.method("streaming") == MethodLayout(tmp_path / "demo" / "streaming")
    assert run.mil == run.method("mil") == MethodLayout(tmp_path / "demo" / "mil")
    assert run.params_candidates() == [
        tmp_path / "demo" / "streaming" / "params.yaml",
        tmp_path / "demo" / "mil" / "params.yaml",
        tmp_path / "demo" / "params.yaml",
    ]
    with pytest.raises(ValueError, match="method must be one of"):
        run.method("attention")


def test_method_layout_names():
    files = MethodLayout(Path("m"))
    names = {
        "params": "params.yaml",
        "init": "init.pt",
        "normalization": "normalization.json",
        "batchnorm_calibration": "batchnorm_calibration.json",
        "checkpoints": "checkpoints",
        "last_checkpoint": "checkpoints/last.pt",
        "metrics": "metrics.csv",
        "selection": "selection.json",
        "final": "final.pt",
        "loss_curves": "loss_curves.png",
        "saliency": "saliency",
        "patch_grid": "patches.csv",
        "patch_grid_key": "patches.json",
        "patch_probability_cache": "patch_probability_cache",
        "patch_probability_key": "patch_probability_cache/model.json",
    }
    for attribute, name in names.items():
        assert getattr(files, attribute) == Path("m") / name, attribute
    assert files.checkpoint(1, 4) == Path("m/checkpoints/stage1_epoch004.pt")
    assert files.checkpoint(2, 1234) == Path("m/checkpoints/stage2_epoch1234.pt")
    assert files.predictions("tune") == Path("m/predictions_tune.csv")
    assert files.patch_scores("test") == Path("m/patch_scores_test.csv")
    assert files.patch_probability_file("a1") == Path("m/patch_probability_cache/a1.csv")


def test_epoch_checkpoints_lists_only_epoch_checkpoints(tmp_path):
    files = MethodLayout(tmp_path)
    for stage, epoch in [(1, 1), (1, 12), (2, 1000)]:
        path = files.checkpoint(stage, epoch)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    for other in ("last.pt", "stage1_epoch01.pt", "stage1_epoch001.pt.tmp", "stageX_epoch001.pt"):
        (files.checkpoints / other).write_bytes(b"")
    assert sorted(files.epoch_checkpoints()) == [
        (1, 1, files.checkpoint(1, 1)),
        (1, 12, files.checkpoint(1, 12)),
        (2, 1000, files.checkpoint(2, 1000)),
    ]
    assert MethodLayout(tmp_path / "none").epoch_checkpoints() == []


def test_prepared_layout_names():
    prepared = PreparedLayout(Path("p"))
    assert prepared.manifest == Path("p/manifest.csv")
    assert (prepared.images, prepared.masks, prepared.records) == (
        Path("p/images"),
        Path("p/masks"),
        Path("p/records"),
    )
    assert prepared.image("x") == Path("p/images/x.tiff")
    assert prepared.mask("x") == Path("p/masks/x.png")
    assert prepared.label_mask("x") == Path("p/labels/x.png")
    assert prepared.record("x") == Path("p/records/x.json")


def test_panda_layout_names():
    raw = PandaLayout(Path("r"))
    assert raw.labels == Path("r/train.csv")
    assert raw.image("x") == Path("r/train_images/x.tiff")
    assert raw.label_mask("x") == Path("r/train_label_masks/x_mask.tiff")


def test_params_know_their_layouts(make_params, tmp_path):
    params = make_params(tmp_path, experiment="exp")
    assert params.layout == RunLayout(tmp_path / "runs" / "exp")
    assert params.run_dir == params.layout.root
    assert params.prepared == PreparedLayout(tmp_path / "prepared")

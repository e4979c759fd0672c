"""repro.figures and the file-writing side of repro.evaluation: tables, ROC figure, heatmap figure,
run discovery and the summary command."""

import numpy as np
import pandas as pd
import pytest
import yaml

from repro.config import Params, format_params
from repro.evaluation import (
    find_runs,
    format_auc,
    load_predictions,
    paired_comparisons,
    predictions_path,
    table_ii,
    table_ii_display,
    write_csv,
    write_figure_3,
    write_table_ii,
)
from repro.figures import (
    HeatmapExample,
    RocCurve,
    figure_3,
    heatmap_figure,
    main,
    markdown_table,
    png_bytes,
    save_figure,
    save_table,
    summary,
)


def fake_predictions(n=60, separation=2.0, seed=0, ids=None):
    rng = np.random.default_rng(seed)
    label = (np.arange(n) % 2).astype(int)
    score = 1 / (1 + np.exp(-(separation * (label - 0.5) + rng.normal(size=n))))
    ids = ids if ids is not None else [f"img{i:03d}" for i in range(n)]
    return pd.DataFrame({"image_id": ids, "label": label, "score": score})


def make_run(
    root,
    experiment,
    subset_size=None,
    seed=0,
    prepared="data/prepared/x",
    methods=("streaming", "mil"),
    n=60,
):
    params = Params(experiment=experiment)
    params.run.out_dir = str(root)
    params.data.prepared_dir = prepared
    params.data.source = "synthetic"
    params.data.synthetic_images = 20
    params.splits.subset_size = subset_size
    params.evaluation.n_bootstrap = 200
    params.evaluation.figures_dir = str(root / "figures")
    run_dir = root / experiment
    (run_dir / "streaming").mkdir(parents=True)
    (run_dir / "streaming" / "params.yaml").write_text(format_params(params))
    splits = pd.DataFrame({"image_id": [f"t{i}" for i in range(100)], "split": "train"})
    splits.to_csv(run_dir / "splits.csv", index=False)
    for k, method in enumerate(methods):
        frame = fake_predictions(n=n, separation=2.0 + k + (subset_size or 0) / 100, seed=seed + k)
        write_csv(frame, predictions_path(run_dir, method))
    return params


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "runs"
    whole = make_run(root, "whole")
    make_run(root, "half", subset_size=40, seed=5)
    make_run(root, "other-data", prepared="data/prepared/y")  # another test set: left out
    make_run(root, "other-seed", seed=3)
    # another split seed: another test set
    seed_run = root / "other-seed" / "streaming" / "params.yaml"
    data = yaml.safe_load(seed_run.read_text())
    data["run"]["seed"] = 1
    seed_run.write_text(yaml.safe_dump(data))
    (root / "no-params").mkdir()
    write_csv(fake_predictions(), predictions_path(root / "no-params", "mil"))
    return whole


def test_find_runs_keeps_same_test_set_whole_first(runs_root):
    runs = find_runs(runs_root)
    assert [run.experiment for run in runs] == ["whole", "half"]
    assert [run.training_set for run in runs] == ["Whole set", "Subset of 40"]
    assert [run.n_train for run in runs] == [100, 40]
    assert set(runs[0].predictions) == {"streaming", "mil"}


def test_find_runs_skips_runs_with_other_test_images(runs_root, tmp_path):
    root = tmp_path / "runs"
    make_run(root, "fewer", n=40)
    assert "fewer" not in [run.experiment for run in find_runs(runs_root)]


def test_table_ii_numbers_and_display(runs_root):
    runs = find_runs(runs_root)
    table = table_ii(runs, n_bootstrap=200, seed=0)
    assert list(table["experiment"]) == ["whole", "half"]
    row = table.iloc[0]
    assert row["streaming_low"] <= row["streaming_auc"] <= row["streaming_high"]
    shown = table_ii_display(table)
    assert shown.loc[0, "Streaming AUC (95% CI)"] == format_auc(
        row["streaming_auc"], row["streaming_low"], row["streaming_high"]
    )
    assert "Paper Streaming" not in shown.columns  # synthetic data: no paper column


def test_table_ii_has_paper_values_on_panda(runs_root):
    runs = find_runs(runs_root)
    for run in runs:
        run.params.data.source = "panda"
    table = table_ii(runs, n_bootstrap=100)
    assert table.loc[0, "paper_streaming"] == "0.992 (0.985–0.997)"
    assert table.loc[0, "paper_mil"] == "0.990 (0.984–0.995)"
    shown = table_ii_display(table)
    assert shown.iloc[-1]["Training set"].startswith("Bulten")
    assert shown.iloc[-1]["Paper Streaming"] == "0.990 (0.982–0.996)"


def test_paired_comparisons(runs_root):
    paired = paired_comparisons(find_runs(runs_root), n_bootstrap=200)
    assert list(paired["experiment"]) == ["whole", "half"]
    assert (
        (paired["low"] <= paired["difference"]) & (paired["difference"] <= paired["high"])
    ).all()
    assert paired["p_bootstrap"].between(0, 1).all() and paired["p_delong"].between(0, 1).all()


def test_write_table_ii_and_figure_3(runs_root):
    runs = find_runs(runs_root)
    result = write_table_ii(runs_root, runs)
    names = sorted(path.name for path in result["files"])
    assert names == [
        "streaming_vs_mil_x.csv",
        "streaming_vs_mil_x.md",
        "table2_x.csv",
        "table2_x.md",
    ]
    markdown = (runs_root.run_dir.parent / "figures" / "table2_x.md").read_text()
    assert "| Training set |" in markdown and "Subset of 40" in markdown
    files = write_figure_3(runs_root, runs, result["paired"])
    assert [path.suffix for path in files] == [".png", ".pdf"]
    assert files[0].read_bytes().startswith(b"\x89PNG")
    assert files[1].read_bytes().startswith(b"%PDF")


def test_load_predictions_validates(tmp_path):
    path = tmp_path / "p.csv"
    pd.DataFrame({"image_id": ["a", "a"], "label": [0, 1], "score": [0.1, 0.2]}).to_csv(path)
    with pytest.raises(ValueError, match="occur twice"):
        load_predictions(path)
    pd.DataFrame({"image_id": ["a"], "score": [0.1]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"missing columns \['label'\]"):
        load_predictions(path)


def test_markdown_table_and_save_table(tmp_path):
    frame = pd.DataFrame({"name": ["a|b", "c"], "value": [0.12345, np.nan], "n": [1, 2]})
    text = markdown_table(frame)
    assert text.splitlines() == [
        "| name | value | n |",
        "| --- | --- | --- |",
        "| a\\|b | 0.123 | 1 |",
        "| c | – | 2 |",
    ]
    csv, md = save_table(frame, tmp_path / "out" / "t")
    pd.testing.assert_frame_equal(pd.read_csv(csv), frame)
    assert md.read_text() == text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["t.csv", "t.md"]


def test_roc_figure_legend_carries_ci():
    frame = fake_predictions()
    curve = RocCurve("streaming", "Whole set", frame["label"], frame["score"], (0.9, 0.85, 0.95))
    assert curve.label == "Streaming, Whole set: 0.900 (0.850–0.950)"
    figure = figure_3([curve], [curve], "p = 0.5")
    legend = figure.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [curve.label]
    assert png_bytes(figure).startswith(b"\x89PNG")


def test_heatmap_figure_and_save(tmp_path):
    rng = np.random.default_rng(0)
    thumbnail = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    patches = np.full((40, 60), np.nan, dtype=np.float32)
    patches[:20, :30] = 0.8
    examples = [
        HeatmapExample("a", "label 1", thumbnail, rng.random((40, 60)), patches),
        HeatmapExample("b", "label 0", thumbnail, None, None),
    ]
    figure = heatmap_figure(examples, title="test")
    assert len(figure.axes) == 3 * 2 + 2  # panels + two colour bars
    files = save_figure(figure, tmp_path / "fig")
    assert [p.name for p in files] == ["fig.png", "fig.pdf"]
    with pytest.raises(ValueError, match="empty"):
        heatmap_figure([])


def test_summary_lists_tables_and_files(tmp_path, capsys):
    folder = tmp_path / "figures"
    assert "no figures yet" in summary(folder)
    folder.mkdir()
    (folder / "table2_x.md").write_text("| a |\n| --- |\n| 1 |\n")
    (folder / "fig3_roc_x.png").write_bytes(b"\x89PNG")
    text = summary(folder)
    assert "Table II (x)" in text and "| 1 |" in text and "fig3_roc_x.png" in text
    assert main(["--summary", str(folder)]) == 0
    assert "fig3_roc_x.png" in capsys.readouterr().out


def test_predict_test_set_saves_both_methods(tmp_path, monkeypatch):
    import repro.data.splits
    import repro.mil
    import repro.train
    from repro.evaluation import load_patch_scores, predict_test_set

    params = Params(experiment="pred")
    params.run.out_dir = str(tmp_path)
    rows = pd.DataFrame({"image_id": ["b", "a"], "label": [1, 0]})
    monkeypatch.setattr(repro.data.splits, "load_split", lambda p, split: rows)
    monkeypatch.setattr(repro.train, "load_final_model", lambda p: "model")
    monkeypatch.setattr(
        repro.train, "predict", lambda model, r, p: r.assign(score=[0.9, 0.2], extra=1)
    )
    patches = pd.DataFrame({"image_id": ["a", "b"], "x": [0, 0], "y": [0, 16], "score": [0.2, 0.9]})
    monkeypatch.setattr(repro.mil, "predict", lambda p, r: (r.assign(score=[0.8, 0.3]), patches))
    result = predict_test_set(params)
    assert list(result) == ["streaming", "mil"]
    streaming = load_predictions(predictions_path(params.run_dir, "streaming"))
    assert streaming.to_dict("list") == {
        "image_id": ["a", "b"],
        "label": [0, 1],
        "score": [0.2, 0.9],
    }
    pd.testing.assert_frame_equal(load_patch_scores(params.run_dir), patches)


def test_written_files_get_the_usual_mode(tmp_path):
    import os

    mask = os.umask(0)
    os.umask(mask)
    figure = figure_3([], [])
    paths = save_figure(figure, tmp_path / "fig") + save_table(
        pd.DataFrame({"a": [1]}), tmp_path / "t"
    )
    for path in paths:
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path

"""repro.evaluation.tables: run discovery (same test set), Table II and the paired comparisons,
checked predictions files."""

import pandas as pd
import pytest

from repro.evaluation.tables import (
    find_runs,
    format_auc,
    load_predictions,
    paired_comparisons,
    table_ii,
    table_ii_display,
)


def test_find_runs_keeps_same_test_set_whole_first(runs_root):
    runs = find_runs(runs_root)
    assert [run.experiment for run in runs] == ["whole", "half"]
    assert [run.training_set for run in runs] == ["Whole set", "Subset of 40"]
    assert [run.n_train for run in runs] == [100, 40]
    assert set(runs[0].predictions) == {"streaming", "mil"}


def test_find_runs_skips_runs_with_other_test_images(runs_root, tmp_path, make_run):
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


def test_load_predictions_validates(tmp_path):
    path = tmp_path / "p.csv"
    pd.DataFrame({"image_id": ["a", "a"], "label": [0, 1], "score": [0.1, 0.2]}).to_csv(path)
    with pytest.raises(ValueError, match="occur twice"):
        load_predictions(path)
    pd.DataFrame({"image_id": ["a"], "score": [0.1]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"missing columns \['label'\]"):
        load_predictions(path)

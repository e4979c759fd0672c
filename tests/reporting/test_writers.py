"""repro.reporting.writers: every table and figure file notebooks 05-07 write, from saved run
outputs (Table II and Fig. 3 from several runs; Fig. 4-6 and Table III from one)."""

import numpy as np
import pandas as pd
import pytest
import pyvips

import repro.evaluation.saliency as saliency
from repro.evaluation.errors import errors_at_max_accuracy
from repro.evaluation.tables import find_runs, load_run_predictions
from repro.reporting.writers import (
    write_error_figures,
    write_figure_3,
    write_figure_6,
    write_heatmap_localisation,
    write_table_ii,
    write_table_iii,
)


def test_write_figure_6_from_cached_maps(evaluated_run, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was needed although every map is cached")

    monkeypatch.setattr(saliency, "smoothgrad", no_model)
    files, shown = write_figure_6(evaluated_run)
    assert shown == ["a", "c"]
    assert [p.name for p in files] == ["fig6_heatmaps_fig.png", "fig6_heatmaps_fig.pdf"]
    assert files[0].read_bytes().startswith(b"\x89PNG")


def test_error_figures_and_table_iii(evaluated_run):
    predictions = load_run_predictions(evaluated_run)
    errors = errors_at_max_accuracy(predictions)
    written = write_error_figures(evaluated_run, errors)
    assert sorted(written) == ["false negative", "false positive"]
    assert written["false positive"][0].name == "fig4_false_positives_fig.png"
    only_negatives = errors[errors["error"] == "false negative"]
    assert sorted(write_error_figures(evaluated_run, only_negatives)) == ["false negative"]
    assert not any(p.exists() for p in written["false positive"]), "stale Fig. 4 must go"
    result = write_table_iii(evaluated_run, predictions)
    assert result["labelled"] == 0
    assert [p.name for p in result["files"]] == ["table3_fig.csv", "table3_fig.md"]


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


def test_heatmap_localisation_table(evaluated_run):
    """Biopsy "a" has tumour (label 4) where both maps are highest: pixel AUC 1 and a hit for
    each; "b" (positive) has no label mask and "c" (negative) no tumour: neither is scored."""
    params = evaluated_run
    empty = write_heatmap_localisation(params)  # no label masks yet (a CSV dataset, say)
    assert empty["rows"].empty and empty["summary"].empty
    assert empty["files"][1].read_text().startswith("No biopsy with a label mask.")
    labels = np.zeros((64, 64), np.uint8)
    labels[16:48, 0:48] = 1  # tissue under the MIL patches
    labels[16:48, 32:48] = 4  # tumour under the highest MIL patches (x = 32)
    params.prepared.labels.mkdir(parents=True)
    for image_id in ("a", "c"):
        mine = labels if image_id == "a" else np.minimum(labels, 1)
        pyvips.Image.new_from_array(mine).pngsave(str(params.prepared.label_mask(image_id)))
    reduced = np.zeros((32, 32), np.float32)
    reduced[8:24, 16:24] = 1.0  # SmoothGrad high on the tumour (map px = 2 image px)
    path = params.layout.streaming.saliency / "a.npz"
    np.savez(path, heatmap=reduced, **saliency._cache_key(params))

    result = write_heatmap_localisation(params)
    rows = result["rows"]
    assert list(rows["image_id"]) == ["a", "a"] and list(rows["method"]) == ["streaming", "mil"]
    assert rows["pixel_auc"].tolist() == pytest.approx([1.0, 1.0])
    assert rows["pointing_hit"].all()
    assert rows["tumour_fraction"].tolist() == pytest.approx([1 / 3, 1 / 3])
    assert [p.name for p in result["files"]] == [
        "heatmap_localisation_fig.csv",
        "heatmap_localisation_fig.md",
    ]
    saved = pd.read_csv(result["files"][0])
    assert saved["pixel_auc"].tolist() == pytest.approx([1.0, 1.0])
    markdown = result["files"][1].read_text()
    assert "| streaming (SmoothGrad) | 1 | 1.000 | 1.000 | 1.000 |" in markdown
    assert "| mil (patch probability) | 1 |" in markdown
    assert "on 1 positive test biopsies with a label mask" in markdown

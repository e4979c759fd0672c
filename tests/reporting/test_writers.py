"""repro.reporting.writers: every table and figure file notebooks 05-07 write, from saved run
outputs (Table II and Fig. 3 from several runs; Fig. 4-6 and Table III from one)."""

import repro.evaluation.saliency as saliency
from repro.evaluation.errors import errors_at_max_accuracy
from repro.evaluation.tables import find_runs, load_run_predictions
from repro.reporting.writers import (
    write_error_figures,
    write_figure_3,
    write_figure_6,
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

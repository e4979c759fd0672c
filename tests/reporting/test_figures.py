"""repro.reporting.figures: tables as markdown and files, the ROC figure, the heatmap figure,
the summary command, and the written files' mode."""

import numpy as np
import pandas as pd
import pytest

from repro.reporting.figures import (
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


def test_roc_figure_legend_carries_ci(fake_predictions):
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

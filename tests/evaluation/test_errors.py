"""repro.evaluation.errors: errors at the max-accuracy threshold, atomic label storage, Table
III."""

import os

import pandas as pd
import pytest

from repro.config import Params
from repro.evaluation.errors import (
    CATEGORIES,
    FALSE_NEGATIVE,
    FALSE_POSITIVE,
    LABEL_COLUMNS,
    NOT_LABELLED,
    OTHER,
    errors_at_max_accuracy,
    find_errors,
    labels_path,
    load_labels,
    save_labels,
    set_label,
    table_iii,
    table_iii_markdown,
)


def test_find_errors_orders_most_confident_first():
    frame = pd.DataFrame(
        {"image_id": list("abcde"), "label": [0, 0, 1, 1, 0], "score": [0.7, 0.9, 0.1, 0.3, 0.2]}
    )
    errors = find_errors(frame, threshold=0.5)
    assert errors["image_id"].tolist() == ["b", "a", "c", "d"]
    assert errors["error"].tolist() == [FALSE_POSITIVE] * 2 + [FALSE_NEGATIVE] * 2


def test_errors_at_max_accuracy(predictions):
    errors = errors_at_max_accuracy(predictions)
    streaming = errors[errors["method"] == "streaming"]
    assert streaming["image_id"].tolist() == ["c"]
    assert streaming["error"].tolist() == [FALSE_NEGATIVE]
    assert streaming["threshold"].iloc[0] == 0.6
    mil = errors[errors["method"] == "mil"]
    assert sorted(mil["image_id"]) == ["b", "d"]
    assert set(mil["error"]) == {FALSE_POSITIVE}


def test_labels_path_uses_labels_dir(tmp_path):
    params = Params(experiment="demo")
    params.evaluation.labels_dir = str(tmp_path / "labels")
    assert labels_path(params) == tmp_path / "labels" / "demo.csv"


def test_load_labels_missing_file_is_empty(tmp_path):
    labels = load_labels(tmp_path / "none.csv")
    assert labels.empty and list(labels.columns) == LABEL_COLUMNS


def test_set_label_round_trips_and_replaces(tmp_path):
    path = tmp_path / "labels" / "demo.csv"
    set_label(path, "mil", "b", FALSE_POSITIVE, "inflammation")
    set_label(path, "streaming", "c", FALSE_NEGATIVE, OTHER, note='folded, "odd", tissue')
    labels = set_label(path, "mil", "b", FALSE_POSITIVE, "normal mimicking tumour", "glands")
    expected = pd.DataFrame(
        [
            ["mil", "b", FALSE_POSITIVE, "normal mimicking tumour", "glands"],
            ["streaming", "c", FALSE_NEGATIVE, OTHER, 'folded, "odd", tissue'],
        ],
        columns=LABEL_COLUMNS,
    )
    pd.testing.assert_frame_equal(labels, expected)
    pd.testing.assert_frame_equal(load_labels(path), expected)
    save_labels(load_labels(path), path)  # saving what was loaded changes nothing
    pd.testing.assert_frame_equal(load_labels(path), expected)


def test_image_ids_stay_strings(tmp_path):
    path = tmp_path / "labels.csv"
    set_label(path, "mil", "007", FALSE_POSITIVE, "inflammation")
    assert load_labels(path)["image_id"].tolist() == ["007"]


def test_invalid_category_writes_nothing(tmp_path):
    path = tmp_path / "labels.csv"
    set_label(path, "mil", "b", FALSE_POSITIVE, "inflammation")
    before = path.read_bytes()
    with pytest.raises(ValueError, match="got 'low-grade tumour'"):
        set_label(path, "mil", "d", FALSE_POSITIVE, "low-grade tumour")
    with pytest.raises(ValueError, match="error must be one of"):
        set_label(path, "mil", "d", "true positive", "inflammation")
    assert path.read_bytes() == before


def test_save_labels_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "labels.csv"
    set_label(path, "mil", "b", FALSE_POSITIVE, "inflammation")
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    # A crash after the temporary file is written but before the rename: old file intact,
    # temporary removed.
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        set_label(path, "mil", "d", FALSE_POSITIVE, "inflammation")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["labels.csv"]
    monkeypatch.undo()

    # A crash while writing: the same.
    monkeypatch.setattr(pd.DataFrame, "to_csv", crash)
    with pytest.raises(OSError, match="disk full"):
        set_label(path, "mil", "d", FALSE_POSITIVE, "inflammation")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["labels.csv"]


def test_load_labels_rejects_foreign_file(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("image_id,category\na,inflammation\n")
    with pytest.raises(ValueError, match="missing columns"):
        load_labels(path)


def test_table_iii_counts_without_labels(predictions):
    errors = errors_at_max_accuracy(predictions)
    table = table_iii(errors, load_labels("/nonexistent.csv"))
    assert table.to_dict("records") == [
        {"error": FALSE_POSITIVE, "category": NOT_LABELLED, "streaming": 0, "mil": 2},
        {"error": FALSE_POSITIVE, "category": "total", "streaming": 0, "mil": 2},
        {"error": FALSE_NEGATIVE, "category": NOT_LABELLED, "streaming": 1, "mil": 0},
        {"error": FALSE_NEGATIVE, "category": "total", "streaming": 1, "mil": 0},
    ]
    markdown = table_iii_markdown(table)
    assert "| False positives | Streaming (0) | MIL (2) |" in markdown
    assert "| Not labelled yet | 0 | 2 |" in markdown


def test_table_iii_method_without_errors_gets_zeros(predictions):
    errors = errors_at_max_accuracy({"mil": predictions["mil"]})
    table = table_iii(errors, load_labels("/nonexistent.csv"), methods=["streaming", "mil"])
    assert table.set_index(["error", "category"]).loc[(FALSE_POSITIVE, "total")].tolist() == [0, 2]


def test_table_iii_with_labels(predictions, tmp_path):
    errors = errors_at_max_accuracy(predictions)
    path = tmp_path / "labels.csv"
    set_label(path, "mil", "b", FALSE_POSITIVE, "inflammation")
    set_label(path, "streaming", "c", FALSE_NEGATIVE, "little amount of tumour")
    set_label(path, "streaming", "a", FALSE_POSITIVE, "inflammation")  # not an error: ignored
    table = table_iii(errors, load_labels(path)).set_index(["error", "category"])
    assert table.loc[(FALSE_POSITIVE, "inflammation")].tolist() == [0, 1]
    assert table.loc[(FALSE_POSITIVE, NOT_LABELLED)].tolist() == [0, 1]
    assert table.loc[(FALSE_POSITIVE, "total")].tolist() == [0, 2]
    assert table.loc[(FALSE_NEGATIVE, "little amount of tumour")].tolist() == [1, 0]
    assert table.loc[(FALSE_NEGATIVE, "total")].tolist() == [1, 0]
    # every paper category is listed, even at zero; "other" only when used
    for error, categories in CATEGORIES.items():
        for category in categories:
            assert ((error, category) in table.index) == (category != OTHER)
    markdown = table_iii_markdown(table.reset_index())
    assert "| False positives | Streaming (0) | MIL (2) |" in markdown
    assert "| Inflammation | 0 | 1 |" in markdown
    assert "| False negatives | Streaming (1) | MIL (0) |" in markdown

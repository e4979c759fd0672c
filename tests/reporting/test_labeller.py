"""repro.reporting.labeller: notebook 07's form that sorts the errors into Table III's
categories and saves each label at once."""

import pandas as pd
import pytest

from repro.evaluation.errors import OTHER, errors_at_max_accuracy, load_labels
from repro.reporting.labeller import labeller


@pytest.fixture
def predictions():
    # Max accuracy at >= 0.6 (6/7, see test_metrics): one false negative (c, 0.35).
    streaming = pd.DataFrame(
        {
            "image_id": list("abcdefg"),
            "label": [0, 0, 1, 0, 1, 1, 1],
            "score": [0.1, 0.2, 0.35, 0.4, 0.6, 0.8, 0.9],
        }
    )
    # MIL: two negatives above every positive but one: threshold 0.5, 5/7 (b, d FP; none FN).
    mil = streaming.assign(score=[0.3, 0.95, 0.5, 0.9, 0.6, 0.7, 0.8])
    return {"streaming": streaming, "mil": mil}


def test_labeller_builds_and_saves(predictions, tmp_path):
    errors = errors_at_max_accuracy(predictions)
    path = tmp_path / "labels.csv"
    shown = []
    form = labeller(errors, path, show=lambda row: shown.append(row["image_id"]))
    title, (category, note), (previous, save, following), status, _ = (
        form.children[0],
        form.children[1].children,
        form.children[2].children,
        form.children[3],
        form.children[4],
    )
    assert shown == [errors["image_id"].iloc[0]]
    category.value = category.options[1]
    save.click()
    labels = load_labels(path)
    assert labels["image_id"].tolist() == [errors["image_id"].iloc[0]]
    assert labels["category"].tolist() == [category.options[1]]
    following.click()
    assert shown[-1] == errors["image_id"].iloc[1]
    category.value = OTHER
    save.click()  # 'other' without a note is refused
    assert len(load_labels(path)) == 1 and "note" in status.value
    previous.click()
    assert category.value == load_labels(path)["category"].iloc[0]  # saved label pre-selected
    assert title.value.startswith("<b>1/")
    assert note.value == ""

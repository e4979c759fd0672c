"""repro.reporting.labeller: notebook 07's form that sorts the errors into Table III's
categories and saves each label at once."""

from repro.evaluation.errors import OTHER, errors_at_max_accuracy, load_labels
from repro.reporting.labeller import labeller


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

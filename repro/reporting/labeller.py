"""Notebook 07's labelling form: an ipywidgets form that files each error under one of Table III's
categories (saved with :func:`repro.evaluation.errors.set_label`), showing the biopsy and both
heatmaps."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import ipywidgets as widgets
import pandas as pd
from IPython.display import Image, display

from repro.config import Params
from repro.evaluation.errors import CATEGORIES, OTHER, load_labels, set_label
from repro.evaluation.tables import METHOD_NAMES, load_patch_scores
from repro.reporting.figures import heatmap_figure, png_bytes
from repro.reporting.heatmaps import heatmap_examples


def labeller(
    errors: pd.DataFrame,
    path: str | os.PathLike[str],
    show: Callable[[pd.Series], None] | None = None,
):
    """An ipywidgets form to label each error; every click of *Save* calls :func:`set_label`.

    Args:
        errors: from :func:`errors_at_max_accuracy`.
        path: the labels CSV (:func:`labels_path`); existing labels are pre-selected.
        show: called with the current error's row inside an output area (e.g. to draw the
            thumbnail and both heatmaps).

    Returns:
        The widget: display it in a notebook. It needs a live Jupyter front end; under papermill
        it renders as static text and saves nothing.
    """
    errors = errors.reset_index(drop=True)
    state = {"index": 0}
    title = widgets.HTML()
    category = widgets.Dropdown(description="category", layout=widgets.Layout(width="420px"))
    note = widgets.Text(description="note", placeholder="free text (required for 'other')")
    status = widgets.HTML()
    output = widgets.Output()
    previous = widgets.Button(description="previous", icon="arrow-left")
    following = widgets.Button(description="next", icon="arrow-right")
    save = widgets.Button(description="save", button_style="primary", icon="save")

    def current_label(row: pd.Series) -> pd.Series | None:
        labels = load_labels(path)
        match = labels[
            (labels["method"] == row["method"]) & (labels["image_id"] == row["image_id"])
        ]
        return None if match.empty else match.iloc[-1]

    def render() -> None:
        if errors.empty:
            title.value = "<b>No errors to label.</b>"
            return
        row = errors.iloc[state["index"]]
        title.value = (
            f"<b>{state['index'] + 1}/{len(errors)}</b> "
            f"{METHOD_NAMES.get(row['method'], row['method'])} {row['error']}: "
            f"<code>{row['image_id']}</code> (label {int(row['label'])}, "
            f"score {row['score']:.3f}, threshold {row['threshold']:.3f})"
        )
        category.options = CATEGORIES[row["error"]]
        saved = current_label(row)
        if saved is not None and saved["category"] in category.options:
            category.value = saved["category"]
            note.value = saved["note"]
            status.value = "saved label loaded"
        else:
            category.value = category.options[0]
            note.value = ""
            status.value = "<i>not labelled yet</i>"
        output.clear_output()
        if show is not None:
            with output:
                show(row)

    def move(step: int) -> None:
        if not errors.empty:
            state["index"] = (state["index"] + step) % len(errors)
            render()

    def on_save(_) -> None:
        if errors.empty:
            return
        row = errors.iloc[state["index"]]
        if category.value == OTHER and not note.value.strip():
            status.value = "<b>write a note for 'other'</b>"
            return
        set_label(path, row["method"], row["image_id"], row["error"], category.value, note.value)
        status.value = f"saved to {path}"

    previous.on_click(lambda _: move(-1))
    following.on_click(lambda _: move(1))
    save.on_click(on_save)
    render()
    form = widgets.VBox(
        [
            title,
            widgets.HBox([category, note]),
            widgets.HBox([previous, save, following]),
            status,
            output,
        ]
    )
    return form


def error_viewer(params: Params, predictions: Mapping[str, pd.DataFrame]) -> Callable:
    """A ``show`` callback for :func:`labeller`: displays the thumbnail and both heatmaps of the
    current error (SmoothGrad computed on first view, then cached)."""
    patches = load_patch_scores(params.run_dir) if "mil" in predictions else None

    def show(row: pd.Series) -> None:
        examples = heatmap_examples(params, [row["image_id"]], dict(predictions), patches)
        display(Image(data=png_bytes(heatmap_figure(examples))))

    return show

"""Error analysis (paper IV-D, Table III): false positives and negatives at the point of maximum
accuracy, manual labels sorting them into the paper's categories, and Table III.

Labels are human judgements, so they live outside ``runs/`` (``<evaluation.labels_dir>/
<experiment>.csv``, see :func:`labels_path`) and are written atomically by :func:`save_labels`;
notebook 07's widget (:func:`labeller`) only calls :func:`set_label`. A label is keyed by
``(method, image_id)``; labels of biopsies that are no longer errors (after retraining) are kept
in the file but not counted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from repro.config import Params, resolve_path
from repro.evaluation.metrics import max_accuracy_threshold
from repro.evaluation.tables import METHOD_NAMES
from repro.frames import require_columns
from repro.io.atomic import write_text_atomic

logger = logging.getLogger(__name__)

FALSE_POSITIVE = "false positive"
FALSE_NEGATIVE = "false negative"
OTHER = "other (see note)"

CATEGORIES: dict[str, tuple[str, ...]] = {
    FALSE_POSITIVE: (
        "normal mimicking tumour",
        "inflammation",
        "tissue artefacts",
        "bladder epithelium",
        "colon epithelium",
        OTHER,
    ),
    FALSE_NEGATIVE: (
        "little amount of tumour",
        "tissue artefacts",
        "low-grade tumour",
        "inflammation-like",
        "unclear reason",
        OTHER,
    ),
}
"""Table III's categories per error type, plus a free-text ``OTHER``."""

LABEL_COLUMNS = ["method", "image_id", "error", "category", "note"]
NOT_LABELLED = "not labelled yet"


# ----------------------------------------------------------------------------- errors


def find_errors(predictions: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """False positives and negatives when calling cancer at ``score >= threshold``.

    Args:
        predictions: columns image_id, label (0/1), score.
        threshold: from :func:`repro.evaluation.metrics.max_accuracy_threshold`.

    Returns:
        The erroneous rows with an ``error`` column (``"false positive"`` / ``"false negative"``),
        most confident errors first (false positives by decreasing score, then false negatives by
        increasing score).
    """
    require_columns(predictions, ["image_id", "label", "score"], "predictions")
    called = predictions["score"].to_numpy() >= threshold
    label = predictions["label"].to_numpy().astype(bool)
    errors = predictions.loc[called != label].copy()
    errors["error"] = np.where(errors["label"].astype(bool), FALSE_NEGATIVE, FALSE_POSITIVE)
    errors["confidence"] = np.where(
        errors["error"] == FALSE_POSITIVE, errors["score"], -errors["score"]
    )
    errors = errors.sort_values(["error", "confidence"], ascending=[False, False], kind="stable")
    return errors.drop(columns="confidence").reset_index(drop=True)


def operating_points(predictions: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per method: the maximum-accuracy threshold, its accuracy and the error counts."""
    rows = []
    for method, frame in predictions.items():
        threshold, accuracy = max_accuracy_threshold(frame["label"], frame["score"])
        errors = find_errors(frame, threshold)
        rows.append(
            {
                "method": method,
                "threshold": threshold,
                "accuracy": accuracy,
                "false_positives": int((errors["error"] == FALSE_POSITIVE).sum()),
                "false_negatives": int((errors["error"] == FALSE_NEGATIVE).sum()),
                "n_test": len(frame),
            }
        )
    return pd.DataFrame(rows)


def errors_at_max_accuracy(predictions: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Errors of each method at its own maximum-accuracy threshold.

    Args:
        predictions: method name (``"streaming"``, ``"mil"``) -> test predictions.

    Returns:
        Columns method, image_id, label, score, threshold, accuracy, error.
    """
    frames = []
    for method, frame in predictions.items():
        threshold, accuracy = max_accuracy_threshold(frame["label"], frame["score"])
        errors = find_errors(frame, threshold)
        errors.insert(0, "method", method)
        errors["threshold"] = threshold
        errors["accuracy"] = accuracy
        frames.append(
            errors[["method", "image_id", "label", "score", "threshold", "accuracy", "error"]]
        )
    if not frames:
        raise ValueError("predictions is empty: need at least one method")
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------- labels


def labels_path(params: Params) -> Path:
    """``<evaluation.labels_dir>/<experiment>.csv``."""
    return resolve_path(params.evaluation.labels_dir) / f"{params.experiment}.csv"


def empty_labels() -> pd.DataFrame:
    return pd.DataFrame({column: pd.Series(dtype=str) for column in LABEL_COLUMNS})


def load_labels(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The saved labels, or an empty table when the file does not exist yet.

    Raises:
        ValueError: the file lacks a column of :data:`LABEL_COLUMNS`, or has a category that is
            not one of :data:`CATEGORIES` for its error type.
    """
    path = Path(path)
    if not path.exists():
        return empty_labels()
    labels = pd.read_csv(path, dtype=str, keep_default_na=False)
    require_columns(labels, LABEL_COLUMNS, str(path))
    labels = labels[LABEL_COLUMNS]
    _check_categories(labels, str(path))
    return labels.reset_index(drop=True)


def save_labels(labels: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write labels atomically (:func:`repro.io.atomic.write_text_atomic`: a temporary file in
    the same folder, fsync, rename, fsync of the folder).

    A crash leaves either the old file or the new one, never a truncated mix. Rows are sorted by
    (method, image_id), one row per key (the last one wins).

    Raises:
        ValueError: missing columns or an unknown category (nothing is written).
    """
    path = Path(path)
    require_columns(labels, LABEL_COLUMNS, "labels")
    labels = labels[LABEL_COLUMNS].fillna("").astype(str)
    _check_categories(labels, "labels")
    labels = labels.drop_duplicates(["method", "image_id"], keep="last")
    labels = labels.sort_values(["method", "image_id"], kind="stable")
    write_text_atomic(path, labels.to_csv(index=False))
    return path


def set_label(
    path: str | os.PathLike[str],
    method: str,
    image_id: str,
    error: str,
    category: str,
    note: str = "",
) -> pd.DataFrame:
    """Record (or replace) the label of one error and save the file; returns all labels.

    Raises:
        ValueError: ``error`` is not a known error type, or ``category`` not one of its
            categories (nothing is written).
    """
    row = pd.DataFrame([[method, image_id, error, category, note]], columns=LABEL_COLUMNS)
    _check_categories(row, "label")
    labels = load_labels(path)
    keep = ~((labels["method"] == method) & (labels["image_id"] == image_id))
    labels = pd.concat([labels[keep], row], ignore_index=True)
    save_labels(labels, path)
    return load_labels(path)


# ----------------------------------------------------------------------------- Table III


def table_iii(
    errors: pd.DataFrame, labels: pd.DataFrame, methods: list[str] | None = None
) -> pd.DataFrame:
    """Table III: errors per category and method.

    Args:
        errors: from :func:`errors_at_max_accuracy` (method, image_id, error).
        labels: from :func:`load_labels`; labels of rows that are not in ``errors`` are ignored.
        methods: the count columns (default: the methods in ``errors``; pass them all so that a
            method without errors gets a column of zeros).

    Returns:
        One row per (error, category) with one count column per method, in the paper's order;
        errors without a label are counted under ``"not labelled yet"``; a row ``"total"`` per
        error type. With no label at all, only those two rows per error type (the number of
        errors per method).
    """
    require_columns(errors, ["method", "image_id", "error"], "errors")
    methods = list(dict.fromkeys(errors["method"])) if methods is None else list(methods)
    merged = errors[["method", "image_id", "error"]].merge(
        labels[["method", "image_id", "error", "category"]],
        on=["method", "image_id"],
        how="left",
        suffixes=("", "_labelled"),
    )
    # A label given for the other error type (a biopsy that flipped) does not count.
    stale = merged["error_labelled"].notna() & (merged["error_labelled"] != merged["error"])
    merged.loc[stale, "category"] = np.nan
    merged["category"] = merged["category"].replace("", np.nan).fillna(NOT_LABELLED)
    rows = []
    for error, categories in CATEGORIES.items():
        subset = merged[merged["error"] == error]
        for category in (*categories, NOT_LABELLED, "total"):
            counts = {}
            for method in methods:
                mine = subset[subset["method"] == method]
                counts[method] = (
                    len(mine) if category == "total" else int((mine["category"] == category).sum())
                )
            rows.append({"error": error, "category": category, **counts})
    table = pd.DataFrame(rows, columns=["error", "category", *methods])
    if not (merged["category"] != NOT_LABELLED).any():
        table = table[table["category"].isin([NOT_LABELLED, "total"])]
    else:
        optional = table["category"].isin([OTHER, NOT_LABELLED])
        table = table[~optional | (table[methods].sum(axis=1) > 0)]
    return table.reset_index(drop=True)


def table_iii_markdown(table: pd.DataFrame) -> str:
    """Table III laid out like the paper: a header row per error type with the totals."""
    methods = [c for c in table.columns if c not in ("error", "category")]
    lines = []
    for error in CATEGORIES:
        part = table[table["error"] == error]
        if part.empty:
            continue
        totals = part[part["category"] == "total"].iloc[0]
        header = [error.capitalize() + "s"] + [
            f"{METHOD_NAMES.get(m, m)} ({int(totals[m])})" for m in methods
        ]
        if lines:
            lines.append("")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + " --- |" * len(header))
        for _, row in part[part["category"] != "total"].iterrows():
            cells = [row["category"].capitalize()] + [str(int(row[m])) for m in methods]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- helpers


def _check_categories(labels: pd.DataFrame, name: str) -> None:
    for row in labels.itertuples(index=False):
        if row.error not in CATEGORIES:
            raise ValueError(
                f"{name}: error must be one of {list(CATEGORIES)}, got {row.error!r} "
                f"for {row.method} {row.image_id}"
            )
        if row.category not in CATEGORIES[row.error]:
            raise ValueError(
                f"{name}: category of a {row.error} must be one of "
                f"{list(CATEGORIES[row.error])}, got {row.category!r} "
                f"for {row.method} {row.image_id}"
            )

"""Where the slides and labels of a dataset come from: PANDA's ``train.csv`` or your own CSV.

``data.source: csv`` reads ``data.csv_path``, one row per slide:

==============  ========  ===============================================================
column          needed    meaning
==============  ========  ===============================================================
``slide``       yes       the slide file: absolute, or relative to the CSV's folder
``label``       yes       0 (benign) or 1 (cancer), e.g. from the pathology report
``patient_id``  no        slides of one patient go to one split (the paper split by patient)
``split``       no        ``train``, ``tune`` or ``test`` for every row: use this split
``mpp``         no        level-0 microns per pixel for slides whose file has none
==============  ========  ===============================================================

The image id of a slide is its file name without the suffix (or, when two slides share a name,
its path relative to the CSV with ``/`` replaced by ``__``). A CSV dataset has no Gleason
grades: negatives get primary pattern 0 and positives :data:`POSITIVE` (1), so stratification
and the Table I counts work per class (negative / positive). A row whose label is not 0 or 1
keeps label -1 and a status that says why; like PANDA rows with unknown grades it is left out.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

OK = "ok"
POSITIVE = 1
"""``primary_pattern`` of a positive slide without a Gleason pattern (CSV datasets)."""
SPLITS = ("train", "tune", "test")
REQUIRED_COLUMNS = ("slide", "label")
OPTIONAL_COLUMNS = ("patient_id", "split", "mpp")
SOURCE_COLUMNS = ["slide", "patient_id", "split", "backend"]
"""Manifest columns beyond :data:`repro.data.prepare.MANIFEST_COLUMNS`, kept when present: the
slide file and the CSV's patient and split (CSV datasets), the backend that read the slide."""


def read_csv_dataset(csv_path: str | os.PathLike[str]) -> pd.DataFrame:
    """The rows of a CSV dataset, ready for :func:`repro.data.prepare.prepare_dataset`.

    Returns:
        ``image_id, data_provider ("csv"), isup_grade, gleason_score`` (empty), ``label,
        primary_pattern, status, slide`` (absolute path) and ``patient_id, split, mpp`` (empty
        where not given).

    Raises:
        ValueError: naming the file (and row) for a missing column, an unknown split, a split
            given for only some rows, or an impossible mpp.
    """
    path = Path(csv_path)
    try:
        table = pd.read_csv(path, dtype={"slide": str, "patient_id": str, "split": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise ValueError(f"{path}: cannot read the dataset CSV: {error}") from None
    missing = [column for column in REQUIRED_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(
            f"{path}: missing columns {missing}; a dataset CSV needs {list(REQUIRED_COLUMNS)} "
            f"(optional: {list(OPTIONAL_COLUMNS)}), has {list(table.columns)}"
        )
    if table.empty:
        raise ValueError(f"{path}: no rows")
    for column in OPTIONAL_COLUMNS:
        if column not in table.columns:
            table[column] = np.nan
    if table["slide"].isna().any():
        row = int(np.flatnonzero(table["slide"].isna())[0]) + 2
        raise ValueError(f"{path}: line {row}: empty slide")
    slides = [_absolute(path.parent, slide) for slide in table["slide"]]
    twice = pd.Series([str(slide) for slide in slides]).duplicated()
    if twice.any():
        line = int(np.flatnonzero(twice)[0]) + 2
        raise ValueError(f"{path}: line {line}: slide {slides[line - 2]} is listed twice")
    rows = pd.DataFrame(
        {
            "image_id": image_ids(slides, path.parent),
            "data_provider": "csv",
            "isup_grade": np.nan,
            "gleason_score": np.nan,
            "slide": [str(slide) for slide in slides],
            "patient_id": table["patient_id"].astype("string").str.strip().replace("", pd.NA),
            "split": _splits(path, table["split"]),
            "mpp": _mpps(path, table["mpp"]),
        }
    )
    labels, statuses = [], []
    for value in table["label"]:
        label = _label(value)
        labels.append(-1 if label is None else label)
        statuses.append(OK if label is not None else f"label must be 0 or 1, got {value!r}")
    rows["label"] = labels
    rows["primary_pattern"] = [POSITIVE if x == 1 else (0 if x == 0 else -1) for x in labels]
    rows["status"] = statuses
    for row in rows.loc[rows["status"] != OK].itertuples():
        logger.warning("%s: %s (slide %s is left out)", path, row.status, row.slide)
    return rows


def image_ids(slides: list[Path], root: Path) -> list[str]:
    """File names without suffix; paths relative to ``root`` (``/`` -> ``__``) where two share
    a name."""
    stems = [Path(slide).stem for slide in slides]
    counts = pd.Series(stems).value_counts()
    ids = []
    for slide, stem in zip(slides, stems, strict=True):
        if counts[stem] == 1:
            ids.append(stem)
            continue
        try:
            relative = slide.relative_to(root)
        except ValueError:
            relative = Path(*slide.parts[1:])
        ids.append("__".join(relative.with_suffix("").parts))
    return ids


def _absolute(root: Path, slide: str) -> Path:
    path = Path(str(slide).strip()).expanduser()
    return path if path.is_absolute() else (root / path).resolve()


def _label(value: object) -> int | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number in (0.0, 1.0) else None


def _splits(path: Path, column: pd.Series) -> pd.Series:
    given = column.astype("string").str.strip().str.lower().replace("", pd.NA)
    if given.isna().all():
        return given
    if given.isna().any():
        line = int(np.flatnonzero(given.isna())[0]) + 2
        raise ValueError(
            f"{path}: line {line}: no split; give train/tune/test on every row or leave the "
            "split column out"
        )
    unknown = sorted(set(given) - set(SPLITS))
    if unknown:
        raise ValueError(f"{path}: split must be one of {list(SPLITS)}, got {unknown}")
    return given


def _mpps(path: Path, column: pd.Series) -> pd.Series:
    values = pd.to_numeric(column, errors="coerce")
    bad = column.notna() & ~(values > 0)
    if bad.any():
        line = int(np.flatnonzero(bad)[0]) + 2
        raise ValueError(
            f"{path}: line {line}: mpp must be a positive number, got {column[bad].iloc[0]!r}"
        )
    return values

"""Training / tuning / test split and the nested Table I subsets (paper III, III-C, Table I).

The paper split Radboud patients into training (4712 biopsies), tuning (497) and test (535)
sets, stratified on the primary Gleason pattern. PANDA publishes neither patient ids nor the test
set, so we split PANDA's Radboud images (or the synthetic set) per image: seeded (``run.seed``),
stratified on the primary pattern (negative, 3, 4, 5), with the paper's proportions
(``splits.tune_fraction`` = 497/5744, ``splits.test_fraction`` = 535/5744) scaled to the images
available. Biopsies of one patient can therefore land in different sets, which the paper avoided.
For small sets every class with at least three images gets at least one tuning and one test image.

The 5% (250) and 10% (500) training subsets: half negatives; positives stratified on the primary
pattern with equal numbers per pattern (Table I). They are nested by construction: every
training row gets a ``subset_rank`` from one seeded, interleaved order (negative, pattern 3,
negative, pattern 4, negative, pattern 5, ...; within a class a seeded shuffle), and the subset of
size k is ``subset_rank < k``. Every prefix of that order is as balanced as it can be; when a
pattern runs out, the others share its places. At 250 this gives 125 negatives and 42/42/41
positives; the paper's 5% set had 127 and 41/41/41 (51% negatives): equal positives, negatives
filling up. Only images whose manifest status is ``"ok"`` take part.

Datasets from a CSV (``data.source: csv``, :mod:`repro.data.sources`) may carry a ``patient_id``
per slide: then patients are split, not slides (stratified on each patient's highest class, the
fractions counting patients), so that no patient is in two sets, as in the paper. A CSV with a
``split`` column gives the split itself; it is used as it is (a patient in two of its sets is an
error). Their positives have no Gleason pattern (primary pattern 1): Table I then has a
``positive`` column, and the subsets are half negatives, half positives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from repro.config import Params, resolve_path
from repro.data.sources import POSITIVE
from repro.io.atomic import write_text_atomic

SPLITS = ("train", "tune", "test")
SPLIT_COLUMNS = [
    "image_id",
    "label",
    "primary_pattern",
    "isup_grade",
    "gleason_score",
    "split",
    "subset_rank",
]

PAPER_TABLE1 = pd.DataFrame(
    {
        "dataset": ["Training set", "Tuning set", "10% set", "5% set", "Test set"],
        "total": [4712, 497, 500, 250, 535],
        "negative_pct": [16, 39, 50, 51, 47],
        "pattern_3_pct": [32, 23, 17, 16, 25],
        "pattern_4_pct": [45, 29, 17, 16, 19],
        "pattern_5_pct": [7, 9, 17, 16, 9],
    }
)
"""Table I of the paper (percentages as printed)."""

PANDA_SUBSETS = {"10% set": 500, "5% set": 250}


def make_splits(manifest: pd.DataFrame, params: Params, write: bool = True) -> pd.DataFrame:
    """Split the manifest's ``ok`` images and rank the training images for the subsets.

    Args:
        manifest: from :func:`repro.data.prepare.prepare_dataset` / ``load_manifest``.
        params: ``splits.tune_fraction``, ``splits.test_fraction``,
            ``splits.subset_negative_fraction`` and ``run.seed`` are used.
        write: write ``<run_dir>/splits.csv`` (atomically).

    Returns:
        One row per image: :data:`SPLIT_COLUMNS`; ``subset_rank`` is -1 outside training.
    """
    usable = manifest.loc[manifest["status"] == "ok"].copy()
    if usable.empty:
        raise ValueError("no image with status 'ok' in the manifest; see notebook 01")
    for column in ("isup_grade", "gleason_score"):
        if column not in usable.columns:
            usable[column] = np.nan
    usable = usable.sort_values("image_id", kind="stable").reset_index(drop=True)
    usable["label"] = usable["label"].astype(int)
    usable["primary_pattern"] = usable["primary_pattern"].astype(int)
    seed = params.run.seed
    patients = patient_ids(usable)
    given = usable["split"] if "split" in usable.columns else pd.Series(np.nan, usable.index)
    if given.notna().all():
        usable["split"] = given.astype(str).str.strip().str.lower()
        check_patients(usable["split"], patients)
    elif patients is not None:
        usable["split"] = assign_patient_splits(
            usable["primary_pattern"].to_numpy(),
            patients.to_numpy(),
            params.splits.tune_fraction,
            params.splits.test_fraction,
            seed,
        )
    else:
        usable["split"] = assign_splits(
            usable["primary_pattern"].to_numpy(),
            params.splits.tune_fraction,
            params.splits.test_fraction,
            seed,
        )
    usable["subset_rank"] = -1
    train = usable["split"] == "train"
    usable.loc[train, "subset_rank"] = subset_ranks(
        usable.loc[train, "primary_pattern"].to_numpy(),
        seed,
        params.splits.subset_negative_fraction,
    )
    columns = SPLIT_COLUMNS + (["patient_id"] if patients is not None else [])
    if patients is not None:
        usable["patient_id"] = patients
    splits = usable[columns].reset_index(drop=True)
    if write:
        write_text_atomic(splits_path(params), splits.to_csv(index=False))
    return splits


def assign_splits(
    patterns: np.ndarray, tune_fraction: float, test_fraction: float, seed: int
) -> np.ndarray:
    """``"train"``/``"tune"``/``"test"`` per item, stratified on ``patterns``.

    Per stratum, the tuning and test counts follow the fractions (largest remainders, so the
    totals are ``round(n * fraction)``), with at least one each in a stratum of three or more.
    """
    patterns = np.asarray(patterns)
    strata = sorted(set(patterns.tolist()))
    sizes = {s: int((patterns == s).sum()) for s in strata}
    tune = _allocate(sizes, tune_fraction, {s: 0 for s in strata})
    test = _allocate(sizes, test_fraction, tune)
    rng = np.random.default_rng([seed, 0])
    out = np.full(len(patterns), "train", dtype=object)
    for stratum in strata:
        members = np.flatnonzero(patterns == stratum)
        members = members[rng.permutation(len(members))]
        out[members[: tune[stratum]]] = "tune"
        out[members[tune[stratum] : tune[stratum] + test[stratum]]] = "test"
    return out


def patient_ids(table: pd.DataFrame) -> pd.Series | None:
    """The ``patient_id`` column as strings (a slide without one is its own patient), or None
    when the table has no patient ids at all."""
    if "patient_id" not in table.columns or table["patient_id"].isna().all():
        return None
    patients = table["patient_id"].astype("string").str.strip()
    own = "slide:" + table["image_id"].astype(str)
    return patients.where(patients.notna() & (patients != ""), own).astype(str)


def assign_patient_splits(
    patterns: np.ndarray,
    patients: np.ndarray,
    tune_fraction: float,
    test_fraction: float,
    seed: int,
) -> np.ndarray:
    """:func:`assign_splits` over patients: every slide gets its patient's split.

    A patient's stratum is the highest primary pattern among its slides (any cancer makes it a
    cancer patient); the fractions are fractions of patients.
    """
    patterns = np.asarray(patterns)
    patients = np.asarray(patients).astype(str)
    unique, inverse = np.unique(patients, return_inverse=True)
    strata = np.zeros(len(unique), dtype=int)
    np.maximum.at(strata, inverse, patterns)
    per_patient = assign_splits(strata, tune_fraction, test_fraction, seed)
    return per_patient[inverse]


def check_patients(split: pd.Series, patients: pd.Series | None) -> None:
    """Raise ``ValueError`` for an unknown split name or a patient in two sets."""
    unknown = sorted(set(split) - set(SPLITS))
    if unknown:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {unknown}")
    if patients is None:
        return
    sets = pd.DataFrame({"patient": patients, "split": split}).groupby("patient")["split"]
    mixed = sets.nunique()
    mixed = mixed[mixed > 1]
    if not mixed.empty:
        patient = mixed.index[0]
        found = sorted(set(sets.get_group(patient)))
        raise ValueError(
            f"the given split puts patient {patient!r} in {found}; "
            f"{len(mixed)} patient(s) are in more than one set"
        )


def _allocate(sizes: dict, fraction: float, taken: dict) -> dict:
    """Counts per stratum summing to ``round(total * fraction)`` (or more, for the minimum of
    one per stratum of >= 3), leaving at least one item per stratum for training."""
    exact = {s: n * fraction for s, n in sizes.items()}
    room = {s: max(0, n - taken[s] - 1) for s, n in sizes.items()}
    counts = {s: min(math.floor(exact[s]), room[s]) for s in sizes}
    for s, n in sizes.items():
        if n >= 3 and counts[s] == 0 and room[s] > 0:
            counts[s] = 1
    target = round(sum(sizes.values()) * fraction)
    while sum(counts.values()) < target:
        candidates = [s for s in sizes if counts[s] < room[s]]
        if not candidates:
            break
        best = max(candidates, key=lambda s: (exact[s] - counts[s], sizes[s]))
        counts[best] += 1
    return counts


def subset_ranks(patterns: np.ndarray, seed: int, negative_fraction: float = 0.5) -> np.ndarray:
    """The Table I subset order of the training items: ``rank[i]`` = position of item ``i``.

    The order interleaves negatives (pattern 0) and positives so that after ``k`` items
    ``ceil(k * negative_fraction)`` are negative (while negatives last); positives take the
    pattern with the fewest places so far (ties: 3, 4, 5). Within a class the order is a seeded
    shuffle. The subset of size ``k`` (``rank < k``) is thus nested in every larger one.
    """
    patterns = np.asarray(patterns)
    rng = np.random.default_rng([seed, 1])
    queues: dict[int, list[int]] = {}
    for pattern in sorted(set(patterns.tolist())):
        members = np.flatnonzero(patterns == pattern)
        queues[pattern] = list(members[rng.permutation(len(members))])
    positives = [p for p in queues if p != 0]
    taken = dict.fromkeys(queues, 0)
    order: list[int] = []
    for k in range(len(patterns)):
        negatives_left = taken.get(0, 0) < len(queues.get(0, []))
        positives_left = [p for p in positives if taken[p] < len(queues[p])]
        want_negative = taken.get(0, 0) < math.ceil((k + 1) * negative_fraction)
        if negatives_left and (want_negative or not positives_left):
            choice = 0
        else:
            choice = min(positives_left, key=lambda p: (taken[p], p))
        order.append(queues[choice][taken[choice]])
        taken[choice] += 1
    ranks = np.empty(len(patterns), dtype=int)
    ranks[np.asarray(order, dtype=int)] = np.arange(len(order))
    return ranks


def splits_path(params: Params) -> Path:
    """The experiment's ``splits.csv`` (:class:`repro.layout.RunLayout`)."""
    return params.layout.splits


def load_splits(params: Params) -> pd.DataFrame:
    """The whole ``<run_dir>/splits.csv`` (written by notebook 02)."""
    path = splits_path(params)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run notebook 02 (make_splits) first")
    return pd.read_csv(path, dtype={"image_id": str, "gleason_score": str})


def load_split(params: Params, split: str) -> pd.DataFrame:
    """Rows of one split; for ``"train"`` only the ``splits.subset_size`` subset when it is set.

    The rows carry ``image_id``, ``label``, ``primary_pattern`` (and the rest of
    :data:`SPLIT_COLUMNS`), in a fixed order (subset rank for training, image id otherwise).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    table = load_splits(params)
    rows = table.loc[table["split"] == split]
    if split == "train":
        rows = rows.sort_values("subset_rank", kind="stable")
        size = params.splits.subset_size
        if size is not None:
            if size > len(rows):
                raise ValueError(
                    f"splits.subset_size is {size} but the training set has only {len(rows)} "
                    f"images ({splits_path(params)})"
                )
            rows = rows.loc[rows["subset_rank"] < size]
    return rows.reset_index(drop=True)


def table1_subsets(params: Params) -> dict[str, int]:
    """The subsets Table I shows for these params: PANDA's 10% and 5% sets, or the params'
    ``subset_size`` (if set) for a synthetic set."""
    size = params.splits.subset_size
    if params.data.source == "panda":
        subsets = dict(PANDA_SUBSETS)
        if size is not None and size not in subsets.values():
            subsets[f"subset ({size})"] = size
        return subsets
    return {f"subset ({size})": size} if size is not None else {}


def table1(
    splits: pd.DataFrame, subsets: Mapping[str, int] | Sequence[int] | None = None
) -> pd.DataFrame:
    """Table I: counts and percentages per set (negative, primary pattern 3, 4, 5).

    Args:
        splits: from :func:`make_splits` / :func:`load_splits`.
        subsets: training subsets to include, by name (``{"10% set": 500, "5% set": 250}``) or
            as sizes; subsets larger than the training set are left out.

    Returns:
        Columns ``dataset, total, negative, pattern_3, pattern_4, pattern_5`` (counts) and the
        same with ``_pct`` (percent of the set's total), in the paper's row order.
    """
    if subsets is None:
        subsets = {}
    if not isinstance(subsets, Mapping):
        subsets = {f"subset ({size})": int(size) for size in subsets}
    train = splits.loc[splits["split"] == "train"]
    sets: list[tuple[str, pd.DataFrame]] = [
        ("Training set", train),
        ("Tuning set", splits.loc[splits["split"] == "tune"]),
    ]
    for name, size in subsets.items():
        if size <= len(train):
            sets.append((name, train.loc[train["subset_rank"] < size]))
    sets.append(("Test set", splits.loc[splits["split"] == "test"]))
    records = []
    names = {0: "negative", 3: "pattern_3", 4: "pattern_4", 5: "pattern_5"}
    if (splits["primary_pattern"] == POSITIVE).any():
        names[POSITIVE] = "positive"  # CSV datasets: cancer without a Gleason pattern
    for name, rows in sets:
        counts = rows["primary_pattern"].value_counts()
        record: dict[str, object] = {"dataset": name, "total": len(rows)}
        for pattern, column in names.items():
            record[column] = int(counts.get(pattern, 0))
        for column in names.values():
            share = 100 * record[column] / len(rows) if len(rows) else float("nan")
            record[f"{column}_pct"] = round(share, 1)
        records.append(record)
    return pd.DataFrame(records)


def table1_markdown(table: pd.DataFrame, title: str = "") -> str:
    """Table I as a markdown table, cells ``percent (count)`` (just the percentage when the
    table has no count columns, like :data:`PAPER_TABLE1`)."""
    lines = [
        f"**{title}**\n" if title else "",
    ]
    columns = ["negative", "pattern_3", "pattern_4", "pattern_5"]
    header = "| Dataset | Total | Negative | 3 | 4 | 5 |"
    if "positive_pct" in table.columns:
        columns.append("positive")
        header += " Positive (no pattern) |"
    lines += [header, "| --- | ---: |" + " ---: |" * len(columns)]
    counts = all(column in table.columns for column in columns)
    for row in table.itertuples(index=False):
        cells = [
            f"{getattr(row, f'{c}_pct'):.0f}%" + (f" ({getattr(row, c)})" if counts else "")
            for c in columns
        ]
        lines.append(f"| {row.dataset} | {row.total} | " + " | ".join(cells) + " |")
    return "\n".join(line for line in lines if line) + "\n"


def save_table1(table: pd.DataFrame, params: Params) -> dict[str, Path]:
    """Write ``<figures_dir>/table1_<experiment>.csv`` and ``.md`` (atomically)."""
    stem = resolve_path(params.evaluation.figures_dir) / f"table1_{params.experiment}"
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    write_text_atomic(csv_path, table.to_csv(index=False))
    title = f"Table I ({params.experiment}): distribution over the primary Gleason pattern"
    write_text_atomic(md_path, table1_markdown(table, title))
    return {"csv": csv_path, "md": md_path}

"""Test-set evaluation across experiments (paper IV-C, V): predictions, Table II, Fig. 3 inputs.

Notebook 05 of each experiment runs both final models on the test set and writes
``runs/<experiment>/{streaming,mil}/predictions_test.csv`` (image_id, label, score; MIL also
``mil/patch_scores_test.csv``: image_id, x, y, score). Table II then gathers every run under
``run.out_dir`` that was evaluated on the same test set: same prepared dataset
(``data.prepared_dir``), same split settings (``run.seed``, tune and test fractions, read from
the run's resolved ``params.yaml``) and the same test image ids.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from repro.config import Params, load_params, resolve_path
from repro.evaluation.metrics import auc_with_ci, delong_test, paired_bootstrap_test
from repro.exceptions import ParamsError
from repro.layout import METHODS, RunLayout

logger = logging.getLogger(__name__)

METHOD_NAMES = {"streaming": "Streaming", "mil": "MIL"}
PREDICTION_COLUMNS = ["image_id", "label", "score"]
PATCH_COLUMNS = ["image_id", "x", "y", "score"]

PAPER_TABLE_II: dict[int | None, dict[str, tuple[float, float, float]]] = {
    None: {"streaming": (0.992, 0.985, 0.997), "mil": (0.990, 0.984, 0.995)},
    500: {"streaming": (0.982, 0.972, 0.990), "mil": (0.981, 0.970, 0.990)},
    250: {"streaming": (0.971, 0.960, 0.982), "mil": (0.965, 0.949, 0.978)},
}
"""Table II of the paper by training-subset size (None = whole set): AUC (low, high)."""
PAPER_BULTEN = (0.990, 0.982, 0.996)
PAPER_SUBSET_NAMES = {None: "Whole set", 500: "10% set", 250: "5% set"}


# ----------------------------------------------------------------------------- files


def predictions_path(run_dir: str | os.PathLike[str], method: str, split: str = "test") -> Path:
    """A method's predictions of a split in a run directory."""
    return RunLayout(Path(run_dir)).method(method).predictions(split)


def patch_scores_path(run_dir: str | os.PathLike[str], split: str = "test") -> Path:
    """MIL's patch probabilities of a split in a run directory."""
    return RunLayout(Path(run_dir)).mil.patch_scores(split)


def load_predictions(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Predictions CSV (image_id, label, score), checked: one row per image, 0/1 labels.

    Raises:
        ValueError: missing columns, duplicated image ids, labels other than 0/1.
    """
    frame = pd.read_csv(path, dtype={"image_id": str})
    missing = [c for c in PREDICTION_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}, got {list(frame.columns)}")
    duplicated = frame["image_id"][frame["image_id"].duplicated()].tolist()
    if duplicated:
        raise ValueError(f"{path}: image ids occur twice: {duplicated[:5]}")
    if not frame["label"].isin([0, 1]).all():
        raise ValueError(f"{path}: labels must be 0/1, got {sorted(frame['label'].unique())}")
    return frame


def load_patch_scores(run_dir: str | os.PathLike[str], split: str = "test") -> pd.DataFrame:
    """MIL patch probabilities of a run (image_id, x, y, score)."""
    return pd.read_csv(patch_scores_path(run_dir, split), dtype={"image_id": str})


# ----------------------------------------------------------------------------- runs


@dataclass
class RunInfo:
    """One experiment's evaluated run."""

    experiment: str
    run_dir: Path
    params: Params
    n_train: int
    predictions: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def subset_size(self) -> int | None:
        return self.params.splits.subset_size

    @property
    def training_set(self) -> str:
        """Row name of Table II: the paper's names on PANDA, otherwise the size."""
        if self.params.data.source == "panda" and self.subset_size in PAPER_SUBSET_NAMES:
            return PAPER_SUBSET_NAMES[self.subset_size]
        if self.subset_size is None:
            return "Whole set"
        return f"Subset of {self.subset_size}"


def read_run_params(run_dir: str | os.PathLike[str]) -> Params | None:
    """The resolved params of a run: the first of ``streaming/params.yaml``, ``mil/params.yaml``,
    ``params.yaml`` under ``run_dir``; None when there is none (or it does not load)."""
    for path in RunLayout(Path(run_dir)).params_candidates():
        if path.exists():
            try:
                return load_params(path)
            except ParamsError as error:
                logger.warning("%s: skipped, params do not load: %s", path, error)
                return None
    return None


def same_test_set(a: Params, b: Params) -> bool:
    """Whether two experiments split the same prepared dataset the same way."""
    return (
        resolve_path(a.data.prepared_dir).resolve() == resolve_path(b.data.prepared_dir).resolve()
        and a.run.seed == b.run.seed
        and math.isclose(a.splits.test_fraction, b.splits.test_fraction)
        and math.isclose(a.splits.tune_fraction, b.splits.tune_fraction)
    )


def find_runs(params: Params) -> list[RunInfo]:
    """Every run under ``run.out_dir`` evaluated on ``params``' test set, whole set first, then
    by decreasing training-set size.

    A run counts when its params match (:func:`same_test_set`; this experiment's own params are
    used for itself) and it has test predictions of at least one method whose image ids equal
    those of this experiment's predictions.
    """
    root = resolve_path(params.run.out_dir)
    own = params.run_dir.resolve()
    reference_ids = _test_ids(own)
    runs = []
    for run_dir in sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []:
        is_own = run_dir.resolve() == own
        run_params = params if is_own else read_run_params(run_dir)
        if run_params is None:
            if any(predictions_path(run_dir, m).exists() for m in METHODS):
                logger.info("%s: no params.yaml, not in Table II", run_dir.name)
            continue
        if not same_test_set(params, run_params):
            continue
        predictions = {
            method: load_predictions(predictions_path(run_dir, method))
            for method in METHODS
            if predictions_path(run_dir, method).exists()
        }
        if not predictions:
            continue
        ids = {frozenset(frame["image_id"]) for frame in predictions.values()}
        if reference_ids is not None and ids != {reference_ids}:
            logger.warning("%s: different test images than %s, skipped", run_dir.name, own.name)
            continue
        n_train = _training_set_size(run_params, run_dir)
        runs.append(RunInfo(run_params.experiment, run_dir, run_params, n_train, predictions))
    runs.sort(key=lambda r: (r.subset_size is not None, -(r.n_train or 0), r.experiment))
    return runs


def _test_ids(run_dir: Path) -> frozenset[str] | None:
    for method in METHODS:
        path = predictions_path(run_dir, method)
        if path.exists():
            return frozenset(load_predictions(path)["image_id"])
    return None


def _training_set_size(params: Params, run_dir: Path) -> int:
    """Training biopsies used by a run (its subset when it has one), from its splits.csv."""
    splits = RunLayout(run_dir).splits
    if not splits.exists():
        return params.splits.subset_size or 0
    frame = pd.read_csv(splits)
    train = frame[frame["split"] == "train"]
    size = params.splits.subset_size
    return len(train) if size is None else min(size, len(train))


# ----------------------------------------------------------------------------- tables


def table_ii(runs: list[RunInfo], n_bootstrap: int = 10000, seed: int = 0) -> pd.DataFrame:
    """Table II: test AUC with bootstrap 95% CI per run (rows) and method (columns).

    Columns: training_set, experiment, n_train, n_test, then ``<method>_auc``, ``_low``, ``_high``
    per method, and ``paper_<method>`` (the paper's value as text) on PANDA.
    """
    rows = []
    for run in runs:
        row = {
            "training_set": run.training_set,
            "experiment": run.experiment,
            "n_train": run.n_train,
            "n_test": max(len(frame) for frame in run.predictions.values()),
        }
        for method in METHODS:
            frame = run.predictions.get(method)
            result = (
                auc_with_ci(frame["label"], frame["score"], n_bootstrap, seed)
                if frame is not None
                else (math.nan,) * 3
            )
            row.update(
                zip((f"{method}_auc", f"{method}_low", f"{method}_high"), result, strict=True)
            )
        if run.params.data.source == "panda" and run.subset_size in PAPER_TABLE_II:
            for method in METHODS:
                row[f"paper_{method}"] = format_auc(*PAPER_TABLE_II[run.subset_size][method])
        rows.append(row)
    return pd.DataFrame(rows)


def paired_comparisons(
    runs: list[RunInfo], n_bootstrap: int = 10000, seed: int = 0
) -> pd.DataFrame:
    """Streaming vs. MIL on the same test set, per run with both: the AUC difference (streaming -
    MIL) with its paired-bootstrap 95% CI and p-value, and DeLong's p-value."""
    rows = []
    for run in runs:
        if not all(method in run.predictions for method in METHODS):
            continue
        merged = run.predictions["streaming"].merge(
            run.predictions["mil"], on="image_id", suffixes=("_streaming", "_mil")
        )
        if not (merged["label_streaming"] == merged["label_mil"]).all():
            raise ValueError(f"{run.experiment}: streaming and MIL disagree on test labels")
        y_true = merged["label_streaming"].to_numpy()
        a, b = merged["score_streaming"].to_numpy(), merged["score_mil"].to_numpy()
        boot = paired_bootstrap_test(y_true, a, b, n_bootstrap, seed)
        delong = delong_test(y_true, a, b)
        rows.append(
            {
                "training_set": run.training_set,
                "experiment": run.experiment,
                "n_test": len(merged),
                "auc_streaming": delong.auc_a,
                "auc_mil": delong.auc_b,
                "difference": boot.difference,
                "low": boot.low,
                "high": boot.high,
                "p_bootstrap": boot.p_value,
                "p_delong": delong.p_value,
            }
        )
    return pd.DataFrame(rows)


def format_auc(auc: float, low: float, high: float) -> str:
    """``0.992 (0.985–0.997)``, the paper's format; an en dash for a missing value."""
    if any(math.isnan(v) for v in (auc, low, high)):
        return "–"
    return f"{auc:.3f} ({low:.3f}–{high:.3f})"


def table_ii_display(table: pd.DataFrame, bulten: bool | None = None) -> pd.DataFrame:
    """Table II with formatted AUC cells, for markdown and notebooks; on PANDA (when the table has
    paper columns) with the Bulten et al. row."""
    columns = {
        "training_set": "Training set",
        "experiment": "Experiment",
        "n_train": "n train",
        "n_test": "n test",
    }
    shown = table[list(columns)].rename(columns=columns)
    for method in METHODS:
        shown[f"{METHOD_NAMES[method]} AUC (95% CI)"] = [
            format_auc(*values)
            for values in table[[f"{method}_auc", f"{method}_low", f"{method}_high"]].to_numpy()
        ]
    has_paper = any(f"paper_{m}" in table.columns for m in METHODS)
    if has_paper:
        for method in METHODS:
            shown[f"Paper {METHOD_NAMES[method]}"] = table.get(f"paper_{method}", "–").fillna("–")
    if bulten if bulten is not None else has_paper:
        extra = dict.fromkeys(shown.columns, "–")
        extra.update({"Training set": "Bulten et al. [8]", "Experiment": "(paper)"})
        extra["Paper Streaming"] = format_auc(*PAPER_BULTEN)
        shown = pd.concat([shown, pd.DataFrame([extra])], ignore_index=True)
    return shown


# ----------------------------------------------------------------------------- notebook 05


def load_run_predictions(params: Params) -> dict[str, pd.DataFrame]:
    """This experiment's saved test predictions, by method (those that exist)."""
    return {
        method: load_predictions(predictions_path(params.run_dir, method))
        for method in METHODS
        if predictions_path(params.run_dir, method).exists()
    }

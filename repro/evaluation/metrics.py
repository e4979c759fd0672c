"""Test-set metrics of the paper's evaluation (IV-C, IV-D): ROC AUC with a bootstrap confidence
interval, paired comparisons of two models on the same test set, and the maximum-accuracy
operating point used for the error analysis (Table III).

Every function takes ``y_true`` (0/1 labels, 1 = cancer) and one or two ``y_score`` arrays (any
monotone score: probabilities or logits) of the same length. Inputs are validated up front; when
``y_true`` holds one class only the ROC analysis is undefined, so the functions warn with
:class:`sklearn.exceptions.UndefinedMetricWarning` and return NaN, as
:func:`sklearn.metrics.roc_auc_score` does.

The bootstrap is vectorised: the resampled test sets are an ``(n_bootstrap, n)`` index matrix
(:func:`bootstrap_indices`), and each resample's AUC is the Mann-Whitney statistic (rank-sum with
mid-ranks for ties) computed from how often each case was drawn, so 10,000 resamples of the
paper's 535 test biopsies take a fraction of a second (``benchmarks/bootstrap.py``).
"""

from __future__ import annotations

import numbers
import warnings
from typing import NamedTuple

import numpy as np
from scipy.stats import norm
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

__all__ = [
    "AUCResult",
    "DeLongResult",
    "PairedBootstrapResult",
    "ThresholdResult",
    "auc_with_ci",
    "bootstrap_aucs",
    "bootstrap_indices",
    "confusion_at_threshold",
    "delong_test",
    "max_accuracy_threshold",
    "paired_bootstrap_test",
]

_MAX_REDRAWS = 1000


class AUCResult(NamedTuple):
    """ROC AUC and its bootstrap confidence interval."""

    auc: float
    low: float
    high: float


class PairedBootstrapResult(NamedTuple):
    """Paired bootstrap of ``AUC(a) - AUC(b)`` on the same resampled test sets."""

    difference: float  # AUC(a) - AUC(b) on the test set itself
    low: float  # confidence interval of the difference (percentiles of the resampled ones)
    high: float
    p_value: float  # two-sided, H0: equal AUC


class DeLongResult(NamedTuple):
    """DeLong's test for two correlated ROC AUCs (DeLong, DeLong & Clarke-Pearson, 1988)."""

    auc_a: float
    auc_b: float
    difference: float  # auc_a - auc_b
    std_error: float  # of the difference
    z: float
    p_value: float  # two-sided


class ThresholdResult(NamedTuple):
    """Operating point of maximum accuracy: predict cancer when ``score >= threshold``."""

    threshold: float
    accuracy: float


# ----------------------------------------------------------------------------- validation


def _check_labels(y_true) -> np.ndarray:
    """1-D 0/1 labels (bool, int or float holding 0 and 1), or a ValueError echoing the input."""
    y_true = np.asarray(y_true)
    if y_true.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got y_true.shape={y_true.shape}")
    if y_true.size == 0:
        raise ValueError("y_true is empty: need at least one case")
    if y_true.dtype.kind not in "biuf":
        raise ValueError(f"y_true must hold 0/1 labels, got dtype={y_true.dtype}")
    values = np.unique(y_true)
    if not np.isin(values, (0, 1)).all():
        raise ValueError(f"y_true must hold 0/1 labels, got values {values[:10].tolist()}")
    return y_true.astype(np.int64)


def _check_labels_and_scores(
    y_true, y_score, *, score_name: str = "y_score"
) -> tuple[np.ndarray, np.ndarray]:
    """1-D 0/1 labels and finite numeric scores of the same length, or a ValueError."""
    y_true = _check_labels(y_true)
    y_score = np.asarray(y_score)
    if y_score.ndim != 1:
        raise ValueError(f"{score_name} must be 1-D, got {score_name}.shape={y_score.shape}")
    if y_true.shape != y_score.shape:
        raise ValueError(
            f"y_true and {score_name} must have the same length, got y_true.shape={y_true.shape} "
            f"and {score_name}.shape={y_score.shape}"
        )
    if y_score.dtype.kind not in "biuf":
        raise ValueError(f"{score_name} must be numeric, got dtype={y_score.dtype}")
    if not np.isfinite(y_score).all():
        bad = int((~np.isfinite(y_score)).sum())
        raise ValueError(f"{score_name} must be finite, got {bad} NaN or infinite values")
    return y_true, y_score.astype(np.float64)


def _check_n_bootstrap(n_bootstrap) -> int:
    if (
        not isinstance(n_bootstrap, numbers.Integral)
        or isinstance(n_bootstrap, bool)
        or n_bootstrap < 1
    ):
        raise ValueError(f"n_bootstrap must be a positive integer, got {n_bootstrap!r}")
    return int(n_bootstrap)


def _check_confidence(confidence) -> float:
    if not isinstance(confidence, numbers.Real) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return float(confidence)


def _has_both_classes(y_true: np.ndarray, what: str) -> bool:
    if 0 < y_true.sum() < y_true.size:
        return True
    warnings.warn(
        f"Only one class is present in y_true (got {y_true.size} cases with label "
        f"{int(y_true[0])}). {what} is not defined in that case.",
        UndefinedMetricWarning,
        stacklevel=3,
    )
    return False


# ----------------------------------------------------------------------------- bootstrap


def bootstrap_indices(y_true, n_bootstrap: int = 10000, seed=0) -> np.ndarray:
    """Index matrix of bootstrap resamples of a test set, stratification-free as in the paper.

    Row ``b`` holds ``n = len(y_true)`` case indices drawn uniformly with replacement. A resample
    holding one class only (its AUC is undefined) is **redrawn** until it holds both, so there are
    exactly ``n_bootstrap`` valid rows; with a test set of hundreds of cases this never happens.

    Args:
        y_true: 0/1 labels of the test set, holding both classes.
        n_bootstrap: number of resamples (paper: 10,000).
        seed: seed of :func:`numpy.random.default_rng` (or a Generator).

    Returns:
        ``int64`` array of shape ``(n_bootstrap, n)``.

    Raises:
        ValueError: invalid labels, ``n_bootstrap``, or ``y_true`` with one class only.
    """
    y_true = _check_labels(y_true)
    n_bootstrap = _check_n_bootstrap(n_bootstrap)
    if not 0 < y_true.sum() < y_true.size:
        raise ValueError(
            f"y_true holds one class only (got {y_true.size} cases with label {int(y_true[0])}): "
            "no resample can hold both classes"
        )
    rng = np.random.default_rng(seed)
    n = y_true.size
    indices = rng.integers(0, n, size=(n_bootstrap, n))
    for _ in range(_MAX_REDRAWS):
        positives = y_true[indices].sum(axis=1)
        invalid = np.flatnonzero((positives == 0) | (positives == n))
        if invalid.size == 0:
            return indices
        indices[invalid] = rng.integers(0, n, size=(invalid.size, n))
    raise RuntimeError(
        f"could not draw resamples holding both classes in {_MAX_REDRAWS} rounds "
        f"(n={n}, positives={int(y_true.sum())})"
    )


def bootstrap_aucs(y_true, y_score, indices: np.ndarray) -> np.ndarray:
    """ROC AUC of each resample ``y_true[indices[b]], y_score[indices[b]]``, vectorised.

    A resample is summarised by how often it drew each case. Cases are grouped by tied score and
    sorted, so the Mann-Whitney statistic of resample ``b`` is
    ``sum over groups g of pos[b, g] * (neg[b, < g] + neg[b, g] / 2)``, divided by the numbers of
    positives and negatives drawn: the rank-sum form of the AUC with mid-ranks for ties, equal to
    the trapezoidal area under the ROC curve that :func:`sklearn.metrics.roc_auc_score` returns.

    Args:
        y_true: 0/1 labels of the test set.
        y_score: scores of the test set.
        indices: ``(n_bootstrap, n_draws)`` integer matrix of case indices, each row holding both
            classes (e.g. from :func:`bootstrap_indices`).

    Returns:
        ``float64`` array of shape ``(n_bootstrap,)``.
    """
    y_true, y_score = _check_labels_and_scores(y_true, y_score)
    indices = np.asarray(indices)
    if indices.ndim != 2 or indices.dtype.kind not in "iu":
        raise ValueError(
            f"indices must be a 2-D integer matrix, got indices.shape={indices.shape} "
            f"and dtype={indices.dtype}"
        )
    if indices.size and (indices.min() < 0 or indices.max() >= y_true.size):
        raise ValueError(
            f"indices must lie in [0, {y_true.size}), got values in "
            f"[{indices.min()}, {indices.max()}]"
        )
    n_rows = indices.shape[0]
    order = np.argsort(y_score, kind="stable")
    sorted_scores = y_score[order]
    new_group = np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]
    group = np.empty(y_true.size, dtype=np.int64)
    group[order] = np.cumsum(new_group) - 1
    n_groups = int(new_group.sum())
    # One bin per (resample, score group, class); counting them is a single bincount.
    code = 2 * group + y_true
    flat = code[indices] + (2 * n_groups * np.arange(n_rows))[:, None]
    counts = np.bincount(flat.ravel(), minlength=2 * n_groups * n_rows)
    counts = counts.reshape(n_rows, n_groups, 2).astype(np.float64)
    negatives, positives = counts[..., 0], counts[..., 1]
    negatives_below = np.cumsum(negatives, axis=1) - negatives
    u_statistic = (positives * (negatives_below + 0.5 * negatives)).sum(axis=1)
    n_positive = positives.sum(axis=1)
    n_negative = negatives.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return u_statistic / (n_positive * n_negative)


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def auc_with_ci(
    y_true, y_score, n_bootstrap: int = 10000, seed=0, *, confidence: float = 0.95
) -> AUCResult:
    """ROC AUC with a bootstrap confidence interval (paper IV-C).

    The point estimate is :func:`sklearn.metrics.roc_auc_score` on the test set. The interval
    resamples the test set with replacement at its own size ``n_bootstrap`` times (resamples with
    one class only are redrawn, see :func:`bootstrap_indices`) and takes the 2.5 and 97.5
    percentiles of the resampled AUCs (for ``confidence=0.95``).

    Args:
        y_true: 0/1 labels (1 = cancer), shape ``(n,)``.
        y_score: scores of the positive class, shape ``(n,)``.
        n_bootstrap: number of resamples (paper: 10,000).
        seed: seed of the resampling (:func:`numpy.random.default_rng`).
        confidence: coverage of the interval.

    Returns:
        ``AUCResult(auc, low, high)``, a named tuple; all NaN (with an
        :class:`~sklearn.exceptions.UndefinedMetricWarning`) when ``y_true`` holds one class.

    Raises:
        ValueError: invalid labels or scores (shape, values), ``n_bootstrap`` or ``confidence``.
    """
    y_true, y_score = _check_labels_and_scores(y_true, y_score)
    n_bootstrap = _check_n_bootstrap(n_bootstrap)
    confidence = _check_confidence(confidence)
    if not _has_both_classes(y_true, "ROC AUC"):
        return AUCResult(np.nan, np.nan, np.nan)
    auc = float(roc_auc_score(y_true, y_score))
    aucs = bootstrap_aucs(y_true, y_score, bootstrap_indices(y_true, n_bootstrap, seed))
    return AUCResult(auc, *_percentile_interval(aucs, confidence))


def paired_bootstrap_test(
    y_true,
    y_score_a,
    y_score_b,
    n_bootstrap: int = 10000,
    seed=0,
    *,
    confidence: float = 0.95,
) -> PairedBootstrapResult:
    """Paired bootstrap comparison of two models' ROC AUC on the same test set.

    Both models are scored on the same resamples (:func:`bootstrap_indices`), which keeps the
    correlation between their errors. The interval is the percentile interval of the resampled
    differences ``d*``; the two-sided p-value tests ``H0: AUC(a) = AUC(b)`` with the resampled
    differences shifted to the null, ``p = (1 + #{|d* - d| >= |d|}) / (1 + n_bootstrap)``
    (Davison & Hinkley 1997, ch. 4), so it is never 0 and equals 1 for identical scores.

    Args:
        y_true: 0/1 labels, shape ``(n,)``.
        y_score_a: scores of model a, shape ``(n,)``.
        y_score_b: scores of model b, shape ``(n,)``.
        n_bootstrap: number of resamples.
        seed: seed of the resampling.
        confidence: coverage of the interval of the difference.

    Returns:
        ``PairedBootstrapResult(difference, low, high, p_value)``, differences as a - b; all NaN
        (with a warning) when ``y_true`` holds one class.
    """
    y_true, y_score_a = _check_labels_and_scores(y_true, y_score_a, score_name="y_score_a")
    _, y_score_b = _check_labels_and_scores(y_true, y_score_b, score_name="y_score_b")
    n_bootstrap = _check_n_bootstrap(n_bootstrap)
    confidence = _check_confidence(confidence)
    if not _has_both_classes(y_true, "The ROC AUC difference"):
        return PairedBootstrapResult(np.nan, np.nan, np.nan, np.nan)
    difference = float(roc_auc_score(y_true, y_score_a) - roc_auc_score(y_true, y_score_b))
    indices = bootstrap_indices(y_true, n_bootstrap, seed)
    resampled = bootstrap_aucs(y_true, y_score_a, indices) - bootstrap_aucs(
        y_true, y_score_b, indices
    )
    low, high = _percentile_interval(resampled, confidence)
    # Compare with a small tolerance: identical models give differences that are exactly 0 in
    # exact arithmetic but may differ in the last bit after the floating-point sums.
    extreme = np.abs(resampled - difference) >= abs(difference) - 1e-12
    p_value = (1 + int(extreme.sum())) / (1 + n_bootstrap)
    return PairedBootstrapResult(difference, low, high, min(p_value, 1.0))


# ----------------------------------------------------------------------------- DeLong


def _placement_values(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components: for each positive ``x``, the fraction of negatives it
    outranks, ``V10(x) = mean_j psi(x, y_j)``; for each negative ``y``, the fraction of positives
    that outrank it, ``V01(y) = mean_i psi(x_i, y)``; ``psi`` is 1, 1/2, 0 for >, =, <."""
    positives = y_score[y_true == 1]
    negatives = y_score[y_true == 0]
    sorted_negatives = np.sort(negatives)
    sorted_positives = np.sort(positives)
    below = np.searchsorted(sorted_negatives, positives, side="left")
    at_or_below = np.searchsorted(sorted_negatives, positives, side="right")
    v10 = (below + at_or_below) / (2 * negatives.size)
    below = np.searchsorted(sorted_positives, negatives, side="left")
    at_or_below = np.searchsorted(sorted_positives, negatives, side="right")
    v01 = (2 * positives.size - below - at_or_below) / (2 * positives.size)
    return v10, v01


def delong_test(y_true, y_score_a, y_score_b) -> DeLongResult:
    """DeLong's test of two correlated ROC AUCs measured on the same test set.

    From the definition (DeLong, DeLong & Clarke-Pearson, Biometrics 1988): each AUC is the mean
    of its placement values over positives (``V10``) or negatives (``V01``); the covariance of the
    two AUCs is ``S10 / m + S01 / n`` with ``S10``, ``S01`` the sample covariance matrices
    (``ddof=1``) of the placement values of the ``m`` positives and ``n`` negatives; the
    difference is tested with ``z = (AUC_a - AUC_b) / se`` against a standard normal.

    Args:
        y_true: 0/1 labels, shape ``(n,)``.
        y_score_a: scores of model a, shape ``(n,)``.
        y_score_b: scores of model b, shape ``(n,)``.

    Returns:
        ``DeLongResult(auc_a, auc_b, difference, std_error, z, p_value)``. When the difference
        has zero variance (e.g. identical scores), ``z`` is 0 and ``p`` 1 if the AUCs are equal,
        ``z`` infinite and ``p`` 0 otherwise. All NaN (with a warning) when ``y_true`` holds one
        class.
    """
    y_true, y_score_a = _check_labels_and_scores(y_true, y_score_a, score_name="y_score_a")
    _, y_score_b = _check_labels_and_scores(y_true, y_score_b, score_name="y_score_b")
    if not _has_both_classes(y_true, "DeLong's test"):
        return DeLongResult(*([np.nan] * 6))
    v10_a, v01_a = _placement_values(y_true, y_score_a)
    v10_b, v01_b = _placement_values(y_true, y_score_b)
    auc_a, auc_b = float(v10_a.mean()), float(v10_b.mean())
    difference = auc_a - auc_b
    m, n = v10_a.size, v01_a.size
    variance = _difference_variance(v10_a, v10_b, m) + _difference_variance(v01_a, v01_b, n)
    std_error = float(np.sqrt(max(variance, 0.0)))
    if std_error > 0:
        z = difference / std_error
    elif abs(difference) < 1e-12:
        z = 0.0
    else:
        z = float(np.copysign(np.inf, difference))
    p_value = float(2 * norm.sf(abs(z)))
    return DeLongResult(auc_a, auc_b, difference, std_error, float(z), p_value)


def _difference_variance(values_a: np.ndarray, values_b: np.ndarray, count: int) -> float:
    """``(S_aa + S_bb - 2 S_ab) / count`` from two samples of placement values."""
    if count < 2:
        return 0.0
    covariance = np.cov(np.vstack([values_a, values_b]), ddof=1)
    return float(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]) / count


# ----------------------------------------------------------------------------- operating point


def max_accuracy_threshold(y_true, y_score) -> ThresholdResult:
    """The point of maximum accuracy on the ROC curve (paper IV-D, Table III).

    Candidate thresholds are those of :func:`sklearn.metrics.roc_curve` (every distinct score,
    plus ``inf`` for "all negative"); the accuracy at a threshold is
    ``(TPR * positives + (1 - FPR) * negatives) / n``. Among equally accurate thresholds the
    highest one (fewest positive calls) is returned.

    Returns:
        ``ThresholdResult(threshold, accuracy)``: predict cancer when ``score >= threshold``.
        NaN (with a warning) when ``y_true`` holds one class.
    """
    y_true, y_score = _check_labels_and_scores(y_true, y_score)
    if not _has_both_classes(y_true, "The ROC curve"):
        return ThresholdResult(np.nan, np.nan)
    fpr, tpr, thresholds = roc_curve(y_true, y_score, drop_intermediate=False)
    n_positive = int(y_true.sum())
    n_negative = y_true.size - n_positive
    accuracy = (tpr * n_positive + (1 - fpr) * n_negative) / y_true.size
    best = int(np.argmax(accuracy))
    return ThresholdResult(float(thresholds[best]), float(accuracy[best]))


def confusion_at_threshold(y_true, y_score, threshold: float) -> np.ndarray:
    """Confusion matrix ``[[TN, FP], [FN, TP]]`` when predicting cancer at ``score >= threshold``.

    Raises:
        ValueError: invalid inputs, or a NaN threshold.
    """
    y_true, y_score = _check_labels_and_scores(y_true, y_score)
    if not isinstance(threshold, numbers.Real) or np.isnan(threshold):
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    predicted = (y_score >= threshold).astype(np.int64)
    return confusion_matrix(y_true, predicted, labels=[0, 1])

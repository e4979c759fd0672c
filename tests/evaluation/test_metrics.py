"""repro.evaluation.metrics against slow reference implementations (in the style of sklearn's
test_ranking)."""

import re
import warnings

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import roc_auc_score

from repro.evaluation.metrics import (
    auc_with_ci,
    bootstrap_aucs,
    bootstrap_indices,
    confusion_at_threshold,
    delong_test,
    max_accuracy_threshold,
    paired_bootstrap_test,
)


def make_scores(n=120, separation=1.0, ties=False, seed=0):
    rng = np.random.default_rng(seed)
    y_true = (rng.random(n) < 0.45).astype(int)
    y_score = separation * y_true + rng.normal(size=n)
    if ties:
        y_score = np.round(y_score, 1)
    return y_true, y_score


# ----------------------------------------------------------------------------- references


def _reference_auc(y_true, y_score):
    """Mann-Whitney by loops: the fraction of (positive, negative) pairs ranked right."""
    positives = [s for s, y in zip(y_score, y_true, strict=True) if y == 1]
    negatives = [s for s, y in zip(y_score, y_true, strict=True) if y == 0]
    total = 0.0
    for p in positives:
        for q in negatives:
            total += 1.0 if p > q else 0.5 if p == q else 0.0
    return total / (len(positives) * len(negatives))


def _reference_delong(y_true, score_a, score_b):
    """DeLong et al. (1988) by loops: placement values, their covariances, z and p."""

    def psi(x, y):
        return 1.0 if x > y else 0.5 if x == y else 0.0

    pos = [i for i, y in enumerate(y_true) if y == 1]
    neg = [i for i, y in enumerate(y_true) if y == 0]
    m, n = len(pos), len(neg)
    v10, v01 = {}, {}
    for name, s in (("a", score_a), ("b", score_b)):
        v10[name] = [sum(psi(s[i], s[j]) for j in neg) / n for i in pos]
        v01[name] = [sum(psi(s[i], s[j]) for i in pos) / m for j in neg]

    def cov(u, v):
        mu, mv = sum(u) / len(u), sum(v) / len(v)
        return sum((a - mu) * (b - mv) for a, b in zip(u, v, strict=True)) / (len(u) - 1)

    auc = {k: sum(v10[k]) / m for k in ("a", "b")}
    variance = 0.0
    for values, count in ((v10, m), (v01, n)):
        s_aa = cov(values["a"], values["a"])
        s_bb = cov(values["b"], values["b"])
        s_ab = cov(values["a"], values["b"])
        variance += (s_aa + s_bb - 2 * s_ab) / count
    z = (auc["a"] - auc["b"]) / variance**0.5
    return auc["a"], auc["b"], variance**0.5, z, 2 * norm.sf(abs(z))


# ----------------------------------------------------------------------------- AUC and CI


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_with_ci_point_estimate_is_roc_auc_score(ties, seed):
    y_true, y_score = make_scores(ties=ties, seed=seed)
    auc, low, high = auc_with_ci(y_true, y_score, n_bootstrap=200, seed=seed)
    assert auc == pytest.approx(roc_auc_score(y_true, y_score), abs=1e-15)
    assert low <= auc <= high


@pytest.mark.parametrize("ties", [False, True])
def test_vectorised_bootstrap_equals_plain_loop(ties):
    y_true, y_score = make_scores(n=80, ties=ties, seed=3)
    indices = bootstrap_indices(y_true, n_bootstrap=300, seed=7)
    expected = np.array([roc_auc_score(y_true[row], y_score[row]) for row in indices])
    np.testing.assert_allclose(bootstrap_aucs(y_true, y_score, indices), expected, atol=1e-12)
    _, low, high = auc_with_ci(y_true, y_score, n_bootstrap=300, seed=7)
    assert (low, high) == pytest.approx(tuple(np.percentile(expected, [2.5, 97.5])), abs=1e-12)


def test_bootstrap_aucs_match_mann_whitney_loops_with_ties():
    y_true = np.array([0, 0, 1, 1, 0, 1, 1, 0])
    y_score = np.array([0.1, 0.4, 0.4, 0.8, 0.8, 0.8, 0.3, 0.0])
    indices = bootstrap_indices(y_true, n_bootstrap=50, seed=0)
    expected = [_reference_auc(y_true[row], y_score[row]) for row in indices]
    np.testing.assert_allclose(bootstrap_aucs(y_true, y_score, indices), expected, atol=1e-12)


def test_bootstrap_indices_shape_seed_and_redraw():
    y_true = np.array([1, 0, 0, 0, 0])  # many resamples of 5 draw no positive: redrawn
    indices = bootstrap_indices(y_true, n_bootstrap=500, seed=1)
    assert indices.shape == (500, 5) and indices.dtype == np.int64
    positives = y_true[indices].sum(axis=1)
    assert ((positives > 0) & (positives < 5)).all()
    np.testing.assert_array_equal(indices, bootstrap_indices(y_true, n_bootstrap=500, seed=1))
    assert not np.array_equal(indices, bootstrap_indices(y_true, n_bootstrap=500, seed=2))


def test_auc_with_ci_perfect_separation():
    y_true = np.array([0, 0, 0, 1, 1, 1])
    assert tuple(auc_with_ci(y_true, [0.1, 0.2, 0.3, 0.7, 0.8, 0.9], n_bootstrap=100)) == (
        1.0,
        1.0,
        1.0,
    )


def test_auc_with_ci_is_deterministic_given_seed():
    y_true, y_score = make_scores()
    assert auc_with_ci(y_true, y_score, 500, seed=4) == auc_with_ci(y_true, y_score, 500, seed=4)


def test_auc_with_ci_confidence_widens_interval():
    y_true, y_score = make_scores(n=200)
    _, low90, high90 = auc_with_ci(y_true, y_score, 1000, confidence=0.90)
    _, low99, high99 = auc_with_ci(y_true, y_score, 1000, confidence=0.99)
    assert low99 < low90 < high90 < high99


@pytest.mark.parametrize("label", [0, 1])
def test_one_class_warns_and_returns_nan(label):
    y_true = np.full(6, label)
    y_score = np.linspace(0, 1, 6)
    for call in (
        lambda: auc_with_ci(y_true, y_score, n_bootstrap=10),
        lambda: paired_bootstrap_test(y_true, y_score, y_score[::-1], n_bootstrap=10),
        lambda: delong_test(y_true, y_score, y_score[::-1]),
        lambda: max_accuracy_threshold(y_true, y_score),
    ):
        with pytest.warns(UndefinedMetricWarning, match="Only one class"):
            result = call()
        assert all(np.isnan(value) for value in result)


@pytest.mark.parametrize(
    "y_true, y_score, message",
    [
        ([0, 1, 1], [0.1, 0.2], "y_true.shape=(3,) and y_score.shape=(2,)"),
        ([[0, 1], [1, 0]], [0.1, 0.2], "y_true.shape=(2, 2)"),
        ([0, 1], [[0.1, 0.2]], "y_score.shape=(1, 2)"),
        ([0, 1, 2], [0.1, 0.2, 0.3], "got values [0, 1, 2]"),
        (["a", "b"], [0.1, 0.2], "dtype=<U1"),
        ([0, 1], [0.1, np.nan], "got 1 NaN or infinite values"),
        ([0, 1], ["x", "y"], "y_score must be numeric"),
        ([], [], "empty"),
    ],
)
def test_invalid_inputs_echo_what_was_received(y_true, y_score, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        auc_with_ci(y_true, y_score, n_bootstrap=10)


@pytest.mark.parametrize("n_bootstrap", [0, -1, 2.5, True, "10"])
def test_invalid_n_bootstrap(n_bootstrap):
    with pytest.raises(ValueError, match=re.escape(f"got {n_bootstrap!r}")):
        auc_with_ci([0, 1], [0.1, 0.9], n_bootstrap=n_bootstrap)


@pytest.mark.parametrize("confidence", [0, 1, 1.5])
def test_invalid_confidence(confidence):
    with pytest.raises(ValueError, match="confidence must be in"):
        auc_with_ci([0, 1], [0.1, 0.9], n_bootstrap=10, confidence=confidence)


def test_bootstrap_aucs_rejects_bad_indices():
    with pytest.raises(ValueError, match=re.escape("indices.shape=(4,)")):
        bootstrap_aucs([0, 1], [0.1, 0.9], np.arange(4))
    with pytest.raises(ValueError, match=re.escape("[0, 5]")):
        bootstrap_aucs([0, 1], [0.1, 0.9], np.array([[0, 5]]))


def test_bootstrap_indices_one_class_raises():
    with pytest.raises(ValueError, match="one class only"):
        bootstrap_indices([1, 1, 1], n_bootstrap=5)


# ----------------------------------------------------------------------------- paired tests


def test_paired_bootstrap_detects_clearly_different_models():
    y_true, good = make_scores(n=300, separation=3.0, seed=5)
    poor = good + np.random.default_rng(9).normal(scale=4.0, size=good.size)
    result = paired_bootstrap_test(y_true, good, poor, n_bootstrap=2000, seed=0)
    assert result.difference > 0 and result.low > 0
    assert result.p_value < 0.05
    assert result.p_value >= 1 / 2001  # never 0
    assert delong_test(y_true, good, poor).p_value < 0.05


def test_paired_tests_identical_scores_are_not_significant():
    y_true, y_score = make_scores(n=150, seed=6)
    result = paired_bootstrap_test(y_true, y_score, y_score.copy(), n_bootstrap=1000)
    assert result == (0.0, 0.0, 0.0, 1.0)
    delong = delong_test(y_true, y_score, y_score.copy())
    assert delong.difference == 0 and delong.p_value == 1.0


def test_paired_tests_similar_models_are_not_significant():
    y_true, y_score = make_scores(n=200, separation=1.5, seed=2)
    rng = np.random.default_rng(3)
    a = y_score + rng.normal(scale=0.3, size=y_score.size)
    b = y_score + rng.normal(scale=0.3, size=y_score.size)
    assert paired_bootstrap_test(y_true, a, b, n_bootstrap=2000).p_value > 0.05
    assert delong_test(y_true, a, b).p_value > 0.05


def test_paired_bootstrap_difference_matches_separate_aucs():
    y_true, a = make_scores(n=100, seed=8)
    b = a + np.random.default_rng(0).normal(size=a.size)
    result = paired_bootstrap_test(y_true, a, b, n_bootstrap=150, seed=3)
    assert result.difference == pytest.approx(roc_auc_score(y_true, a) - roc_auc_score(y_true, b))
    indices = bootstrap_indices(y_true, 150, seed=3)
    loop = [roc_auc_score(y_true[i], a[i]) - roc_auc_score(y_true[i], b[i]) for i in indices]
    assert (result.low, result.high) == pytest.approx(tuple(np.percentile(loop, [2.5, 97.5])))


def test_paired_bootstrap_rejects_mismatched_second_model():
    with pytest.raises(ValueError, match=re.escape("y_score_b.shape=(2,)")):
        paired_bootstrap_test([0, 1, 1], [0.1, 0.2, 0.3], [0.1, 0.2], n_bootstrap=10)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_delong_matches_slow_reference(ties, seed):
    y_true, a = make_scores(n=60, ties=ties, seed=seed)
    b = a + np.random.default_rng(seed + 10).normal(size=a.size)
    if ties:
        b = np.round(b, 1)
    result = delong_test(y_true, a, b)
    auc_a, auc_b, std_error, z, p_value = _reference_delong(y_true, a, b)
    assert result.auc_a == pytest.approx(auc_a, abs=1e-12)
    assert result.auc_a == pytest.approx(roc_auc_score(y_true, a), abs=1e-12)
    assert result.auc_b == pytest.approx(auc_b, abs=1e-12)
    assert result.std_error == pytest.approx(std_error, rel=1e-10)
    assert result.z == pytest.approx(z, rel=1e-10)
    assert result.p_value == pytest.approx(p_value, rel=1e-8)


def test_delong_and_bootstrap_agree_roughly():
    y_true, a = make_scores(n=400, separation=1.5, seed=11)
    b = a + np.random.default_rng(1).normal(scale=1.0, size=a.size)
    delong = delong_test(y_true, a, b)
    boot = paired_bootstrap_test(y_true, a, b, n_bootstrap=4000, seed=0)
    boot_se = (boot.high - boot.low) / (2 * norm.ppf(0.975))
    assert boot_se == pytest.approx(delong.std_error, rel=0.15)


# ----------------------------------------------------------------------------- operating point


def test_max_accuracy_threshold_hand_checked():
    # Scores sorted: 0.1(0) 0.2(0) 0.35(1) 0.4(0) 0.6(1) 0.8(1) 0.9(1).
    # Calling cancer at >= 0.35 misclassifies only the negative at 0.4: accuracy 6/7.
    # >= 0.6 misses the positive at 0.35: also 6/7; the higher threshold wins the tie.
    y_true = [0, 0, 1, 0, 1, 1, 1]
    y_score = [0.1, 0.2, 0.35, 0.4, 0.6, 0.8, 0.9]
    threshold, accuracy = max_accuracy_threshold(y_true, y_score)
    assert threshold == 0.6
    assert accuracy == pytest.approx(6 / 7)
    np.testing.assert_array_equal(confusion_at_threshold(y_true, y_score, 0.6), [[3, 0], [1, 3]])
    np.testing.assert_array_equal(confusion_at_threshold(y_true, y_score, 0.35), [[2, 1], [0, 4]])


def test_max_accuracy_threshold_unique_optimum():
    y_true = [0, 0, 0, 1, 1, 0, 1, 1]
    y_score = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    # >= 0.4: TP 4, FP 1 (0.6), TN 3: 7/8. >= 0.3: 6/8; >= 0.5: 6/8; >= 0.7: 6/8.
    assert max_accuracy_threshold(y_true, y_score) == (0.4, 7 / 8)
    np.testing.assert_array_equal(confusion_at_threshold(y_true, y_score, 0.4), [[3, 1], [0, 4]])


def test_max_accuracy_threshold_matches_brute_force():
    y_true, y_score = make_scores(n=200, ties=True, seed=4)
    candidates = np.r_[np.inf, np.unique(y_score)]
    accuracies = [((y_score >= t) == y_true).mean() for t in candidates]
    threshold, accuracy = max_accuracy_threshold(y_true, y_score)
    assert accuracy == pytest.approx(max(accuracies))
    assert ((y_score >= threshold) == y_true).mean() == pytest.approx(accuracy)
    assert threshold == max(t for t, a in zip(candidates, accuracies, strict=True) if a == accuracy)


def test_max_accuracy_threshold_can_be_all_negative():
    # One positive scored lowest: calling nothing positive (threshold inf) is best, 3/4.
    threshold, accuracy = max_accuracy_threshold([1, 0, 0, 0], [0.1, 0.5, 0.6, 0.7])
    assert threshold == np.inf and accuracy == 0.75


def test_confusion_at_threshold_rejects_nan_threshold():
    with pytest.raises(ValueError, match="threshold must be a number, got nan"):
        confusion_at_threshold([0, 1], [0.2, 0.8], float("nan"))


def test_no_warning_for_valid_inputs():
    y_true, y_score = make_scores(n=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auc_with_ci(y_true, y_score, n_bootstrap=100)
        max_accuracy_threshold(y_true, y_score)
        delong_test(y_true, y_score, -y_score)

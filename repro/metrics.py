"""Public path of the evaluation metrics; the code lives in :mod:`repro.evaluation.metrics`."""

from repro.evaluation.metrics import (
    AUCResult,
    DeLongResult,
    PairedBootstrapResult,
    ThresholdResult,
    auc_with_ci,
    bootstrap_aucs,
    bootstrap_indices,
    confusion_at_threshold,
    delong_test,
    max_accuracy_threshold,
    paired_bootstrap_test,
)

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

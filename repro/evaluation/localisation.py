"""How well a heatmap finds the tumour (beyond the paper, which compared heatmaps by eye).

For a positive biopsy with a label mask (PANDA Radboud ``train_label_masks``, values >= 3 are
Gleason patterns; the synthetic set writes the same masks), two measures per heatmap:

- the pixel-level ROC AUC (:func:`pixel_auc`): do tumour pixels score higher than the other
  tissue pixels? 0.5 is chance; background (label 0) is left out, so finding tissue is not
  rewarded;
- the pointing game (:func:`pointing_hit`; Zhang et al., 2018): does the map's maximum lie in
  tumour?

:func:`localisation_row` scores one map against its labels, :func:`localisation_summary` sums
the rows up per method; :func:`repro.reporting.writers.write_heatmap_localisation` writes them.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import roc_auc_score

from repro.data.masks import TUMOUR_MIN_LABEL

MAP_NAMES = {"streaming": "SmoothGrad", "mil": "patch probability"}
"""The heatmap each method is judged by."""
ROW_COLUMNS = ["image_id", "method", "tumour_fraction", "pixel_auc", "pointing_hit"]


def _checked(
    heatmap: np.ndarray, mask: np.ndarray, valid: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float heatmap, boolean mask and boolean valid pixels of one 2-D shape, or a ValueError."""
    heatmap, mask = np.asarray(heatmap), np.asarray(mask)
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {heatmap.shape}")
    if heatmap.dtype.kind not in "biuf":
        raise ValueError(f"heatmap must be numeric, got dtype {heatmap.dtype}")
    if mask.shape != heatmap.shape:
        raise ValueError(
            f"heatmap and mask must have the same shape, got {heatmap.shape} and {mask.shape}"
        )
    if mask.dtype != bool:
        values = np.unique(mask)
        if mask.dtype.kind not in "biuf" or not np.isin(values, (0, 1)).all():
            raise ValueError(f"mask must be boolean or 0/1, got values {values[:10].tolist()}")
        mask = mask.astype(bool)
    if np.isinf(heatmap).any():
        raise ValueError(f"heatmap must be finite or NaN, got {int(np.isinf(heatmap).sum())} inf")
    if valid is None:
        valid = np.ones(mask.shape, bool)
    valid = np.asarray(valid)
    if valid.shape != heatmap.shape or valid.dtype != bool:
        raise ValueError(
            f"valid must be boolean of shape {heatmap.shape}, got {valid.dtype} {valid.shape}"
        )
    return heatmap.astype(np.float64), mask, valid


def pixel_auc(heatmap: np.ndarray, mask: np.ndarray, valid: np.ndarray | None = None) -> float:
    """ROC AUC of the heatmap's values as a score for ``mask`` (True = tumour), over the
    ``valid`` pixels (default all).

    NaN in the heatmap (e.g. no MIL patch there) counts as the lowest score. When the valid
    pixels hold one class only, the AUC is undefined: an
    :class:`~sklearn.exceptions.UndefinedMetricWarning` and NaN.
    """
    heatmap, mask, valid = _checked(heatmap, mask, valid)
    scores, truth = heatmap[valid], mask[valid]
    positives = int(truth.sum())
    if positives in (0, truth.size):
        warnings.warn(
            f"only one class among the {truth.size} valid pixels ({positives} tumour): "
            "the pixel AUC is not defined",
            UndefinedMetricWarning,
            stacklevel=2,
        )
        return float("nan")
    lowest = np.nanmin(scores) - 1 if np.isfinite(scores).any() else 0.0
    return float(roc_auc_score(truth, np.where(np.isnan(scores), lowest, scores)))


def pointing_hit(heatmap: np.ndarray, mask: np.ndarray, valid: np.ndarray | None = None) -> bool:
    """The pointing game: is the heatmap's maximum (over ``valid`` pixels, NaN ignored) in the
    mask? Where several pixels share the maximum (a MIL patch is a plateau), a hit needs most of
    them in the mask. A map without a finite value misses."""
    heatmap, mask, valid = _checked(heatmap, mask, valid)
    scores = np.where(valid, heatmap, np.nan)
    if not np.isfinite(scores).any():
        return False
    top = scores == np.nanmax(scores)
    return bool(mask[top].mean() > 0.5)


def localisation_row(
    image_id: str, method: str, heatmap: np.ndarray, labels: np.ndarray
) -> dict[str, object] | None:
    """Pixel AUC and pointing game of one map against a label mask of its shape (Radboud
    values; tissue = labels > 0, tumour = labels >= 3), or None when the mask has no tumour."""
    labels = np.asarray(labels)
    tumour, tissue = labels >= TUMOUR_MIN_LABEL, labels > 0
    if not tumour.any():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # all tissue tumour: NaN
        auc = pixel_auc(heatmap, tumour, tissue)
    return {
        "image_id": image_id,
        "method": method,
        "tumour_fraction": float(tumour.sum() / tissue.sum()),
        "pixel_auc": auc,
        "pointing_hit": pointing_hit(heatmap, tumour, tissue),
    }


def localisation_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per method (in order of appearance): biopsies, mean and median pixel AUC, and the share
    of pointing-game hits."""
    grouped = rows.groupby("method", sort=False)
    sizes = grouped.size()
    return pd.DataFrame(
        {
            "method": [f"{name} ({MAP_NAMES.get(name, name)})" for name in sizes.index],
            "biopsies": sizes.to_numpy(),
            "pixel_auc_mean": grouped["pixel_auc"].mean().to_numpy(),
            "pixel_auc_median": grouped["pixel_auc"].median().to_numpy(),
            "pointing_game": grouped["pointing_hit"].mean().to_numpy(),
        }
    )

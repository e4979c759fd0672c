"""How well a heatmap finds the tumour (beyond the paper, which compared heatmaps by eye).

For a positive biopsy with a label mask (PANDA Radboud: ``train_label_masks``, values >= 3 are
Gleason patterns; the synthetic set writes the same masks), two measures per heatmap:

- the pixel-level ROC AUC (:func:`pixel_auc`): do tumour pixels score higher than the other
  tissue pixels? 0.5 is chance; background (label 0) is left out, so finding tissue is not
  rewarded;
- the pointing game (:func:`pointing_hit`; Zhang et al., 2018): does the map's maximum lie in
  tumour?

:func:`localisation_table` computes both for every positive test biopsy with a prepared label
mask, for the streaming model's SmoothGrad map and the MIL patch-probability map, and writes
``heatmap_localisation_<experiment>.csv`` (one row per biopsy and method) and ``.md`` (the
summary per method) beside Fig. 6; notebook 06 calls it.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import roc_auc_score

from repro.config import Params, resolve_path

logger = logging.getLogger(__name__)

TUMOUR_MIN_LABEL = 3
"""Radboud label values >= 3 are Gleason patterns 3, 4, 5."""
METHOD_MAPS = {"streaming": "SmoothGrad", "mil": "patch probability"}


def _check_map_and_mask(heatmap, mask, valid=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2-D numeric heatmap, boolean mask and valid-pixel mask of one shape, or a ValueError."""
    heatmap = np.asarray(heatmap)
    mask = np.asarray(mask)
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got heatmap.shape={heatmap.shape}")
    if heatmap.dtype.kind not in "biuf":
        raise ValueError(f"heatmap must be numeric, got dtype={heatmap.dtype}")
    if mask.shape != heatmap.shape:
        raise ValueError(
            f"heatmap and mask must have the same shape, got heatmap.shape={heatmap.shape} "
            f"and mask.shape={mask.shape}"
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
    else:
        valid = np.asarray(valid)
        if valid.shape != heatmap.shape or valid.dtype != bool:
            raise ValueError(
                f"valid must be a boolean array of shape {heatmap.shape}, got "
                f"valid.shape={valid.shape}, dtype={valid.dtype}"
            )
    return heatmap.astype(np.float64), mask, valid


def pixel_auc(heatmap, mask, valid=None) -> float:
    """ROC AUC of the heatmap's values as a score for ``mask`` (True = tumour), over the
    ``valid`` pixels (default all).

    NaN in the heatmap (e.g. no MIL patch there) counts as the lowest score. When the valid
    pixels hold one class only the AUC is undefined: an
    :class:`~sklearn.exceptions.UndefinedMetricWarning` and NaN, as in :mod:`repro.metrics`.
    """
    heatmap, mask, valid = _check_map_and_mask(heatmap, mask, valid)
    scores = heatmap[valid]
    truth = mask[valid]
    positives = int(truth.sum())
    if positives == 0 or positives == truth.size:
        warnings.warn(
            f"Only one class among the {truth.size} valid pixels ({positives} tumour); the "
            "pixel AUC is not defined in that case.",
            UndefinedMetricWarning,
            stacklevel=2,
        )
        return float("nan")
    lowest = np.nanmin(scores) - 1 if np.isfinite(scores).any() else 0.0
    return float(roc_auc_score(truth, np.where(np.isnan(scores), lowest, scores)))


def pointing_hit(heatmap, mask, valid=None) -> bool:
    """The pointing game: is the heatmap's maximum (over ``valid`` pixels, NaN ignored) in the
    mask? Where several pixels share the maximum (a MIL patch is a plateau), the hit is the
    majority of them being in the mask. A map without any finite value misses."""
    heatmap, mask, valid = _check_map_and_mask(heatmap, mask, valid)
    scores = np.where(valid, heatmap, np.nan)
    if not np.isfinite(scores).any():
        return False
    top = scores == np.nanmax(scores)
    return bool(mask[top].mean() > 0.5)


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A label image brought to ``shape`` (h, w) by nearest neighbour (pixel centres)."""
    labels = np.asarray(labels)
    rows = ((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0]).astype(int)
    cols = ((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1]).astype(int)
    return labels[np.minimum(rows, labels.shape[0] - 1)][:, np.minimum(cols, labels.shape[1] - 1)]


def _summary(rows: pd.DataFrame) -> pd.DataFrame:
    grouped = rows.groupby("method", sort=False)
    return pd.DataFrame(
        {
            "method": [f"{name} ({METHOD_MAPS.get(name, name)})" for name in grouped.groups],
            "biopsies": grouped.size().to_numpy(),
            "pixel_auc_mean": grouped["pixel_auc"].mean().to_numpy(),
            "pixel_auc_median": grouped["pixel_auc"].median().to_numpy(),
            "pointing_game": grouped["pointing_hit"].mean().to_numpy(),
        }
    )


def localisation_table(params: Params) -> tuple[pd.DataFrame, pd.DataFrame, list[Path]]:
    """Pixel AUC and pointing game of both methods' heatmaps on every positive test biopsy with
    a prepared label mask; writes ``heatmap_localisation_<experiment>.csv`` / ``.md`` into
    ``evaluation.figures_dir``.

    Maps: the streaming model's reduced SmoothGrad map (cached by notebook 06 / computed here,
    see :func:`repro.saliency.smoothgrad_map`), smoothed as in Fig. 6 but not clipped; MIL's
    patch probabilities (:func:`repro.saliency.patch_probability_map`). The label mask is
    brought to the map's size by nearest neighbour; background pixels are left out.

    Returns:
        (per-biopsy rows, summary per method, files written).
    """
    from repro.data.masks import read_label_mask
    from repro.data.prepare import load_manifest
    from repro.evaluation import figures_dir, load_patch_scores, load_run_predictions
    from repro.figures import markdown_table, save_table
    from repro.saliency import (
        cached_smoothgrad_map,
        patch_probability_map,
        sensitivity_heatmap,
        smoothgrad_map,
    )

    predictions = load_run_predictions(params)
    if not predictions:
        raise FileNotFoundError(
            f"no test predictions in {params.run_dir}: run notebook 05 (evaluate) first"
        )
    manifest = load_manifest(params).set_index("image_id")
    prepared = resolve_path(params.data.prepared_dir)
    first = next(iter(predictions.values()))
    positives = first.loc[first["label"] == 1, "image_id"].astype(str)
    with_mask = [
        image_id
        for image_id in positives
        if "label_path" in manifest.columns and isinstance(manifest.at[image_id, "label_path"], str)
    ]
    patches = load_patch_scores(params.run_dir) if "mil" in predictions else None
    image_shape = (params.data.input_size, params.data.input_size)
    size = params.evaluation.heatmap_size
    model = None
    rows = []
    for image_id in with_mask:
        labels = read_label_mask(prepared / manifest.at[image_id, "label_path"])
        maps = {}
        if "streaming" in predictions:
            reduced = cached_smoothgrad_map(params, image_id)
            if reduced is None:
                if model is None:
                    from repro.train import load_final_model

                    model = load_final_model(params)
                reduced = smoothgrad_map(params, model, image_id)
            maps["streaming"] = sensitivity_heatmap(reduced, percentile=100)
        if patches is not None:
            mine = patches[patches["image_id"].astype(str) == image_id]
            maps["mil"] = patch_probability_map(mine, image_shape, params.mil.patch_size, size)
        for method, heatmap in maps.items():
            small = resize_labels(labels, heatmap.shape)
            tumour, tissue = small >= TUMOUR_MIN_LABEL, small > 0
            if not tumour.any():
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UndefinedMetricWarning)
                auc = pixel_auc(heatmap, tumour, tissue)
            rows.append(
                {
                    "image_id": image_id,
                    "method": method,
                    "tumour_fraction": float(tumour.sum() / max(1, tissue.sum())),
                    "pixel_auc": auc,
                    "pointing_hit": pointing_hit(heatmap, tumour, tissue),
                }
            )
    table = pd.DataFrame(
        rows, columns=["image_id", "method", "tumour_fraction", "pixel_auc", "pointing_hit"]
    )
    summary = _summary(table) if len(table) else pd.DataFrame()
    note = (
        f"\nHeatmap localisation on {len(with_mask)} positive test biopsies with a label mask "
        f"(experiment `{params.experiment}`): pixel-level ROC AUC of the map against the tumour "
        "mask (labels >= 3) over the tissue, and the pointing game (map maximum in tumour). "
        "Regenerated by notebook 06.\n"
    )
    stem = figures_dir(params) / f"heatmap_localisation_{params.experiment}"
    markdown = (markdown_table(summary) if len(summary) else "No biopsy with a mask.\n") + note
    files = save_table(table, stem, markdown)
    logger.info("heatmap localisation: %d biopsies, %s", len(with_mask), files[0])
    return table, summary, files

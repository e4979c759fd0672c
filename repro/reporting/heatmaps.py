"""The heatmaps of Fig. 4-6 (paper IV-D): what is drawn for one biopsy.

The streaming model's SmoothGrad map (computed by :mod:`repro.evaluation.saliency`) is shown as
its absolute value averaged down to the thumbnail, smoothed and scaled to [0, 1]
(:func:`sensitivity_heatmap`); the MIL baseline's map is each patch's probability painted over
its area (:func:`patch_probability_map`, the one place that paints it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyvips
from scipy.ndimage import gaussian_filter
from torch import nn

from repro.config import Params
from repro.evaluation.metrics import max_accuracy_threshold
from repro.evaluation.saliency import cached_smoothgrad_map, heatmap_shape, smoothgrad_map
from repro.frames import require_columns
from repro.methods.streaming import load_final_model
from repro.reporting.figures import HeatmapExample
from repro.training.runtime import set_torch_threads


def sensitivity_heatmap(
    reduced: np.ndarray, *, sigma: float | None = None, percentile: float = 99.5
) -> np.ndarray:
    """Display map in [0, 1]: Gaussian-smoothed (``sigma`` in map px; default 1/256 of the longer
    side, our choice) and divided by its ``percentile`` (gradients are heavy-tailed), clipped."""
    reduced = np.asarray(reduced, dtype=np.float32)
    if sigma is None:
        sigma = max(reduced.shape) / 256
    smooth = gaussian_filter(reduced, sigma) if sigma > 0 else reduced
    top = float(np.percentile(smooth, percentile)) if smooth.size else 0.0
    if top <= 0:
        return np.zeros_like(smooth)
    return np.clip(smooth / top, 0, 1).astype(np.float32)


def patch_probability_map(
    patches: pd.DataFrame, image_size: tuple[int, int], patch_size: int, size: int
) -> np.ndarray:
    """MIL heatmap: each patch's probability painted over its area, NaN where there is no patch.

    Args:
        patches: columns x, y (top-left, image px) and score of one biopsy's patches.
        image_size: (height, width) of the prepared image.
        patch_size: patch side in image px (``mil.patch_size``).
        size: longer side of the map.

    Returns:
        (h, w) float32 map; where patches overlap, the highest probability.
    """
    require_columns(patches, ["x", "y", "score"], "patches")
    height, width = image_size
    shape = heatmap_shape(height, width, size)
    scale_y, scale_x = shape[0] / height, shape[1] / width
    heatmap = np.full(shape, np.nan, dtype=np.float32)
    for x, y, score in patches[["x", "y", "score"]].itertuples(index=False):
        top, left = math.floor(y * scale_y), math.floor(x * scale_x)
        bottom = max(top + 1, math.ceil((y + patch_size) * scale_y))
        right = max(left + 1, math.ceil((x + patch_size) * scale_x))
        region = heatmap[top:bottom, left:right]
        np.fmax(region, np.float32(score), out=region)
    return heatmap


def load_thumbnail(params: Params, image_id: str, shape: tuple[int, int]) -> np.ndarray:
    """The prepared image shrunk to exactly ``shape`` (h, w): uint8 (h, w, 3)."""
    path = params.prepared.image(image_id)
    height, width = shape
    image = pyvips.Image.thumbnail(str(path), width, height=height, size="force")
    array = image.numpy()
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(array[..., :3]).astype(np.uint8)


def choose_examples(predictions: dict[str, pd.DataFrame], count: int) -> list[str]:
    """Image ids for Fig. 6: biopsies every method predicts correctly at its maximum-accuracy
    threshold; cancers first (highest mean score), then negatives (lowest), ``count`` in all."""
    correct = None
    merged = None
    for method, frame in predictions.items():
        threshold, _ = max_accuracy_threshold(frame["label"], frame["score"])
        right = frame.loc[(frame["score"] >= threshold) == frame["label"].astype(bool)]
        ids = set(right["image_id"])
        correct = ids if correct is None else correct & ids
        part = frame[["image_id", "label", "score"]].rename(columns={"score": method})
        merged = part if merged is None else merged.merge(part, on=["image_id", "label"])
    if merged is None:
        return []
    merged = merged[merged["image_id"].isin(correct)]
    merged = merged.assign(mean=merged[list(predictions)].mean(axis=1))
    positives = merged[merged["label"] == 1].sort_values("mean", ascending=False, kind="stable")
    negatives = merged[merged["label"] == 0].sort_values("mean", kind="stable")
    return [*positives["image_id"], *negatives["image_id"]][:count]


def method_heatmaps(
    params: Params,
    image_ids: list[str],
    predictions: dict[str, pd.DataFrame],
    patches: pd.DataFrame | None,
    model: nn.Module | None = None,
) -> Iterator[tuple[str, np.ndarray | None, np.ndarray | None]]:
    """Per image, ``(image_id, reduced SmoothGrad map, MIL patch-probability map)``: the
    SmoothGrad map computed or from the cache (the final streaming model is loaded on the first
    cache miss when ``model`` is None; None without streaming predictions), the MIL map None
    without patch scores for the image."""
    set_torch_threads(params.run.torch_threads)
    size = params.evaluation.heatmap_size
    image_shape = (params.data.input_size, params.data.input_size)
    for image_id in image_ids:
        reduced = cached_smoothgrad_map(params, image_id)
        if reduced is None and "streaming" in predictions:
            if model is None:
                model = load_final_model(params)
            reduced = smoothgrad_map(params, model, image_id)
        mil_map = None
        if patches is not None:
            mine = patches[patches["image_id"] == image_id]
            if len(mine):
                mil_map = patch_probability_map(mine, image_shape, params.mil.patch_size, size)
        yield image_id, reduced, mil_map


def heatmap_examples(
    params: Params,
    image_ids: list[str],
    predictions: dict[str, pd.DataFrame],
    patches: pd.DataFrame | None,
    model: nn.Module | None = None,
) -> list[HeatmapExample]:
    """:class:`HeatmapExample` per image: thumbnail, SmoothGrad map and MIL patch probabilities
    (:func:`method_heatmaps`)."""
    image_shape = (params.data.input_size, params.data.input_size)
    size = params.evaluation.heatmap_size
    examples = []
    maps = method_heatmaps(params, image_ids, predictions, patches, model)
    for image_id, reduced, mil_map in maps:
        shape = reduced.shape if reduced is not None else heatmap_shape(*image_shape, size)
        examples.append(
            HeatmapExample(
                image_id=image_id,
                caption=_caption(image_id, predictions),
                thumbnail=load_thumbnail(params, image_id, shape),
                saliency=None if reduced is None else sensitivity_heatmap(reduced),
                patches=mil_map,
            )
        )
    return examples


def _caption(image_id: str, predictions: dict[str, pd.DataFrame]) -> str:
    parts = []
    label = None
    for method, frame in predictions.items():
        row = frame[frame["image_id"] == image_id]
        if len(row):
            label = int(row["label"].iloc[0])
            parts.append(f"{'MIL' if method == 'mil' else method} {row['score'].iloc[0]:.2f}")
    head = [f"label {label}"] if label is not None else []
    return ", ".join(head + parts)

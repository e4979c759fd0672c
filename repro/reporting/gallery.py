"""Thumbnails of prepared biopsies with their tissue masks (notebook 01)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyvips

from repro.config import Params, resolve_path
from repro.data.sources import POSITIVE
from repro.data.store import read_mask_file

PATTERN_NAMES = {
    0: "negative",
    POSITIVE: "positive",
    3: "pattern 3",
    4: "pattern 4",
    5: "pattern 5",
}
"""Title of each ``primary_pattern``; :data:`~repro.data.sources.POSITIVE` is a positive slide
without a Gleason grade (CSV datasets)."""


def thumbnail(params: Params, row: pd.Series | dict, max_size: int = 256) -> np.ndarray:
    """A prepared image shrunk to at most ``max_size`` px (pyvips thumbnail, from the smallest
    pyramid level that is large enough), as a uint8 ``(h, w, 3)`` array."""
    path = resolve_path(params.data.prepared_dir) / row["path"]
    image = pyvips.Image.thumbnail(str(path), max_size, height=max_size)
    return image.numpy()[..., :3]


def mask_overlay(
    image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (0, 170, 0)
) -> np.ndarray:
    """``image`` with the outline of ``mask`` (any resolution) drawn in ``colour``."""
    height, width = image.shape[:2]
    rows = np.minimum((np.arange(height) * mask.shape[0]) // height, mask.shape[0] - 1)
    cols = np.minimum((np.arange(width) * mask.shape[1]) // width, mask.shape[1] - 1)
    big = mask[rows[:, None], cols[None, :]]
    edge = big & ~(
        np.roll(big, 1, 0) & np.roll(big, -1, 0) & np.roll(big, 1, 1) & np.roll(big, -1, 1)
    )
    out = image.copy()
    out[edge] = colour
    return out


def plot_gallery(
    params: Params,
    manifest: pd.DataFrame,
    n: int = 8,
    columns: int = 4,
    seed: int = 0,
    max_size: int = 256,
):
    """A matplotlib figure of ``n`` prepared biopsies (status ok, classes in turn: negative,
    pattern 3, 4, 5, ...) with the tissue-mask outline in green and the tissue fraction."""
    ok = manifest.loc[manifest["status"] == "ok"]
    rng = np.random.default_rng(seed)
    groups = [
        list(rng.permutation(group.index.to_numpy()))
        for _, group in ok.groupby("primary_pattern", sort=True)
    ]
    chosen = []
    while len(chosen) < min(n, len(ok)):
        for group in groups:
            if group and len(chosen) < n:
                chosen.append(group.pop())
    rows = max(1, -(-len(chosen) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    prepared = resolve_path(params.data.prepared_dir)
    for axis, index in zip(axes.ravel(), chosen, strict=False):
        row = ok.loc[index]
        image = thumbnail(params, row, max_size)
        mask = read_mask_file(prepared / row["mask_path"])
        axis.imshow(mask_overlay(image, mask))
        name = PATTERN_NAMES.get(int(row["primary_pattern"]), "?")
        grade = f"{row['gleason_score']} ({name})" if pd.notna(row["gleason_score"]) else name
        axis.set_title(
            f"{row['image_id'][:8]}  {grade}\ntissue {row['tissue_fraction']:.0%}", fontsize=8
        )
    figure.tight_layout()
    return figure

"""Per-channel mean and standard deviation of the training images (paper IV-A: "We normalized the
images based on training dataset statistics")."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyvips
from tqdm.auto import tqdm

from repro.data.slides import to_numpy
from repro.data.store import open_prepared
from repro.layout import PreparedLayout


def channel_stats(
    rows: pd.DataFrame, prepared: PreparedLayout, max_size: int = 2048, progress: bool = False
) -> tuple[list[float], list[float]]:
    """Mean and std per RGB channel, in [0, 1] units, over all pixels of the given images.

    Cheap: each image is read at the first pyramid level no larger than ``max_size`` px (16384 px
    images: the 2048 px level, 1/8). The mean is that of the full image (box-filtered levels
    keep it); the standard deviation is slightly lower than at full resolution, because the
    finest texture is averaged out. Pixels include the white padding, which the network sees too.

    Returns:
        ``(mean, std)``: two lists of three floats.
    """
    if len(rows) == 0:
        raise ValueError("channel_stats needs at least one image")
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for image_id in tqdm(rows["image_id"], desc="channel stats", disable=not progress):
        image = _level_at_most(prepared, str(image_id), max_size)
        pixels = to_numpy(image, prepared.image(str(image_id))).reshape(-1, 3)
        pixels = pixels.astype(np.float64) / 255.0
        total += pixels.sum(axis=0)
        total_sq += np.square(pixels).sum(axis=0)
        count += len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return [float(v) for v in mean], [float(v) for v in std]


def _level_at_most(prepared: PreparedLayout, image_id: str, max_size: int) -> pyvips.Image:
    image = open_prepared(prepared, image_id)
    pages = image.get("n-pages") if image.get_typeof("n-pages") else 1
    for page in range(pages):
        level = open_prepared(prepared, image_id, level=page) if page else image
        if max(level.width, level.height) <= max_size:
            return level
    # No pyramid level small enough: shrink the smallest (box filter keeps the mean).
    factor = max(level.width, level.height) / max_size
    return level.resize(1 / factor, kernel="linear")

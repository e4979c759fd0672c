"""Reading prepared images and their tissue masks (the output of notebook 01), with pyvips.

Every function takes the prepared folder as a :class:`repro.layout.PreparedLayout`
(``params.prepared``), not the whole params.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyvips

from repro.data.slides import crop_or_pad, to_numpy
from repro.exceptions import SlideError
from repro.layout import PreparedLayout


def open_prepared(prepared: PreparedLayout, image_id: str, level: int = 0) -> pyvips.Image:
    """The prepared image of ``image_id`` as a lazy pyvips image (RGB uint8); ``level`` selects
    a pyramid level (0 = full size, each next level halves it)."""
    path = prepared.image(image_id)
    if not path.exists():
        raise SlideError(f"{path}: no such file (is the image prepared? run notebook 01)")
    try:
        image = pyvips.Image.new_from_file(str(path), page=level, access="random", fail_on="error")
    except pyvips.Error as error:
        raise SlideError(f"{path}: cannot open level {level}: {error.detail.strip()}") from None
    if image.bands > 3:
        image = image.extract_band(0, n=3)
    return image


def read_region(
    prepared: PreparedLayout, image_id: str, x: int, y: int, w: int, h: int
) -> np.ndarray:
    """Pixels ``[y, y + h) x [x, x + w)`` of a prepared image as uint8 ``(h, w, 3)``.

    Only the tiles the region touches are decoded; parts outside the image are white.
    """
    image = open_prepared(prepared, image_id)
    return to_numpy(crop_or_pad(image, x, y, w, h), prepared.image(image_id))


def read_image(prepared: PreparedLayout, image_id: str) -> np.ndarray:
    """A whole prepared image as uint8 ``(H, W, 3)``."""
    return to_numpy(open_prepared(prepared, image_id), prepared.image(image_id))


def load_tissue_mask(
    prepared: PreparedLayout, image_id: str, default_downsample: int
) -> tuple[np.ndarray, int]:
    """The tissue mask of a prepared image and its downsample factor (from the manifest, else
    ``default_downsample``, i.e. ``data.tissue_downsample``).

    Returns:
        ``(mask, downsample)``: mask pixel ``(i, j)`` covers image pixels
        ``[i * downsample, (i + 1) * downsample) x [j * downsample, (j + 1) * downsample)``.
    """
    downsample = _mask_downsamples(prepared.manifest).get(str(image_id), default_downsample)
    return read_mask_file(prepared.mask(image_id)), int(downsample)


def read_mask_file(path: str | os.PathLike[str]) -> np.ndarray:
    """A mask PNG (0 / 255) as a boolean array."""
    try:
        image = pyvips.Image.new_from_file(str(path), fail_on="error")
        return to_numpy(image, path)[..., 0] > 127
    except pyvips.Error as error:
        raise SlideError(f"{path}: cannot read the tissue mask: {error.detail.strip()}") from None


def _mask_downsamples(manifest: Path) -> dict[str, int]:
    if not manifest.exists():
        return {}
    stat = manifest.stat()
    return _read_downsamples(str(manifest), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_downsamples(path: str, mtime_ns: int, size: int) -> dict[str, int]:
    frame = pd.read_csv(path, dtype={"image_id": str}, usecols=["image_id", "mask_downsample"])
    frame = frame.dropna()
    return dict(zip(frame["image_id"], frame["mask_downsample"].astype(int), strict=True))

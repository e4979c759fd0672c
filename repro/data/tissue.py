"""The tissue mask used to trim whitespace around a biopsy.

The paper trimmed whitespace with a tissue-segmentation network (Bulten et al.); we use a
documented classical mask instead, computed on a low-resolution thumbnail (1/32 of the prepared
resolution by default, ``data.tissue_downsample``):

1. HSV saturation (pyvips ``colourspace("hsv")``) above ``data.tissue_saturation``: stained tissue
   is coloured, glass and white background are not;
2. a 3x3 binary closing, so that lumina and thin gaps do not split a biopsy;
3. holes filled (lumina inside the tissue are tissue);
4. connected components smaller than ``data.tissue_min_object_px`` removed (dust, specks). The
   area is given at the 1/32 scale and converted to the thumbnail's scale, so it means the same
   physical area whatever ``tissue_downsample`` is.

Pen marks are saturated too and count as tissue; PANDA Radboud slides have few of them.
"""

from __future__ import annotations

import numpy as np
import pyvips
from scipy import ndimage

REFERENCE_DOWNSAMPLE = 32
"""``data.tissue_min_object_px`` is an area in pixels at this downsample of the target mpp."""


def saturation(image: pyvips.Image | np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of an RGB uint8 image (pyvips or ``(h, w, 3)`` array)."""
    if isinstance(image, np.ndarray):
        image = pyvips.Image.new_from_array(np.ascontiguousarray(image), interpretation="srgb")
    hsv = image.colourspace("hsv", source_space="srgb")
    return hsv.extract_band(1).numpy().astype(np.float32) / 255.0


def min_object_area(min_object_px: int, downsample: int) -> int:
    """``min_object_px`` (an area at 1/32 scale) in pixels of a mask at 1/``downsample``."""
    return max(1, round(min_object_px * (REFERENCE_DOWNSAMPLE / downsample) ** 2))


def tissue_mask(
    thumbnail: pyvips.Image | np.ndarray,
    saturation_threshold: float,
    min_object_area_px: int,
) -> np.ndarray:
    """Boolean tissue mask of a thumbnail (see the module docstring for the steps).

    Args:
        thumbnail: RGB uint8 image at the mask's resolution.
        saturation_threshold: HSV saturation (0-1) above which a pixel is tissue.
        min_object_area_px: connected components with fewer pixels are removed
            (see :func:`min_object_area`).
    """
    mask = saturation(thumbnail) > saturation_threshold
    if not mask.any():
        return mask
    mask |= ndimage.binary_closing(mask, structure=np.ones((3, 3), bool))
    mask = ndimage.binary_fill_holes(mask)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if count:
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        keep = areas >= min_object_area_px
        keep[0] = False
        mask = keep[labels]
    return mask


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` of the true pixels (x1, y1 exclusive), or None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1

"""Per-pixel label masks in PANDA's layout, and their preparation beside the images.

PANDA ships ``train_label_masks/<image_id>_mask.tiff`` (:meth:`repro.layout.PandaLayout.label_mask`)
for most biopsies: a pyramidal TIFF of the slide's size whose first (red) channel holds the
label (Radboud: 0 background, 1 stroma, 2 benign epithelium, 3/4/5 Gleason pattern; Karolinska:
0 background, 1 benign, 2 cancer). The synthetic set writes the same files
(:func:`write_label_mask`).

Preparation (:func:`prepare_label_mask`) puts a mask through exactly the geometry of its image
(:func:`repro.data.prepare.prepare_image`): brought to the slide's size at the target mpp,
cropped to the tissue box, placed at the same offset in the ``input_size`` square (background 0
around it). Resampling is nearest neighbour, so labels are never blended. The prepared mask is
``labels/<image_id>.png`` (:meth:`repro.layout.PreparedLayout.label_mask`: 8-bit, one band, the
label values).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pyvips

from repro.data.slides import explain_error, nearest_shrink, open_slide, save_pyramid, to_numpy
from repro.exceptions import SlideError
from repro.io.atomic import atomic_path

logger = logging.getLogger(__name__)

RADBOUD_LABELS = {
    0: "background",
    1: "stroma",
    2: "benign epithelium",
    3: "Gleason 3",
    4: "Gleason 4",
    5: "Gleason 5",
}
"""Values of a Radboud label mask."""
TUMOUR_MIN_LABEL = 3
"""Radboud: labels >= 3 are tumour (Gleason patterns 3, 4, 5)."""


def write_label_mask(
    labels: np.ndarray | pyvips.Image, path: str | os.PathLike[str], mpp: float
) -> None:
    """Save a label image as PANDA does: RGB with the label in the red channel (green and blue
    0), PANDA's pages 1, 1/4, 1/16 like the synthetic slides
    (:func:`repro.data.slides.save_pyramid`, ``layout="panda"``), lossless and shrunk by nearest
    neighbour. Written to a temporary name and renamed when complete."""
    image = labels
    if isinstance(labels, np.ndarray):
        image = pyvips.Image.new_from_array(np.ascontiguousarray(labels.astype(np.uint8)))
    red = image.extract_band(0).cast("uchar")
    zero = red.new_from_image(0)
    rgb = red.bandjoin([zero, zero]).copy(interpretation="srgb")
    with atomic_path(path) as temporary:
        save_pyramid(rgb, temporary, mpp, layout="panda", labels=True)


def read_label_mask(path: str | os.PathLike[str], level: int = 0) -> np.ndarray:
    """The labels of a raw label mask (PANDA TIFF: its red channel) at pyramid ``level``, as a
    uint8 ``(height, width)`` array."""
    with open_slide(path, mpp_override=1.0) as mask:  # a mask's mpp is its slide's: not needed
        return to_numpy(mask.read_level(level), path)[:, :, 0]


def prepare_label_mask(
    source: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    scaled_size: tuple[int, int],
    box: tuple[int, int, int, int],
    offset: tuple[int, int],
    size: int,
) -> float:
    """Prepare one label mask with its image's geometry; writes ``out_path`` (PNG, atomically).

    Args:
        source: the raw label mask (PANDA: the size of its slide's level 0).
        out_path: the prepared mask.
        scaled_size: (width, height) of the slide at the target mpp; the mask is brought to
            exactly this size by nearest neighbour, so it covers the slide as the image does.
        box: (x0, y0, width, height) of the tissue box in the scaled slide.
        offset: (left, top) of that box in the prepared image (negative: cropped).
        size: side of the prepared square image.

    Returns:
        The share of the prepared mask's pixels that are tumour (labels >= 3).

    Raises:
        SlideError: the mask cannot be read or written (the message names the file).
    """
    width, height = scaled_size
    with open_slide(source, mpp_override=1.0) as mask:
        full = mask.read_level(0).extract_band(0)
        if abs(full.width * height - full.height * width) > 0.02 * full.width * height:
            logger.warning(
                "%s: %dx%d has not the aspect ratio of its slide (%dx%d at target mpp); stretched",
                source,
                full.width,
                full.height,
                width,
                height,
            )
        scaled = _nearest_resize(full, width, height)
        x0, y0, box_width, box_height = box
        left, top = offset
        labels = scaled.crop(x0, y0, box_width, box_height)
        labels = labels.embed(left, top, size, size, extend="black")
        try:
            array = labels.numpy()
        except pyvips.Error as error:
            raise SlideError(f"{source}: {explain_error(error, 'cannot read the labels')}") from None
    with atomic_path(out_path) as partial:
        pyvips.Image.new_from_array(np.ascontiguousarray(array)).pngsave(str(partial))
    return float((array >= TUMOUR_MIN_LABEL).mean())


def read_prepared_labels(
    path: str | os.PathLike[str], shape: tuple[int, int] | None = None
) -> np.ndarray:
    """A prepared label mask (PNG) as uint8 ``(height, width)``; with ``shape`` (h, w), brought
    to that size by nearest neighbour (pixel centres)."""
    try:
        image = pyvips.Image.new_from_file(str(path), fail_on="error")
    except pyvips.Error as error:
        raise SlideError(f"{path}: {explain_error(error, 'cannot read the label mask')}") from None
    if shape is not None:
        image = _nearest_resize(image, shape[1], shape[0])
    return to_numpy(image, path)[:, :, 0]


def _nearest_resize(image: pyvips.Image, width: int, height: int) -> pyvips.Image:
    """``image`` at exactly ``width`` x ``height`` by nearest neighbour: an integer shrink takes
    the centre pixel of each block (aligned with the box average of the image), any other ratio
    pyvips's nearest-neighbour resize."""
    factor = round(image.width / width)
    if (image.width, image.height) == (width, height):
        resized = image
    elif factor > 1 and _shrunk_size(image, factor) == (width, height):
        resized = nearest_shrink(image, factor)
    else:
        resized = image.resize(width / image.width, vscale=height / image.height, kernel="nearest")
    return resized.embed(0, 0, width, height, extend="copy")



def _shrunk_size(image: pyvips.Image, factor: int) -> tuple[int, int]:
    shrunk = image.shrink(factor, factor)
    return shrunk.width, shrunk.height

"""Per-pixel label masks in PANDA's layout, and their preparation beside the images.

PANDA ships ``train_label_masks/<image_id>_mask.tiff`` for most biopsies: a pyramidal TIFF of the
slide's size whose first (red) channel holds the label (Radboud: 0 background, 1 stroma, 2 benign
epithelium, 3/4/5 Gleason pattern; Karolinska: 0 background, 1 benign, 2 cancer). The synthetic
set writes the same files (:func:`write_label_mask`).

Preparation (:func:`prepare_label_mask`) puts a mask through exactly the geometry of its image
(:func:`repro.data.prepare.prepare_image`): read at the target mpp, cropped to the tissue box,
placed at the same offset in the ``input_size`` square (background 0 around it). Resampling is
nearest neighbour, so labels are never blended. The prepared mask is ``labels/<image_id>.png``
(8-bit, one channel, the label values) in the prepared folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyvips

from repro.atomic import atomic_path
from repro.data.slides import SlideError, explain_error, open_slide, to_numpy

logger = logging.getLogger(__name__)

RADBOUD_LABELS = {0: "background", 1: "stroma", 2: "benign epithelium", 3: "Gleason 3"}
RADBOUD_LABELS |= {4: "Gleason 4", 5: "Gleason 5"}
"""Values of a Radboud label mask."""
TUMOUR_MIN_LABEL = 3
"""Radboud: labels >= 3 are tumour."""


def label_mask_path(raw_dir: str | os.PathLike[str], image_id: str) -> Path:
    """``<raw_dir>/train_label_masks/<image_id>_mask.tiff`` (PANDA's layout)."""
    return Path(raw_dir) / "train_label_masks" / f"{image_id}_mask.tiff"


def source_label_mask(image_path: str | os.PathLike[str]) -> Path:
    """The label mask that PANDA's layout puts beside ``train_images/<image_id>.tiff``."""
    path = Path(image_path)
    return label_mask_path(path.parent.parent, path.stem)


def write_label_mask(labels: np.ndarray | pyvips.Image, path: str | os.PathLike[str], mpp: float):
    """Save a label image as PANDA does: RGB, the label in the red channel (green, blue 0), tiled
    and pyramidal like :func:`repro.data.slides.save_pyramid`, but lossless (deflate) and
    shrunk by nearest neighbour, so every level holds label values only. Written to a temporary
    name and renamed when complete."""
    image = labels
    if isinstance(labels, np.ndarray):
        image = pyvips.Image.new_from_array(np.ascontiguousarray(labels.astype(np.uint8)))
    if image.bands != 1:
        image = image.extract_band(0)
    zero = image.new_from_image(0)
    rgb = image.cast("uchar").bandjoin([zero, zero]).copy(interpretation="srgb")
    with atomic_path(path) as temporary:
        rgb.tiffsave(
            str(temporary),
            tile=True,
            tile_width=256,
            tile_height=256,
            pyramid=True,
            region_shrink="nearest",
            compression="deflate",
            xres=1000.0 / mpp,
            yres=1000.0 / mpp,
            bigtiff=rgb.width * rgb.height * 3 >= 2**32,
        )


def read_label_mask(path: str | os.PathLike[str], level: int = 0) -> np.ndarray:
    """A label mask (PANDA TIFF: its red channel; or a prepared PNG) as a uint8 (h, w) array."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        image = pyvips.Image.new_from_file(str(path))
        return to_numpy(image, path)[:, :, 0]
    slide = open_slide(path, mpp_override=1.0)
    return to_numpy(slide.read_level(level), path)[:, :, 0]


def prepared_label_path(prepared_dir: str | os.PathLike[str], image_id: str) -> Path:
    """``<prepared_dir>/labels/<image_id>.png``: a prepared label mask."""
    return Path(prepared_dir) / "labels" / f"{image_id}.png"


def prepare_label_mask(
    source_mask: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    scaled_size: tuple[int, int],
    box: tuple[int, int, int, int],
    offset: tuple[int, int],
    size: int,
) -> dict[str, Any]:
    """Prepare one label mask with its image's geometry; writes ``out_path`` (PNG, atomically).

    Args:
        source_mask: the raw label mask (PANDA: the size of its slide's level 0).
        out_path: the prepared mask (:func:`prepared_label_path`).
        scaled_size: (width, height) of the slide at the target mpp; the mask is resampled
            (nearest neighbour) to exactly this size, so it covers the slide as the image does.
        box: (x0, y0, width, height) of the tissue box in the scaled slide.
        offset: (left, top) of that box in the prepared image (negative: cropped).
        size: side of the prepared square image.

    Returns:
        ``{"label_path": <file name>, "tumour_fraction": <share of labels >= 3>}``.

    Raises:
        SlideError: the mask cannot be read.
    """
    mask = open_slide(source_mask, mpp_override=1.0)  # its mpp is its slide's; not needed
    width, height = scaled_size
    level = mask.levels[0]
    if abs(level.width / level.height - width / height) > 0.02 * width / height:
        logger.warning(
            "%s: %dx%d does not have its slide's aspect ratio (%dx%d at target mpp); stretched",
            source_mask,
            level.width,
            level.height,
            width,
            height,
        )
    image = mask.read_level(0).extract_band(0)
    image = image.resize(width / level.width, vscale=height / level.height, kernel="nearest")
    image = image.embed(0, 0, width, height, extend="black")  # exactly the scaled slide's size
    x0, y0, box_width, box_height = box
    left, top = offset
    labels = image.crop(x0, y0, box_width, box_height).embed(
        left, top, size, size, extend="black"
    )
    labels = labels.copy_memory()
    with atomic_path(out_path) as partial:
        try:
            labels.pngsave(str(partial))
        except pyvips.Error as error:
            raise SlideError(f"{source_mask}: {explain_error(error, 'cannot read')}") from None
    tumour = float((labels >= TUMOUR_MIN_LABEL).avg() / 255)
    return {"label_path": f"labels/{Path(out_path).name}", "tumour_fraction": tumour}


def prepare_labels_beside(
    source: str | os.PathLike[str],
    mask_path: str | os.PathLike[str],
    scaled_size: tuple[int, int],
    box: tuple[int, int, int, int],
    offset: tuple[int, int],
    size: int,
) -> dict[str, Any]:
    """The hook of :func:`repro.data.prepare.prepare_image`: prepares the label mask that PANDA's
    layout puts beside ``source`` (``train_label_masks/<image_id>_mask.tiff``) into ``labels/``
    beside the prepared tissue mask ``mask_path`` (``masks/<image_id>.png``); ``{}`` when the
    slide has no label mask."""
    label_source = source_label_mask(source)
    if not label_source.exists():
        return {}
    out = prepared_label_path(Path(mask_path).parent.parent, Path(source).stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    return prepare_label_mask(
        label_source, out, scaled_size=scaled_size, box=box, offset=offset, size=size
    )

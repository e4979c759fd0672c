"""Multi-resolution slide reading: one :class:`Slide` interface over pyvips and OpenSlide.

A :class:`Slide` lists the true pyramid levels of a whole-slide image (never thumbnail, label or
macro pages) with their sizes and microns per pixel, and reads a level (a lazy pyvips image), a
region (a uint8 array) or the whole slide at a given mpp. Two backends read files:

- **pyvips** (:mod:`repro.data.pyvips_backend`) for PANDA's and other plain or pyramidal TIFFs:
  lazy, only the tiles a request touches are decoded;
- **OpenSlide** (:mod:`repro.data.openslide_backend`) for vendor formats: Aperio ``.svs``
  (including JPEG 2000, which the pyvips wheel cannot decode), 3DHistech ``.mrxs``, Hamamatsu
  ``.ndpi``, Leica ``.scn``, Ventana ``.bif``, Philips TIFF, DICOM, ...

:func:`open_slide` picks the backend per file (``backend="auto"``, the default; params key
``data.slide_backend``): OpenSlide when it recognises a vendor format, pyvips for generic TIFFs,
and OpenSlide again when pyvips cannot decode a generic TIFF that OpenSlide can. The choice is
logged. Microns per pixel come from the file (OpenSlide's ``openslide.mpp-x``/``-y``, the TIFF
resolution tags or Aperio's ``MPP = ...``) or ``mpp_override`` (``data.mpp_override``); without
either, opening fails rather than guessing a magnification.

Every failure raises :class:`SlideError` naming the file: at open, a missing, empty, truncated
or unknown file, a missing mpp, or a level whose first tile does not decode (one tile of every
level is decoded when the slide is opened); later, a read that fails names the level and region.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from repro.data import openslide_backend, pyvips_backend
from repro.data.slide_base import (
    BACKENDS,
    MPP_RANGE,
    OPENSLIDE_SUFFIXES,
    PANDA_DOWNSAMPLES,
    SUPPORTED_FORMATS,
    Backend,
    Level,
    MissingMppError,
    Slide,
    aperio_mpp,
    as_rgb,
    check_file,
    crop_or_pad,
    explain_error,
    nearest_shrink,
    plausible_mpp,
    resample,
    save_pyramid,
    to_numpy,
)
from repro.exceptions import SlideError

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "MPP_RANGE",
    "OPENSLIDE_SUFFIXES",
    "PANDA_DOWNSAMPLES",
    "SUPPORTED_FORMATS",
    "Backend",
    "Level",
    "MissingMppError",
    "Slide",
    "SlideError",
    "aperio_mpp",
    "as_rgb",
    "check_file",
    "crop_or_pad",
    "explain_error",
    "nearest_shrink",
    "open_slide",
    "plausible_mpp",
    "resample",
    "save_pyramid",
    "to_numpy",
]


def open_slide(
    path: str | os.PathLike[str], mpp_override: float | None = None, backend: Backend = "auto"
) -> Slide:
    """Open a slide; raises :class:`SlideError` naming the file when it cannot be used.

    Args:
        path: a slide file (TIFF, SVS, MRXS, NDPI, ...; see :data:`SUPPORTED_FORMATS`).
        mpp_override: level-0 microns per pixel used when the file has no resolution of its own.
        backend: ``"auto"`` (per file, see the module docstring), ``"pyvips"`` or
            ``"openslide"``.
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_file(path)
    if backend == "pyvips":
        return pyvips_backend.PyvipsSlide(path, mpp_override)
    if backend == "openslide":
        return openslide_backend.OpenSlideSlide(path, mpp_override)
    vendor = openslide_backend.detect_format(path)
    if path.suffix.lower() in OPENSLIDE_SUFFIXES or vendor not in (None, "generic-tiff"):
        logger.info("%s: OpenSlide backend (format %s)", path, vendor or path.suffix)
        return openslide_backend.OpenSlideSlide(path, mpp_override)
    try:
        slide = pyvips_backend.PyvipsSlide(path, mpp_override)
    except MissingMppError:
        raise
    except SlideError as error:
        if vendor is None:
            raise
        logger.info("%s: pyvips cannot read it (%s); trying OpenSlide", path, error)
        try:
            slide = openslide_backend.OpenSlideSlide(path, mpp_override)
        except SlideError as second:
            reason = str(second).removeprefix(f"{path}: ")
            raise SlideError(f"{error}; OpenSlide cannot read it either: {reason}") from None
        logger.info("%s: OpenSlide backend (pyvips cannot decode it)", path)
        return slide
    logger.info("%s: pyvips backend", path)
    return slide

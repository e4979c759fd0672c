"""The pyvips slide backend: PANDA's and other plain or pyramidal TIFFs, read lazily.

Pyramid levels are the pages (or SubIFDs) that continue level 0's pyramid: tiled like level 0,
with its aspect ratio, each smaller than the last. Aperio's stripped thumbnail and the label and
macro pages are therefore not levels. Microns per pixel: Aperio's ``MPP = ...`` in the image
description, else the TIFF resolution tags (pyvips reports them as ``xres``/``yres`` in px/mm).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyvips

from repro.data.slide_base import (
    OPENSLIDE_SUFFIXES,
    SUPPORTED_FORMATS,
    Level,
    Slide,
    SlideError,
    aperio_mpp,
    as_rgb,
    crop_or_pad,
    explain_error,
)

_ASPECT_TOLERANCE = 0.02


class PyvipsSlide(Slide):
    """A slide read with pyvips; only the tiles a request touches are decoded."""

    backend = "pyvips"

    def __init__(self, path: str | os.PathLike[str], mpp_override: float | None = None) -> None:
        super().__init__(path, mpp_override)
        base = load(self.path)
        description = str(base.get("image-description")) if _has(base, "image-description") else ""
        candidates = []
        aperio = aperio_mpp(description)
        if aperio is not None:
            candidates.append((aperio, aperio, "aperio description"))
        mpp_x = 1000.0 / base.xres if base.xres > 0 else float("inf")
        mpp_y = 1000.0 / base.yres if base.yres > 0 else float("inf")
        candidates.append((mpp_x, mpp_y, "resolution tags"))
        self._set_mpp(candidates, f"resolution tags give {mpp_x:.4g} um/px")
        self._set_levels(pyramid_pages(self.path, base))
        self._probe()

    def read_level(self, level: int | Level = 0, access: str = "random") -> pyvips.Image:
        """A lazy pyvips image of one level (nothing is decoded until pixels are requested)."""
        lv = self.level(level)
        options = {"subifd": lv.page} if lv.subifd else {"page": lv.page}
        image = load(self.path, access=access, **options)
        if (image.width, image.height) != (lv.width, lv.height):
            raise SlideError(f"{self.path}: page {lv.page} changed size since the slide was opened")
        return as_rgb(image)

    def _read_pixels(self, x: int, y: int, width: int, height: int, level: Level) -> np.ndarray:
        left = round(x / level.downsample)
        top = round(y / level.downsample)
        where = f"x={x}, y={y}, {width}x{height}"
        try:
            image = self.read_level(level)
        except SlideError as error:
            reason = str(error).removeprefix(f"{self.path}: ")
            raise self.region_error(level, where, reason) from None
        try:
            return crop_or_pad(image, left, top, width, height).numpy()
        except pyvips.Error as error:
            raise self.region_error(level, where, explain_error(error, "cannot decode")) from None


def load(path: Path, access: str = "random", **options: int) -> pyvips.Image:
    """``pyvips.Image.new_from_file`` with errors that name the file and say why."""
    suffix = path.suffix.lower()
    if suffix in OPENSLIDE_SUFFIXES:
        raise SlideError(
            f"{path}: {suffix} slides need OpenSlide; set data.slide_backend to auto or openslide"
        )
    try:
        return pyvips.Image.new_from_file(str(path), access=access, fail_on="error", **options)
    except pyvips.Error as error:
        raise SlideError(f"{path}: {_explain_open(path, error)}") from None


def pyramid_pages(path: Path, base: pyvips.Image) -> list[tuple[int, int, int, bool]]:
    """``(page, width, height, subifd)`` of the pyramid levels, largest first: the SubIFDs if
    the file has them, else the pages that continue level 0's pyramid (see the module doc)."""
    width0, height0 = base.width, base.height
    tiled = _has(base, "tile-width")
    candidates: list[tuple[int, int, int, bool]] = []
    n_subifds = base.get("n-subifds") if _has(base, "n-subifds") else 0
    if n_subifds:
        for index in range(n_subifds):
            sub = load(path, subifd=index)
            candidates.append((index, sub.width, sub.height, True))
    else:
        n_pages = base.get("n-pages") if _has(base, "n-pages") else 1
        for page in range(1, n_pages):
            image = load(path, page=page)
            if tiled and not _has(image, "tile-width"):
                continue  # a stripped page in a tiled pyramid: thumbnail, label or macro image
            candidates.append((page, image.width, image.height, False))
    levels = [(0, width0, height0, False)]
    aspect = width0 / height0
    for page, width, height, subifd in sorted(candidates, key=lambda c: -c[1]):
        if abs(width / height - aspect) > _ASPECT_TOLERANCE * aspect + 2 / height:
            continue
        if width >= levels[-1][1]:
            continue
        levels.append((page, width, height, subifd))
    return levels


def _has(image: pyvips.Image, name: str) -> bool:
    return image.get_typeof(name) != 0


def _explain_open(path: Path, error: pyvips.Error) -> str:
    text = f"{error.message} {error.detail}".lower()
    if "not a known file format" in text:
        with path.open("rb") as handle:
            magic = handle.read(4)
        if magic in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return "truncated or damaged TIFF (its header is there, its directory is not)"
        return f"not an image file pyvips or OpenSlide can read; supported: {SUPPORTED_FORMATS}"
    return explain_error(error, "cannot open")

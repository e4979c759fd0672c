"""Multi-resolution slide reading with pyvips.

A :class:`Slide` lists the pyramid levels of a TIFF (PANDA's ``train_images/<image_id>.tiff``,
an Aperio ``.svs`` or any tiled pyramidal TIFF) with their sizes and microns per pixel, and reads
a level or a region lazily: pyvips only decodes the tiles a request touches.

Microns per pixel come from the file: the TIFF resolution tags (pyvips reports them as ``xres`` /
``yres`` in pixels per mm) or, for Aperio files, ``MPP = ...`` in the image description. A file
without a plausible resolution needs ``mpp_override`` (``data.mpp_override`` in the params);
without either, opening fails loudly rather than guessing a magnification.

Every failure (missing, truncated or non-image file, an undecodable tile) raises
:class:`SlideError` naming the file. Vendor formats that need OpenSlide (``.mrxs``, ``.ndpi``,
...) and JPEG 2000 compressed SVS files are reported as such: the pyvips wheel used here is built
without OpenSlide and without JPEG 2000.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyvips
from repro.exceptions import SlideError

# pyvips forwards libvips's chatter ("threadpool completed ...") at INFO level; keep it out of
# INFO-level application logs.
logging.getLogger("pyvips").setLevel(logging.WARNING)

MPP_RANGE = (0.01, 100.0)
"""Plausible microns per pixel; a TIFF without resolution tags reads as 1 px/mm (1000 um/px)."""

OPENSLIDE_SUFFIXES = {".mrxs", ".ndpi", ".vms", ".vmu", ".scn", ".bif", ".svslide", ".czi"}
"""Vendor formats that need OpenSlide (or a vendor SDK), which this pyvips build lacks."""

_APERIO_MPP = re.compile(r"MPP\s*=\s*([0-9.]+)")
_ASPECT_TOLERANCE = 0.02


@dataclass(frozen=True)
class Level:
    """One resolution of a slide.

    Attributes:
        index: position in :attr:`Slide.levels` (0 = full resolution).
        page: the TIFF page (IFD) that holds it, or the sub-IFD for SubIFD pyramids.
        width, height: size in pixels.
        downsample: level-0 width / this width.
        mpp: microns per pixel horizontally (vertically: :attr:`mpp_y`).
        mpp_y: microns per pixel vertically.
    """

    index: int
    page: int
    width: int
    height: int
    downsample: float
    mpp: float
    mpp_y: float
    subifd: bool = False


class Slide:
    """A pyramidal slide opened with pyvips. Use :func:`open_slide`."""

    def __init__(self, path: str | os.PathLike[str], mpp_override: float | None = None) -> None:
        self.path = Path(path)
        self.mpp_override = mpp_override
        base = _load(self.path)
        self.mpp, self.mpp_y, self.mpp_source = _level0_mpp(self.path, base, mpp_override)
        self.levels = _list_levels(self.path, base, self.mpp, self.mpp_y)
        # Decode one pixel of the smallest level now, so that undecodable files (JPEG 2000,
        # damaged tiles at the start) fail when opened rather than midway through a pipeline.
        to_numpy(self.read_level(self.levels[-1]).crop(0, 0, 1, 1), self.path)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{lv.width}x{lv.height}@{lv.mpp:.3g}" for lv in self.levels)
        return f"Slide({str(self.path)!r}, levels=[{sizes}])"

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)``."""
        return self.levels[0].width, self.levels[0].height

    def level(self, level: int | Level) -> Level:
        """The :class:`Level` with this index (negative counts from the smallest)."""
        if isinstance(level, Level):
            return level
        try:
            return self.levels[level]
        except IndexError:
            raise SlideError(
                f"{self.path}: no level {level}; the slide has {len(self.levels)}"
            ) from None

    def best_level(self, target_mpp: float, tolerance: float = 0.02) -> Level:
        """The coarsest level at least as fine as ``target_mpp`` (within ``tolerance``, relative).

        Reading it and shrinking by the exact ratio never upsamples. When even level 0 is coarser
        than the target, level 0 is returned (the caller then upsamples).
        """
        fine_enough = [lv for lv in self.levels if lv.mpp <= target_mpp * (1 + tolerance)]
        return fine_enough[-1] if fine_enough else self.levels[0]

    def read_level(self, level: int | Level = 0, access: str = "random") -> pyvips.Image:
        """A lazy pyvips image of one level (nothing is decoded until pixels are requested).

        Args:
            level: level index or :class:`Level`.
            access: ``"random"`` (regions in any order) or ``"sequential"`` (top to bottom once,
                e.g. for a single streaming pass over a strip TIFF).
        """
        lv = self.level(level)
        options = {"subifd": lv.page} if lv.subifd else {"page": lv.page}
        image = _load(self.path, access=access, **options)
        if (image.width, image.height) != (lv.width, lv.height):
            raise SlideError(f"{self.path}: page {lv.page} changed size since the slide was opened")
        return _as_rgb(image)

    def read_region(
        self, x: int, y: int, width: int, height: int, level: int | Level = 0
    ) -> np.ndarray:
        """Pixels of a region as a uint8 ``(height, width, 3)`` array.

        Args:
            x, y: top-left corner in level-0 coordinates (OpenSlide's convention).
            width, height: size in pixels of ``level``.
            level: the level to read from.

        Only the tiles that overlap the region are decoded. Parts outside the slide are white.
        """
        lv = self.level(level)
        if width <= 0 or height <= 0:
            raise ValueError(f"region size must be positive, got {width}x{height}")
        left = round(x / lv.downsample)
        top = round(y / lv.downsample)
        image = self.read_level(lv)
        return to_numpy(crop_or_pad(image, left, top, width, height), self.path)

    def read_at_mpp(self, target_mpp: float, access: str = "random") -> pyvips.Image:
        """The whole slide resampled to ``target_mpp``, lazily.

        Reads :meth:`best_level` and shrinks it by the exact ratio of resolutions with an
        antialiasing filter (pyvips ``resize``, lanczos3; an integer ratio such as PANDA's
        0.48 -> 0.96 um/px is a plain box average via ``shrink``).
        """
        lv = self.best_level(target_mpp)
        image = self.read_level(lv, access=access)
        return resample(image, lv.mpp / target_mpp, lv.mpp_y / target_mpp)


def open_slide(path: str | os.PathLike[str], mpp_override: float | None = None) -> Slide:
    """Open a slide; raises :class:`SlideError` naming the file when it cannot be used.

    Args:
        path: a (pyramidal) TIFF / SVS file.
        mpp_override: level-0 microns per pixel used when the file has no resolution of its own.
    """
    return Slide(path, mpp_override=mpp_override)


def resample(image: pyvips.Image, scale: float, vscale: float | None = None) -> pyvips.Image:
    """Resize by ``scale`` (< 1 shrinks) with antialiasing; integer shrinks are box averages."""
    vscale = scale if vscale is None else vscale
    if abs(scale - 1) < 1e-6 and abs(vscale - 1) < 1e-6:
        return image
    factor_x, factor_y = 1 / scale, 1 / vscale
    if (
        scale < 1
        and vscale < 1
        and abs(factor_x - round(factor_x)) < 1e-3
        and abs(factor_y - round(factor_y)) < 1e-3
    ):
        return image.shrink(round(factor_x), round(factor_y))
    return image.resize(scale, vscale=vscale, kernel="lanczos3")


def crop_or_pad(image: pyvips.Image, left: int, top: int, width: int, height: int) -> pyvips.Image:
    """The region ``(left, top, width, height)`` of ``image``; parts outside it are white."""
    inside = left >= 0 and top >= 0 and left + width <= image.width and top + height <= image.height
    if inside:
        return image.crop(left, top, width, height)
    return image.embed(-left, -top, width, height, extend="white")


def to_numpy(image: pyvips.Image, path: str | os.PathLike[str] | None = None) -> np.ndarray:
    """Decode a pyvips image to a numpy array; a decoding error names ``path``."""
    try:
        array = image.numpy()
    except pyvips.Error as error:
        where = path if path is not None else "<image>"
        raise SlideError(f"{where}: {explain_error(error, 'cannot decode pixels')}") from None
    if array.ndim == 2:
        array = array[:, :, None]
    return array


def _load(path: Path, access: str = "random", **options: int) -> pyvips.Image:
    """``pyvips.Image.new_from_file`` with errors that name the file and say why."""
    suffix = path.suffix.lower()
    if not path.exists():
        raise SlideError(f"{path}: no such file")
    if not path.is_file():
        raise SlideError(f"{path}: not a file")
    if suffix in OPENSLIDE_SUFFIXES:
        raise SlideError(
            f"{path}: {suffix} slides need OpenSlide, which this pyvips build lacks; convert the "
            "slide to a pyramidal TIFF (e.g. with vips or bfconvert) first"
        )
    if path.stat().st_size == 0:
        raise SlideError(f"{path}: empty file")
    try:
        image = pyvips.Image.new_from_file(str(path), access=access, fail_on="error", **options)
    except pyvips.Error as error:
        raise SlideError(f"{path}: {_explain_open(path, error)}") from None
    return image


def explain_error(error: pyvips.Error, what: str) -> str:
    """A one-line reason for a pyvips error (JPEG 2000 tiles get a hint on what to do)."""
    text = f"{error.message} {error.detail}".lower()
    if "33003" in text or "33005" in text or "jpeg2000" in text or "jp2k" in text:
        return (
            "JPEG 2000 compressed (e.g. Aperio 33003/33005); this pyvips build has no JPEG 2000 "
            "decoder: convert the slide to a JPEG-compressed pyramidal TIFF first"
        )
    return f"{what}: {_first_line(error)}"


def _explain_open(path: Path, error: pyvips.Error) -> str:
    text = f"{error.message} {error.detail}".lower()
    if "not a known file format" in text:
        with path.open("rb") as handle:
            magic = handle.read(4)
        if magic in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return "truncated or damaged TIFF (its header is there, its directory is not)"
        return "not an image file pyvips can read"
    return explain_error(error, "cannot open")


def _first_line(error: pyvips.Error) -> str:
    detail = (error.detail or "").strip().splitlines()
    return detail[0] if detail else str(error.message)


def _level0_mpp(
    path: Path, image: pyvips.Image, override: float | None
) -> tuple[float, float, str]:
    """Level-0 (mpp_x, mpp_y, source): Aperio description, else resolution tags, else override."""
    if image.get_typeof("image-description"):
        match = _APERIO_MPP.search(str(image.get("image-description")))
        if match and _plausible(float(match.group(1))):
            mpp = float(match.group(1))
            return mpp, mpp, "aperio description"
    mpp_x = 1000.0 / image.xres if image.xres > 0 else float("inf")
    mpp_y = 1000.0 / image.yres if image.yres > 0 else float("inf")
    if _plausible(mpp_x) and _plausible(mpp_y):
        return mpp_x, mpp_y, "resolution tags"
    if override is not None:
        return float(override), float(override), "mpp_override"
    raise SlideError(
        f"{path}: no microns-per-pixel in the file (resolution tags give {mpp_x:.4g} um/px); "
        "set data.mpp_override to the level-0 resolution"
    )


def _plausible(mpp: float) -> bool:
    return MPP_RANGE[0] <= mpp <= MPP_RANGE[1]


def _list_levels(path: Path, base: pyvips.Image, mpp: float, mpp_y: float) -> list[Level]:
    """Pyramid levels: SubIFDs if the file has them, else the pages with level 0's aspect ratio
    (that leaves out Aperio label and macro images), largest first."""
    width0, height0 = base.width, base.height
    aspect = width0 / height0
    candidates: list[tuple[int, int, int, bool]] = [(0, width0, height0, False)]
    n_subifds = base.get("n-subifds") if base.get_typeof("n-subifds") else 0
    if n_subifds:
        for index in range(n_subifds):
            sub = _load(path, subifd=index)
            candidates.append((index, sub.width, sub.height, True))
    else:
        n_pages = base.get("n-pages") if base.get_typeof("n-pages") else 1
        for page in range(1, n_pages):
            image = _load(path, page=page)
            candidates.append((page, image.width, image.height, False))
    levels: list[Level] = []
    seen_widths: set[int] = set()
    for page, width, height, subifd in sorted(candidates, key=lambda c: -c[1]):
        if abs(width / height - aspect) > _ASPECT_TOLERANCE * aspect + 2 / height:
            continue
        if width in seen_widths or width > width0:
            continue
        seen_widths.add(width)
        down_x, down_y = width0 / width, height0 / height
        levels.append(
            Level(
                index=len(levels),
                page=page,
                width=width,
                height=height,
                downsample=down_x,
                mpp=mpp * down_x,
                mpp_y=mpp_y * down_y,
                subifd=subifd,
            )
        )
    return levels


def _as_rgb(image: pyvips.Image) -> pyvips.Image:
    """Three uint8 sRGB bands: alpha flattened on white, grey expanded, 16-bit scaled."""
    if image.hasalpha():
        image = image.flatten(background=[255] * (image.bands - 1))
    if image.format != "uchar":
        if image.interpretation in ("rgb16", "grey16"):
            image = image.colourspace("srgb")
        image = image.cast("uchar")
    if image.bands == 1:
        image = image.bandjoin([image, image])
    elif image.bands > 3:
        image = image.extract_band(0, n=3)
    return image


def save_pyramid(image: pyvips.Image, path: str | os.PathLike[str], mpp: float) -> None:
    """Write ``image`` as a tiled, JPEG-compressed pyramidal TIFF with its mpp in the tags.

    Both the synthetic raw slides and the prepared images use this one format; BigTIFF is used
    when the pixels exceed the 4 GiB classic-TIFF limit.
    """
    image.tiffsave(
        str(path),
        tile=True,
        tile_width=256,
        tile_height=256,
        pyramid=True,
        compression="jpeg",
        Q=90,
        xres=1000.0 / mpp,
        yres=1000.0 / mpp,
        bigtiff=image.width * image.height * image.bands >= 2**32,
    )

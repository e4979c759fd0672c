"""The :class:`Slide` interface both slide backends implement, and the pyvips helpers they share
(levels, mpp, regions, pyramid writing). Users open slides with
:func:`repro.data.slides.open_slide`, which also re-exports these names."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyvips

from repro.data.tiff import join_pages
from repro.exceptions import SlideError

# pyvips forwards libvips's chatter ("threadpool completed ...") at INFO level; keep it out of
# INFO-level application logs.
logging.getLogger("pyvips").setLevel(logging.WARNING)
logger = logging.getLogger(__name__)

Backend = Literal["auto", "pyvips", "openslide"]
BACKENDS = ("auto", "pyvips", "openslide")

MPP_RANGE = (0.01, 100.0)
"""Plausible microns per pixel; a TIFF without resolution tags reads as 1 px/mm (1000 um/px)."""

OPENSLIDE_SUFFIXES = {".mrxs", ".ndpi", ".vms", ".vmu", ".scn", ".bif", ".svslide", ".czi", ".dcm"}
"""Vendor formats only OpenSlide reads here."""

SUPPORTED_FORMATS = (
    "plain or pyramidal TIFF/BigTIFF such as PANDA's (.tif, .tiff; pyvips), and through "
    "OpenSlide: Aperio (.svs, .tif), DICOM (.dcm), Hamamatsu (.ndpi, .vms, .vmu), Leica (.scn), "
    "MIRAX/3DHistech (.mrxs), Philips (.tiff), Sakura (.svslide), Trestle (.tif), Ventana "
    "(.bif, .tif), Zeiss (.czi) and generic tiled TIFF"
)
"""What :func:`open_slide` reads, for error messages."""

PANDA_DOWNSAMPLES = (1, 4, 16)
"""Page downsamples of PANDA's Radboud TIFFs (and of the synthetic raw slides)."""

_APERIO_MPP = re.compile(r"MPP\s*=\s*([0-9.]+)")


class MissingMppError(SlideError):
    """The slide has no usable microns per pixel and no ``mpp_override`` was given."""


@dataclass(frozen=True)
class Level:
    """One resolution of a slide.

    Attributes:
        index: position in :attr:`Slide.levels` (0 = full resolution).
        page: the TIFF page (IFD) that holds it, the sub-IFD for SubIFD pyramids, or OpenSlide's
            level number.
        width, height: size in pixels.
        downsample: level-0 width / this width.
        mpp: microns per pixel horizontally (vertically: :attr:`mpp_y`).
        mpp_y: microns per pixel vertically.
        subifd: the level is a TIFF sub-IFD (pyvips backend).
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
    """A pyramidal slide; use :func:`open_slide`. Backends implement :meth:`read_level` and
    :meth:`_read_pixels`."""

    backend = ""

    def __init__(self, path: str | os.PathLike[str], mpp_override: float | None = None) -> None:
        self.path = Path(path)
        self.mpp_override = mpp_override
        self.mpp = self.mpp_y = float("nan")
        self.mpp_source = ""
        self.levels: list[Level] = []

    def __repr__(self) -> str:
        sizes = ", ".join(f"{lv.width}x{lv.height}@{lv.mpp:.3g}" for lv in self.levels)
        return f"{type(self).__name__}({str(self.path)!r}, levels=[{sizes}])"

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the file (and temporary files); the slide cannot be read afterwards."""

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
        """One level as a pyvips image (three uint8 sRGB bands).

        Args:
            level: level index or :class:`Level`.
            access: ``"random"`` (regions in any order) or ``"sequential"`` (top to bottom once).
        """
        raise NotImplementedError

    def read_region(
        self, x: int, y: int, width: int, height: int, level: int | Level = 0
    ) -> np.ndarray:
        """Pixels of a region as a uint8 ``(height, width, 3)`` array.

        Args:
            x, y: top-left corner in level-0 coordinates (OpenSlide's convention).
            width, height: size in pixels of ``level``.
            level: the level to read from.

        Only the tiles that overlap the region are decoded. Parts outside the slide are white.

        Raises:
            SlideError: naming the file, the level and the region, when pixels do not decode.
        """
        lv = self.level(level)
        if width <= 0 or height <= 0:
            raise ValueError(f"region size must be positive, got {width}x{height}")
        return self._read_pixels(x, y, width, height, lv)

    def _read_pixels(self, x: int, y: int, width: int, height: int, level: Level) -> np.ndarray:
        raise NotImplementedError

    def read_at_mpp(self, target_mpp: float, access: str = "random") -> pyvips.Image:
        """The whole slide resampled to ``target_mpp``, lazily.

        Reads :meth:`best_level` and shrinks it by the exact ratio of resolutions with an
        antialiasing filter (pyvips ``resize``, lanczos3; an integer ratio such as PANDA's
        0.48 -> 0.96 um/px is a plain box average via ``shrink``).
        """
        lv = self.best_level(target_mpp)
        image = self.read_level(lv, access=access)
        return resample(image, lv.mpp / target_mpp, lv.mpp_y / target_mpp)

    def region_error(self, level: Level, region: str, reason: str) -> SlideError:
        """A :class:`SlideError` for a failed read: file, backend, level and region."""
        return SlideError(
            f"{self.path}: cannot read level {level.index} ({level.width}x{level.height}), "
            f"region {region}, with {self.backend}: {reason}"
        )

    def _probe(self) -> None:
        """Decode one pixel (so one tile) of every level, so that a level that cannot be decoded
        fails when the slide is opened rather than midway through a pipeline."""
        for lv in self.levels:
            self.read_region(0, 0, 1, 1, lv)

    def _set_levels(self, sizes: Sequence[tuple[int, int, int, bool]]) -> None:
        """Levels from ``(page, width, height, subifd)``, largest first; needs level-0 mpp."""
        width0, height0 = sizes[0][1], sizes[0][2]
        self.levels = [
            Level(
                index=index,
                page=page,
                width=width,
                height=height,
                downsample=width0 / width,
                mpp=self.mpp * width0 / width,
                mpp_y=self.mpp_y * height0 / height,
                subifd=subifd,
            )
            for index, (page, width, height, subifd) in enumerate(sizes)
        ]

    def _set_mpp(self, candidates: Sequence[tuple[float, float, str]], found: str) -> None:
        """Level-0 mpp: the first plausible candidate ``(mpp_x, mpp_y, source)``, else the
        override; ``found`` describes what the file had, for the error message."""
        for mpp_x, mpp_y, source in candidates:
            if plausible_mpp(mpp_x) and plausible_mpp(mpp_y):
                self.mpp, self.mpp_y, self.mpp_source = float(mpp_x), float(mpp_y), source
                return
        if self.mpp_override is not None:
            self.mpp = self.mpp_y = float(self.mpp_override)
            self.mpp_source = "mpp_override"
            return
        raise MissingMppError(
            f"{self.path}: no microns-per-pixel in the file ({found}); set data.mpp_override "
            "(or the mpp column of a CSV dataset) to the level-0 resolution"
        )


def check_file(path: Path) -> None:
    """Raise :class:`SlideError` unless ``path`` is a non-empty file."""
    if not path.exists():
        raise SlideError(f"{path}: no such file")
    if not path.is_file():
        raise SlideError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise SlideError(f"{path}: empty file")


def plausible_mpp(mpp: float) -> bool:
    """Whether ``mpp`` is a believable microns-per-pixel value (see :data:`MPP_RANGE`)."""
    return MPP_RANGE[0] <= mpp <= MPP_RANGE[1]


def aperio_mpp(description: str) -> float | None:
    """``MPP = ...`` from an Aperio image description, if present."""
    match = _APERIO_MPP.search(description)
    return float(match.group(1)) if match else None


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


def explain_error(error: pyvips.Error, what: str) -> str:
    """A one-line reason for a pyvips error (JPEG 2000 tiles get a hint on what to do)."""
    text = f"{error.message} {error.detail}".lower()
    if "33003" in text or "33005" in text or "jpeg2000" in text or "jp2k" in text:
        return (
            "JPEG 2000 compressed (e.g. Aperio 33003/33005), which the pyvips build has no "
            "decoder for: read it with OpenSlide (data.slide_backend: auto or openslide)"
        )
    detail = (error.detail or "").strip().splitlines()
    return f"{what}: {detail[0] if detail else error.message}"


def as_rgb(image: pyvips.Image) -> pyvips.Image:
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


def save_pyramid(
    image: pyvips.Image,
    path: str | os.PathLike[str],
    mpp: float,
    layout: Literal["halving", "panda"] = "halving",
    *,
    labels: bool = False,
) -> None:
    """Write ``image`` as a tiled (256 px), JPEG-compressed (Q90) pyramidal TIFF.

    Args:
        image: RGB uint8.
        path: the output file (written in place; wrap in :func:`repro.io.atomic.atomic_path`).
        mpp: level-0 microns per pixel, written to the resolution tags.
        layout: ``"halving"``: pages 1, 1/2, 1/4, ... down to one tile (libvips's pyramid; the
            prepared images); ``"panda"``: exactly PANDA's pages 1, 1/4, 1/16 (box averages of
            ``image``), each with its own resolution tags (the synthetic raw slides).
        labels: ``image`` holds label values (a label mask): lossless (deflate) instead of JPEG,
            and the lower pages are shrunk by nearest neighbour, so they hold label values only.

    BigTIFF is used when the pixels exceed the 4 GiB classic-TIFF limit.
    """
    options = {"tile": True, "tile_width": 256, "tile_height": 256}
    options |= {"compression": "deflate"} if labels else {"compression": "jpeg", "Q": 90}
    options |= {"bigtiff": image.width * image.height * image.bands >= 2**32}
    if layout == "halving":
        shrink = "nearest" if labels else "mean"
        image.tiffsave(
            str(path),
            pyramid=True,
            region_shrink=shrink,
            xres=1000.0 / mpp,
            yres=1000.0 / mpp,
            **options,
        )
        return
    if layout != "panda":
        raise ValueError(f"layout must be 'halving' or 'panda', got {layout!r}")
    folder = Path(tempfile.mkdtemp(prefix=".pages-", dir=Path(path).parent))
    try:
        pages = []
        for index, factor in enumerate(PANDA_DOWNSAMPLES):
            if min(image.width, image.height) < factor:
                break
            if factor == 1:
                page = image
            else:
                page = nearest_shrink(image, factor) if labels else image.shrink(factor, factor)
            name = folder / f"page{index}.tiff"
            resolution = 1000.0 / (mpp * image.width / page.width)
            page.tiffsave(str(name), xres=resolution, yres=resolution, **options)
            pages.append(name)
        join_pages(pages, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def nearest_shrink(image: pyvips.Image, factor: int) -> pyvips.Image:
    """``image`` shrunk by an integer ``factor`` to the size ``image.shrink(factor, factor)``
    has, each output pixel the input pixel at the centre of its ``factor`` x ``factor`` block
    (blocks past the edge take the edge pixel)."""
    shrunk = image.shrink(factor, factor)  # only for its size (rounded as libvips rounds)
    width, height = shrunk.width * factor, shrunk.height * factor
    half = factor // 2
    grown = image.embed(0, 0, width + factor, height + factor, extend="copy")
    return grown.crop(half, half, width, height).subsample(factor, factor)

"""The OpenSlide slide backend: vendor formats (Aperio, MIRAX, Hamamatsu, Leica, Ventana, ...).

``openslide-python`` with the ``openslide-bin`` wheel (the library itself, JPEG 2000 included).
Levels and microns per pixel are OpenSlide's (``level_dimensions``, ``openslide.mpp-x``/``-y``),
so associated images (thumbnail, label, macro) are never levels. Regions are OpenSlide's
``read_region`` with the transparent parts (outside the scanned area) flattened on white.

:meth:`OpenSlideSlide.read_level` returns a pyvips image like the pyvips backend, so everything
downstream works unchanged. OpenSlide decodes only on request, but pyvips cannot call back into
it, so a level is decoded once, in strips, into a temporary raw file that pyvips maps lazily
(``TMPDIR``; a level takes width x height x 3 bytes there until the slide is closed). Levels up
to :data:`IN_MEMORY_PIXELS` are read in one call and held in memory. Strips are requested at
level-0 rows ``round(row * downsample)``: exact for level 0 and integer downsamples; for a large
level with a fractional downsample OpenSlide interpolates each strip's sub-pixel remainder, as it
does for its own DeepZoom tiles.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path
from types import ModuleType

import numpy as np
import pyvips
from tqdm.auto import tqdm

from repro.data.slide_base import SUPPORTED_FORMATS, Level, Slide, SlideError

IN_MEMORY_PIXELS = 2**26
"""Levels up to this many pixels (64 MP, 192 MB as RGB) are held in memory, larger ones in a
temporary file."""
STRIP_BYTES = 2**26
"""Bytes of RGBA asked of OpenSlide per strip when a level is decoded."""


def _openslide() -> ModuleType:
    try:
        import openslide
    except ImportError as error:
        raise SlideError(
            f"OpenSlide is not available ({error}); install openslide-python and openslide-bin "
            "(pinned in pyproject.toml)"
        ) from None
    return openslide


def detect_format(path: str | os.PathLike[str]) -> str | None:
    """OpenSlide's name for the file's format (``"aperio"``, ``"mirax"``, ``"generic-tiff"``,
    ...), or None when OpenSlide does not recognise it (or is not installed)."""
    try:
        openslide = _openslide()
    except SlideError:
        return None
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        return None


class OpenSlideSlide(Slide):
    """A slide read with OpenSlide; :attr:`vendor` is OpenSlide's name for its format."""

    backend = "openslide"

    def __init__(self, path: str | os.PathLike[str], mpp_override: float | None = None) -> None:
        super().__init__(path, mpp_override)
        openslide = _openslide()
        self._error = openslide.OpenSlideError
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideError(
                f"{self.path}: not a slide OpenSlide reads; supported: {SUPPORTED_FORMATS}"
            ) from None
        except (openslide.OpenSlideError, OSError) as error:
            raise SlideError(f"{self.path}: OpenSlide cannot open it: {error}") from None
        self._folders: list[Path] = []
        self._closer = weakref.finalize(self, _release, self._osr, self._folders)
        self.vendor = self._osr.properties.get("openslide.vendor", "")  # "aperio", "mirax", ...
        mpp_x = _float(self._osr.properties.get("openslide.mpp-x"))
        mpp_y = _float(self._osr.properties.get("openslide.mpp-y"))
        found = "no openslide.mpp-x/-y" if np.isnan(mpp_x) else f"openslide.mpp-x {mpp_x:.4g}"
        self._set_mpp([(mpp_x, mpp_y, "openslide.mpp")], found)
        dims = self._osr.level_dimensions
        self._set_levels([(index, w, h, False) for index, (w, h) in enumerate(dims)])
        self._levels: dict[int, pyvips.Image] = {}
        self._probe()

    def close(self) -> None:
        """Close the OpenSlide handle and remove the temporary level files."""
        self._levels.clear()
        self._closer()

    def read_level(self, level: int | Level = 0, access: str = "random") -> pyvips.Image:
        """One level as a pyvips image, decoded once per slide (see the module docstring)."""
        lv = self.level(level)
        if lv.index not in self._levels:
            self._levels[lv.index] = self._decode_level(lv)
        return self._levels[lv.index]

    def _decode_level(self, level: Level) -> pyvips.Image:
        width, height = level.width, level.height
        if width * height <= IN_MEMORY_PIXELS:
            pixels = self._read_pixels(0, 0, width, height, level)
            return pyvips.Image.new_from_array(pixels, interpretation="srgb")
        if not self._folders:
            self._folders.append(Path(tempfile.mkdtemp(prefix="repro-openslide-")))
        raw = self._folders[0] / f"level{level.index}.raw"
        target = np.lib.format.open_memmap(raw, mode="w+", dtype=np.uint8, shape=(height, width, 3))
        offset = target.offset
        rows = max(1, STRIP_BYTES // (4 * width))
        bar = tqdm(total=height, desc=f"decode {self.path.name} level {level.index}", unit="row")
        for top in range(0, height, rows):
            count = min(rows, height - top)
            y = round(top * self.levels[0].height / height)
            target[top : top + count] = self._read_pixels(0, y, width, count, level)
            bar.update(count)
        bar.close()
        target.flush()
        del target
        image = pyvips.Image.rawload(str(raw), width, height, 3, offset=offset)
        return image.copy(interpretation="srgb")

    def _read_pixels(self, x: int, y: int, width: int, height: int, level: Level) -> np.ndarray:
        try:
            region = self._osr.read_region((x, y), level.page, (width, height))
        except (self._error, ValueError) as error:
            where = f"x={x}, y={y}, {width}x{height}"
            raise self.region_error(level, where, str(error) or type(error).__name__) from None
        return flatten_on_white(np.asarray(region))


def _release(osr: object, folders: list[Path]) -> None:
    """Close the OpenSlide handle and remove the temporary folders (runs once)."""
    osr.close()
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    folders.clear()


def flatten_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGB uint8 from OpenSlide's (non-premultiplied) RGBA, transparent parts white."""
    alpha = rgba[:, :, 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[:, :, :3])
    rgb = rgba[:, :, :3].astype(np.uint16)
    alpha = alpha.astype(np.uint16)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _float(value: str | None) -> float:
    try:
        return float(value) if value is not None else float("nan")
    except ValueError:
        return float("nan")

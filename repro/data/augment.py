"""Data augmentation with pyvips (paper IV-A): elastic deformation, rotations, flips, colour.

The paper lists elastic random transformation, colour augmentation (hue, saturation,
brightness), random horizontal and vertical flips and rotations, done with VIPS to keep whole
16384 x 16384 biopsies affordable; it gives no magnitudes. Ours (``AugmentationSettings``,
defaults are our choice):

- flips: horizontal and vertical, each with probability 1/2 (``flips``);
- rotations: a random multiple of 90 degrees (``rotate_90``), exact and lossless, then a small
  angle uniform in ``[-rotation_degrees, rotation_degrees]`` about the centre (the image keeps its
  size; uncovered corners are white, like the background);
- elastic: a smooth random displacement field, Gaussian-filtered white noise (filter sigma
  ``elastic_sigma`` px) scaled so that its largest displacement is ``elastic_alpha`` px. It is
  drawn on a grid ``elastic_sigma / 4`` px apart and interpolated bilinearly by pyvips; the small
  rotation is folded into the same map, so the image is resampled once (``mapim``, bilinear);
- colour, in CIE LCh (authors' code: about 5% in LCh): lightness scaled by ``1 + U(-b, b)``
  (``brightness``), chroma by ``1 + U(-s, s)`` (``saturation``), hue shifted by ``U(-h, h)``
  turns (``hue``, 0.05 = 18 degrees).

Everything is a lazy pyvips pipeline: nothing is computed until pixels are read, only the
coarse displacement grid is made in numpy, so a 16384 x 16384 image costs no more memory than its
output. Given the same image size and a generator in the same state, the result is the same.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import pyvips
from scipy import ndimage

from repro.config import AugmentationSettings

WHITE = [255.0, 255.0, 255.0]


def augmentation_rng(seed: int, epoch: int, image_id: str, *position: int) -> np.random.Generator:
    """The augmentation generator of one image (or of the patch at ``position`` = x, y) in one
    epoch, determined by its arguments alone (the same in every process and on every restart)."""
    digest = hashlib.sha256(str(image_id).encode()).digest()
    key = int.from_bytes(digest[:8], "little")
    return np.random.default_rng([int(seed), int(epoch), key, *(int(p) for p in position)])


@dataclass(frozen=True)
class AugmentationDraw:
    """The random choices for one image (drawn up front, in a fixed order)."""

    flip_horizontal: bool
    flip_vertical: bool
    quarter_turns: int
    angle: float  # degrees, counter-clockwise
    lightness: float  # multiplicative factor
    chroma: float  # multiplicative factor
    hue: float  # degrees added


class Augmenter:
    """Random augmentation of pyvips images; ``augmenter(image, rng) -> image``.

    Args:
        settings: magnitudes (``params.augmentation``). With ``enabled`` false the image is
            returned unchanged.
    """

    def __init__(self, settings: AugmentationSettings) -> None:
        self.settings = settings

    def draw(self, rng: np.random.Generator) -> AugmentationDraw:
        """The scalar random choices; always consumes the same numbers from ``rng``."""
        s = self.settings
        u = rng.random(7)
        return AugmentationDraw(
            flip_horizontal=bool(s.flips and u[0] < 0.5),
            flip_vertical=bool(s.flips and u[1] < 0.5),
            quarter_turns=int(u[2] * 4) % 4 if s.rotate_90 else 0,
            angle=float((2 * u[3] - 1) * s.rotation_degrees),
            lightness=float(1 + (2 * u[4] - 1) * s.brightness),
            chroma=float(1 + (2 * u[5] - 1) * s.saturation),
            hue=float((2 * u[6] - 1) * s.hue * 360.0),
        )

    def __call__(self, image: pyvips.Image, rng: np.random.Generator) -> pyvips.Image:
        if not self.settings.enabled:
            return image
        choice = self.draw(rng)
        image = flip_rotate(
            image, choice.flip_horizontal, choice.flip_vertical, choice.quarter_turns
        )
        index = self.displacement_map(image.width, image.height, choice.angle, rng)
        if index is not None:
            image = image.mapim(
                index,
                interpolate=pyvips.Interpolate.new("bilinear"),
                extend="background",
                background=WHITE[: image.bands],
            )
            image = image.cast("uchar")
        return adjust_colour(image, choice.lightness, choice.chroma, choice.hue)

    def displacement_map(
        self, width: int, height: int, angle: float, rng: np.random.Generator
    ) -> pyvips.Image | None:
        """The 2-band float map for ``mapim``: output pixel -> input position, combining the
        rotation by ``angle`` degrees about the centre and the elastic field. None when both are
        off (identity)."""
        s = self.settings
        alpha, sigma = s.elastic_alpha, s.elastic_sigma
        elastic = alpha > 0 and sigma > 0
        if not elastic and angle == 0:
            return None
        # Exact rotation about the centre, as a lazy pyvips expression over pixel coordinates.
        xy = pyvips.Image.xyz(width, height)
        x = xy.extract_band(0) - (width - 1) / 2
        y = xy.extract_band(1) - (height - 1) / 2
        radians = math.radians(angle)
        cos, sin = math.cos(radians), math.sin(radians)
        source_x = x * cos - y * sin + (width - 1) / 2
        source_y = x * sin + y * cos + (height - 1) / 2
        index = source_x.bandjoin(source_y)
        if elastic:
            index = index + elastic_field(width, height, alpha, sigma, rng)
        return index


def elastic_field(
    width: int, height: int, alpha: float, sigma: float, rng: np.random.Generator
) -> pyvips.Image:
    """A smooth random displacement field (2 float bands: dx, dy) of ``width x height`` px.

    White noise on a grid ``step = max(1, sigma / 4)`` px apart is Gaussian-filtered with sigma
    ``sigma / step`` grid cells, scaled so that the largest displacement is ``alpha`` px, and
    interpolated bilinearly to full size by pyvips (lazily: a 16384 px image needs a grid of
    about 1100 x 1100 values for sigma 60).
    """
    step = max(1.0, sigma / 4)
    rows, cols = math.ceil(height / step) + 2, math.ceil(width / step) + 2
    noise = rng.standard_normal((2, rows, cols))
    field = np.stack(
        [ndimage.gaussian_filter(band, sigma / step, mode="wrap") for band in noise], axis=-1
    )
    peak = np.abs(field).max()
    field = (field * (alpha / peak if peak > 0 else 0.0)).astype(np.float32)
    coarse = pyvips.Image.new_from_array(np.ascontiguousarray(field))
    return coarse.affine(
        [step, 0, 0, step],
        interpolate=pyvips.Interpolate.new("bilinear"),
        oarea=[0, 0, width, height],
        extend="copy",
    )


def flip_rotate(
    image: pyvips.Image, horizontal: bool, vertical: bool, quarter_turns: int
) -> pyvips.Image:
    """Exact flips and rotation by ``quarter_turns`` x 90 degrees (no resampling)."""
    if horizontal:
        image = image.fliphor()
    if vertical:
        image = image.flipver()
    turns = quarter_turns % 4
    if turns == 1:
        image = image.rot90()
    elif turns == 2:
        image = image.rot180()
    elif turns == 3:
        image = image.rot270()
    return image


def adjust_colour(
    image: pyvips.Image, lightness: float, chroma: float, hue_degrees: float
) -> pyvips.Image:
    """Scale lightness and chroma, shift hue, in CIE LCh; returns sRGB uint8."""
    if lightness == 1 and chroma == 1 and hue_degrees == 0:
        return image
    lch = image.colourspace("lch", source_space="srgb")
    lch = lch.linear([lightness, chroma, 1.0], [0.0, 0.0, hue_degrees])
    out = lch.colourspace("srgb", source_space="lch")
    return out.cast("uchar")

"""A synthetic biopsy set in PANDA's layout, so that the whole study runs without downloads.

:func:`generate_synthetic_panda` writes ``train.csv`` (image_id, data_provider, isup_grade,
gleason_score) and ``train_images/<image_id>.tiff``: tiled, JPEG-compressed pyramidal TIFFs at
0.48 um/px with resolution tags, like PANDA's Radboud images.

What an image shows (all drawn with vectorised numpy, deterministic from the seed):

- one to three elongated, bent, irregular tissue strips (needle biopsies) at random positions and
  orientations on a slightly grey-white background, so trimming has something to do;
- pink eosin stroma with a fibrous texture and sparse nuclei, holding benign glands: white lumina
  ringed by pale epithelium and a rim of purple nuclei;
- in cancer cases (label 1) one or two small irregular regions of densely packed, dark
  blue-purple tumour, 35-60 px across at 0.96 um/px (up to 1.6x longer along the strip), so one
  fits a 48-64 px patch; its look follows the Gleason pattern: 3 = small separate glands with
  tiny lumina, 4 = fused cribriform blobs with punched-out lumina, 5 = solid sheets of dark
  nuclei. A smaller region of the secondary pattern is added when it differs from the primary.

The tumour signal is strong and local, not a global colour shift of the image: in 1536 px
slides (the demo set) the tumour covers a median 6% (2-17%) of the tissue; in 768 px slides
(smoke), with less tissue per image, a median 22%. Tumour size is a physical size, like the
texture, so it does not shrink with the slide. Small networks trained from scratch can learn it.
The class balance follows PANDA Radboud roughly: a third negatives; positives with primary
pattern 3, 4, 5 in proportions 0.4, 0.4, 0.2, every pattern present.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyvips
from tqdm.auto import tqdm

from repro.data.slides import save_pyramid
from repro.io.atomic import atomic_path, remove_stale_temporaries, write_text_atomic
from repro.layout import PandaLayout

LEVEL0_MPP = 0.48
"""Level-0 microns per pixel of the generated slides (PANDA Radboud: about 0.48)."""
RENDER_MPP = 0.96
"""Resolution the biopsies are drawn at (the paper's working resolution)."""

DATA_PROVIDER = "radboud"
NEGATIVE_FRACTION = 1 / 3
PATTERN_WEIGHTS = {3: 0.4, 4: 0.4, 5: 0.2}
ISUP = {
    (3, 3): 1,
    (3, 4): 2,
    (4, 3): 3,
    (4, 4): 4,
    (3, 5): 4,
    (5, 3): 4,
    (4, 5): 5,
    (5, 4): 5,
    (5, 5): 5,
}
"""ISUP grade group of a Gleason score (primary, secondary)."""

_SECONDARY = {3: (3, 3, 4, 5), 4: (3, 4, 4, 5), 5: (4, 5, 5)}
_INFO_FILE = "synthetic.json"
logger = logging.getLogger(__name__)

# Colours (RGB in [0, 1]) of an H&E stain, roughly.
_BACKGROUND = np.array([0.95, 0.95, 0.955], np.float32)
_STROMA = np.array([0.91, 0.63, 0.77], np.float32)
_STROMA_NUCLEUS = np.array([0.60, 0.38, 0.62], np.float32)
_LUMEN = np.array([0.97, 0.95, 0.965], np.float32)
_EPITHELIUM = np.array([0.90, 0.76, 0.86], np.float32)
_NUCLEUS = np.array([0.52, 0.33, 0.63], np.float32)
_TUMOUR_STROMA = np.array([0.66, 0.50, 0.75], np.float32)
_TUMOUR_CYTOPLASM = np.array([0.50, 0.36, 0.68], np.float32)
_TUMOUR_NUCLEUS = np.array([0.24, 0.14, 0.48], np.float32)
_TUMOUR_LUMEN = np.array([0.92, 0.88, 0.94], np.float32)


@dataclass(frozen=True)
class SyntheticCase:
    """Labels of one generated biopsy."""

    index: int
    image_id: str
    primary: int  # 0 for negative
    secondary: int
    gleason_score: str
    isup_grade: int


def generate_synthetic_panda(
    out_dir: str | os.PathLike[str], n_images: int, size: int, seed: int
) -> Path:
    """Write a synthetic PANDA-format set (idempotent); returns ``out_dir``.

    Args:
        out_dir: gets ``train.csv``, ``train_images/<image_id>.tiff`` and ``synthetic.json``.
        n_images: number of biopsies (>= 4 so that every class is present).
        size: level-0 width in pixels; images are ``size x size // 2`` at 0.48 um/px.
        seed: everything (labels, images) follows from it.

    A second call with the same arguments only regenerates missing images; with different
    arguments on an existing set it raises ``ValueError`` (delete the folder to regenerate).
    Images are written to a temporary name and renamed when complete; ``train.csv`` last.
    Biopsies are drawn at 0.96 um/px and enlarged 2x (bilinear) to level 0, so level 0 holds no
    detail finer than the 0.96 um/px the models see.
    """
    if n_images < 4:
        raise ValueError(f"n_images must be >= 4 (negatives and patterns 3, 4, 5), got {n_images}")
    if size < 64:
        raise ValueError(f"size must be >= 64 px, got {size}")
    root = Path(out_dir)
    info = {"n_images": int(n_images), "size": int(size), "seed": int(seed), "version": 1}
    info_path = root / _INFO_FILE
    if info_path.exists():
        existing = json.loads(info_path.read_text())
        if existing != info:
            raise ValueError(
                f"{root} holds a synthetic set made with {existing}, not {info}; delete the "
                "folder (and the prepared set made from it) to generate a new one"
            )
    raw = PandaLayout(root)
    images_dir = raw.images
    images_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(info_path, json.dumps(info, indent=2))
    cases = synthetic_cases(n_images, seed)
    missing = [case for case in cases if not raw.image(case.image_id).exists()]
    remove_stale_temporaries(images_dir)
    for case in tqdm(missing, desc="synthetic slides", unit="slide", disable=not missing):
        rng = np.random.default_rng([seed, case.index])
        pixels = render_biopsy(rng, size // 2, size // 4, case.primary, case.secondary)
        # Drawn at 0.96 um/px, enlarged 2x to the 0.48 um/px level 0 that PANDA has.
        level0 = pyvips.Image.new_from_array(pixels, interpretation="srgb").resize(
            RENDER_MPP / LEVEL0_MPP, kernel="linear"
        )
        level0 = level0.embed(0, 0, size, size // 2, extend="copy")
        write_slide(level0, raw.image(case.image_id), LEVEL0_MPP)
    table = pd.DataFrame(
        {
            "image_id": [case.image_id for case in cases],
            "data_provider": DATA_PROVIDER,
            "isup_grade": [case.isup_grade for case in cases],
            "gleason_score": [case.gleason_score for case in cases],
        }
    )
    csv_path = raw.labels
    if not csv_path.exists() or missing:
        write_text_atomic(csv_path, table.to_csv(index=False))
    if missing:
        logger.info("synthetic set: wrote %d of %d slides to %s", len(missing), n_images, root)
    return root


def synthetic_cases(n_images: int, seed: int) -> list[SyntheticCase]:
    """The labels of a synthetic set: exact class counts, shuffled with the seed."""
    rng = np.random.default_rng([seed, 2**31 - 1])
    n_negative = round(n_images * NEGATIVE_FRACTION)
    counts = _largest_remainder(n_images - n_negative, PATTERN_WEIGHTS)
    primaries = [0] * n_negative + [p for p, c in counts.items() for _ in range(c)]
    order = rng.permutation(n_images)
    cases = []
    for index in range(n_images):
        primary = primaries[order[index]]
        image_id = hashlib.md5(f"synthetic-{seed}-{index}".encode()).hexdigest()
        if primary == 0:
            score = "0+0" if rng.random() < 0.25 else "negative"
            cases.append(SyntheticCase(index, image_id, 0, 0, score, 0))
            continue
        secondary = int(rng.choice(_SECONDARY[primary]))
        isup = ISUP[(primary, secondary)]
        cases.append(
            SyntheticCase(index, image_id, primary, secondary, f"{primary}+{secondary}", isup)
        )
    return cases


def render_biopsy(
    rng: np.random.Generator,
    width: int,
    height: int,
    primary: int,
    secondary: int = 0,
    return_masks: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic H&E biopsy as a uint8 ``(height, width, 3)`` array at 0.96 um/px.

    ``primary`` 0 draws a benign biopsy; 3, 4 or 5 adds tumour of that Gleason pattern (and a
    smaller region of ``secondary`` when it differs). Sizes below are pixels at 0.96 um/px.
    With ``return_masks``, also the boolean tissue and tumour masks (ground truth).
    """
    yy, xx = _grid(height, width)
    # Shared smooth noise fields (different places of a field are independent enough).
    coarse = _smooth_noise(rng, height, width, 12)
    fine = _smooth_noise(rng, height, width, 3)
    fibres = _smooth_noise(rng, height, width, 24, 2.5)
    strips = _draw_strips(rng, width, height)
    tissue = np.zeros((height, width), bool)
    for strip in strips:
        tissue |= _strip_mask(rng, xx, yy, strip, 0.18 * coarse + 0.06 * fine)

    # Stroma: pink, fibrous (noise stretched along x), a few nuclei.
    image = np.empty((height, width, 3), np.float32)
    image[:] = _BACKGROUND
    image += 0.006 * rng.standard_normal((height, width, 1), dtype=np.float32)
    stroma = _STROMA * (1 + (0.035 * fibres + 0.02 * fine)[..., None])
    image[tissue] = stroma[tissue]
    nucleus_ratio, nucleus_draw = _lattice(rng, height, width, 4.5, (0.8, 1.5), 1.2)
    nucleus = nucleus_ratio < 1
    _paint(image, tissue & nucleus & (nucleus_draw < 0.12), _STROMA_NUCLEUS)

    # Benign glands: lumen, epithelium, a rim of nuclei.
    ratio, draw = _lattice(rng, height, width, 32, (7.5, 13.0), 2.5)
    ratio += 0.12 * np.roll(fine, 7, axis=1)
    gland = tissue & (draw < 0.55) & (ratio < 1)
    _paint(image, gland, _EPITHELIUM)
    _paint(image, gland & (ratio > 0.72) & nucleus, _NUCLEUS)
    _paint(image, gland & (ratio < 0.5), _LUMEN)

    # Tumour: one or two regions of the primary pattern, one smaller of the secondary.
    tumour = np.zeros_like(tissue)
    if primary:
        patterns = [primary] * (1 + int(rng.random() < 0.4))
        if secondary and secondary != primary:
            patterns.append(secondary)
        for number, pattern in enumerate(patterns):
            shrink = 0.7 if number and pattern != primary else 1.0
            region = _tumour_region(rng, xx, yy, strips, tissue, shrink, coarse)
            tumour |= region
            _paint_tumour(rng, image, region, pattern, fine, nucleus, nucleus_draw)

    # Per-image stain variation, inside the tissue only (the background stays unsaturated).
    stain = 1 + rng.normal(0, 0.025, 3).astype(np.float32)
    image[tissue] *= stain
    pixels = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
    return (pixels, tissue, tumour) if return_masks else pixels


def write_slide(
    pixels: np.ndarray | pyvips.Image, path: str | os.PathLike[str], mpp: float
) -> None:
    """Save an RGB uint8 image as a tiled, JPEG-compressed pyramidal TIFF with resolution tags
    (written to a temporary name, renamed when complete)."""
    image = pixels
    if isinstance(pixels, np.ndarray):
        image = pyvips.Image.new_from_array(np.ascontiguousarray(pixels), interpretation="srgb")
    with atomic_path(path) as temporary:
        save_pyramid(image, temporary, mpp, layout="panda")


@functools.lru_cache(maxsize=4)
def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


@dataclass(frozen=True)
class _Strip:
    cx: float
    cy: float
    angle: float
    half_length: float
    half_width: float
    bend: float
    bend_period: float
    bend_phase: float


def _draw_strips(rng: np.random.Generator, width: int, height: int) -> list[_Strip]:
    n_strips = int(rng.choice([1, 2, 2, 3]))
    band = height / n_strips
    strips = []
    for number in range(n_strips):
        half_width = height * rng.uniform(0.075, 0.11)
        max_angle = 30.0 if n_strips == 1 else 10.0
        angle = np.deg2rad(rng.uniform(-max_angle, max_angle))
        half_length = width * rng.uniform(0.22, 0.42)
        reach_x = half_length * abs(np.cos(angle)) + half_width
        cx = rng.uniform(reach_x, max(reach_x + 1, width - reach_x))
        cy = band * (number + 0.5) + rng.uniform(-0.15, 0.15) * band
        reach_y = half_length * abs(np.sin(angle)) + 2 * half_width
        cy = float(np.clip(cy, min(reach_y, height / 2), max(height - reach_y, height / 2)))
        strips.append(
            _Strip(
                cx=float(cx),
                cy=cy,
                angle=float(angle),
                half_length=float(half_length),
                half_width=float(half_width),
                bend=float(half_width * rng.uniform(0.0, 0.8)),
                bend_period=float(width * rng.uniform(0.5, 1.2)),
                bend_phase=float(rng.uniform(0, 2 * np.pi)),
            )
        )
    return strips


def _strip_coordinates(xx: np.ndarray, yy: np.ndarray, strip: _Strip) -> tuple[np.ndarray, ...]:
    """(u, v): along and across the bent strip axis, in pixels."""
    cos, sin = np.float32(np.cos(strip.angle)), np.float32(np.sin(strip.angle))
    dx, dy = xx - np.float32(strip.cx), yy - np.float32(strip.cy)
    u = dx * cos + dy * sin
    v = dy * cos - dx * sin
    v -= strip.bend * np.sin(u * np.float32(2 * np.pi / strip.bend_period) + strip.bend_phase)
    return u, v


def _strip_mask(
    rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, strip: _Strip, edge: np.ndarray
) -> np.ndarray:
    u, v = _strip_coordinates(xx, yy, strip)
    period = strip.half_length * rng.uniform(0.4, 0.9)
    wobble = 1 + 0.12 * np.sin(u * np.float32(2 * np.pi / period))
    along = u * np.float32(1 / strip.half_length)
    along *= along
    across = v / (strip.half_width * wobble)
    return along * along * along + across * across < 1 + edge


def _tumour_region(
    rng: np.random.Generator,
    xx: np.ndarray,
    yy: np.ndarray,
    strips: list[_Strip],
    tissue: np.ndarray,
    shrink: float,
    noise: np.ndarray,
) -> np.ndarray:
    """A small irregular blob centred on a strip's axis, inside the tissue."""
    strip = strips[int(rng.integers(len(strips)))]
    along = rng.uniform(-0.7, 0.7) * strip.half_length
    offset = strip.bend * np.sin(2 * np.pi * along / strip.bend_period + strip.bend_phase)
    cos, sin = np.cos(strip.angle), np.sin(strip.angle)
    cx = strip.cx + along * cos - offset * sin
    cy = strip.cy + along * sin + offset * cos
    radius = shrink * rng.uniform(18.0, 30.0)
    stretch = rng.uniform(1.0, 1.6)
    # Work in the blob's bounding box only.
    reach = int(radius * stretch * 1.5) + 2
    height, width = tissue.shape
    x0, x1 = max(0, int(cx) - reach), min(width, int(cx) + reach)
    y0, y1 = max(0, int(cy) - reach), min(height, int(cy) + reach)
    region = np.zeros_like(tissue)
    if x0 >= x1 or y0 >= y1:
        return region
    box = np.s_[y0:y1, x0:x1]
    dx, dy = xx[box] - np.float32(cx), yy[box] - np.float32(cy)
    u = (dx * np.float32(cos) + dy * np.float32(sin)) / np.float32(stretch)
    v = dy * np.float32(cos) - dx * np.float32(sin)
    distance = np.sqrt(u * u + v * v) / np.float32(radius)
    shift = tuple(int(k) for k in rng.integers(0, 50, 2))
    distance += 0.25 * np.roll(noise, shift, axis=(0, 1))[box]
    region[box] = tissue[box] & (distance < 1)
    return region


def _paint_tumour(
    rng: np.random.Generator,
    image: np.ndarray,
    region: np.ndarray,
    pattern: int,
    noise: np.ndarray,
    nucleus: np.ndarray,
    nucleus_draw: np.ndarray,
) -> None:
    height, width = region.shape
    _paint(image, region, _TUMOUR_STROMA)
    if pattern == 3:  # small, separate, well-formed glands with tiny lumina
        ratio, draw = _lattice(rng, height, width, 8.5, (2.8, 3.8), 0.7)
        ratio += 0.1 * noise
        gland = region & (draw < 0.85) & (ratio < 1)
        _paint(image, gland, _TUMOUR_CYTOPLASM)
        _paint(image, gland & (ratio > 0.55) & (nucleus_draw < 0.8), _TUMOUR_NUCLEUS)
        _paint(image, gland & (ratio < 0.35), _TUMOUR_LUMEN)
    elif pattern == 4:  # fused, cribriform blobs with punched-out lumina
        blob = region & (np.roll(noise, 11, axis=0) > -0.9)
        _paint(image, blob, _TUMOUR_CYTOPLASM)
        _paint(image, blob & nucleus & (nucleus_draw < 0.6), _TUMOUR_NUCLEUS)
        ratio, draw = _lattice(rng, height, width, 5.5, (1.0, 1.6), 1.0)
        _paint(image, blob & (ratio < 1) & (draw < 0.7), _TUMOUR_LUMEN)
    else:  # pattern 5: solid sheets of dark nuclei, no lumina
        _paint(image, region, _TUMOUR_CYTOPLASM * 0.85)
        ratio, draw = _lattice(rng, height, width, 3.0, (0.9, 1.25), 0.3)
        _paint(image, region & (ratio < 1) & (draw < 0.85), _TUMOUR_NUCLEUS * 0.9)


def _paint(image: np.ndarray, where: np.ndarray, colour: np.ndarray) -> None:
    """Set ``image[where]`` to ``colour`` with a little per-pixel variation kept from below."""
    below = image[where]
    if below.size:
        image[where] = colour + 0.15 * (below - below.mean(axis=0, keepdims=True))


def _lattice(
    rng: np.random.Generator,
    height: int,
    width: int,
    spacing: float,
    radius: tuple[float, float],
    jitter: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Round objects on a jittered grid of ``spacing`` px.

    Returns per pixel the distance to its cell's object centre divided by that object's radius
    (< 1: inside the object) and a uniform number per object (for random presence / density).
    Radii stay below ``spacing / 2 - jitter`` so an object never leaves its cell, which makes
    "nearest object" a cell lookup instead of a Voronoi search.
    """
    cell = max(2, round(spacing))
    rows, cols = -(-height // cell), -(-width // cell)
    max_radius = cell / 2 - jitter
    low, high = min(radius[0], max_radius), min(radius[1], max_radius)
    centre_x = rng.uniform(-jitter, jitter, (rows, 1, cols, 1)).astype(np.float32)
    centre_y = rng.uniform(-jitter, jitter, (rows, 1, cols, 1)).astype(np.float32)
    inverse_radius = 1 / rng.uniform(low, high, (rows, 1, cols, 1)).astype(np.float32)
    draws = rng.random((rows, 1, cols, 1), dtype=np.float32)
    local = np.arange(cell, dtype=np.float32) + np.float32(0.5 - cell / 2)
    dx = local[None, None, None, :] - centre_x
    dy = local[None, :, None, None] - centre_y
    ratio = np.sqrt(dx * dx + dy * dy) * inverse_radius
    shape = (rows * cell, cols * cell)
    ratio = ratio.reshape(shape)[:height, :width]
    draws = np.broadcast_to(draws, (rows, cell, cols, cell)).reshape(shape)[:height, :width]
    return np.ascontiguousarray(ratio), np.ascontiguousarray(draws)


def _smooth_noise(
    rng: np.random.Generator, height: int, width: int, scale: float, vscale: float | None = None
) -> np.ndarray:
    """Smooth noise with unit-ish amplitude: random values on a coarse grid, upsampled bilinearly
    (pyvips ``affine``); ``scale`` / ``vscale`` are the grid spacings in pixels."""
    vscale = scale if vscale is None else vscale
    rows, cols = int(height / vscale) + 2, int(width / scale) + 2
    coarse = rng.standard_normal((rows, cols), dtype=np.float32)
    image = pyvips.Image.new_from_array(coarse).affine(
        [scale, 0, 0, vscale],
        interpolate=pyvips.Interpolate.new("bilinear"),
        oarea=[0, 0, width, height],
        extend="copy",
    )
    return image.numpy()


def _largest_remainder(total: int, weights: dict[int, float]) -> dict[int, int]:
    """Split ``total`` by ``weights`` into integers (every key >= 1 when total allows)."""
    norm = sum(weights.values())
    exact = {key: total * w / norm for key, w in weights.items()}
    counts = {key: int(value) for key, value in exact.items()}
    order = sorted(weights, key=lambda key: exact[key] - counts[key], reverse=True)
    for key in order[: total - sum(counts.values())]:
        counts[key] += 1
    for key in weights:  # every pattern present
        if counts[key] == 0 and total >= len(weights):
            donor = max(counts, key=counts.get)
            counts[donor] -= 1
            counts[key] += 1
    return counts

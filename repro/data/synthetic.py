"""A synthetic biopsy set in PANDA's layout, so that the whole study runs without downloads.

:func:`generate_synthetic_panda` writes (:class:`repro.layout.PandaLayout`) ``train.csv``
(image_id, data_provider, isup_grade, gleason_score), ``train_images/<image_id>.tiff`` (tiled,
JPEG-compressed pyramidal TIFFs at 0.48 um/px with resolution tags and PANDA's pages 1, 1/4, 1/16,
like PANDA's Radboud images) and ``train_label_masks/<image_id>_mask.tiff`` (the same pyramid,
lossless, Radboud values in the red channel: 0 background, 1 stroma, 2 benign epithelium, 3/4/5
Gleason pattern; :func:`repro.data.masks.write_label_mask`).

What an image shows (all drawn with vectorised numpy, deterministic from the seed):

- one to three elongated, bent, irregular tissue strips (needle biopsies) at random positions and
  orientations on a slightly grey-white background, so trimming has something to do;
- pink eosin stroma with a fibrous texture and sparse nuclei, holding benign glands: white lumina
  ringed by pale epithelium and a rim of purple nuclei;
- dark blue-purple regions, 35-60 px across at 0.96 um/px (up to 1.6x longer along the strip),
  so one fits a 48-64 px patch. Their look follows a Gleason pattern: 3 = small separate glands
  with lumina, 4 = fused cribriform blobs with punched-out lumina, 5 = solid sheets of dark
  nuclei.

What separates the classes is ``data.synthetic_task`` (:data:`repro.config.SYNTHETIC_TASKS`):

- ``plain`` (the default, the generator before issue 13, unchanged): a cancer (label 1) holds
  one or two tumour regions of the primary pattern and a smaller one of the secondary when it
  differs; negatives hold none. Tumour is then the only dark tissue, readable from colour alone
  (a logistic regression on colour statistics scores AUC 1.0): the set the training tests use
  to check that learning works at all. In 1536 px slides (the demo's size) tumour covers a median
  6% (2-17%) of the tissue.
- ``local``: the dark regions of a cancer are its tumour as in ``plain``, and zero to two further
  regions are benign **mimics**; a negative gets a "phantom" grade and as many regions, of the
  same sizes and looks, all mimics. A mimic is the tumour texture of its pattern with its pixels
  rearranged (:func:`_rearrange_as_mimic`): exactly the tumour's pixels (its colours, its mean
  colour), laid out like inflammation (Table III's main false positives): dense dark dots, no
  lumen inside, the light pixels as a thin retraction cleft along its border, never beside a
  dark one; tumour lines every lumen with dark nuclei. Tumour and mimic differ only in
  high-resolution morphology.
- ``context``: one broad tissue fragment holding the same amount of one pattern's texture in two
  round foci :data:`CONTEXT_FOCUS` x the image height across (140 px in the demo's 384 px high
  images). Benign: the foci lie at least :data:`CONTEXT_GAP` x the height apart (96 px, more
  than a 64 px patch); cancer: they are fused into one focus about twice as long (280 px), at one
  of the places a benign focus would be. A 64 px patch looks the same in both classes; only a
  view wider than one focus (inside a ResNet-18's 435 px receptive field) tells them apart.

``local`` and ``context`` have no colour or thumbnail shortcut (``tests/data/test_shortcuts.py``:
logistic regressions on colour statistics, colour histograms and a 16 x 8 thumbnail stay near
chance); their tumour textures (:func:`_paint_glandular_tumour`) have larger glands, lumina and
nuclei than ``plain``'s, so that the morphology survives at 0.96 um/px, and their level 0 is the
drawn image enlarged by pixel replication (``plain``: bilinear), so reading it back at 0.96 um/px
gives the drawn pixels and no blur treats tumour and mimic differently.

Tumour sizes are physical sizes, like the texture, so they do not shrink with the slide. The
class balance follows PANDA Radboud roughly: a third negatives; positives with primary pattern 3,
4, 5 in proportions 0.4, 0.4, 0.2, every pattern present.
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
from scipy import ndimage
from tqdm.auto import tqdm

from repro.config import SYNTHETIC_TASKS, SyntheticTask
from repro.data.masks import write_label_mask
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
_PATTERN_P = np.array(list(PATTERN_WEIGHTS.values())) / sum(PATTERN_WEIGHTS.values())
CONTEXT_FOCUS = 0.365
"""Context task: diameter of a focus, as a share of the image height (demo: 140 px at 0.96 um/px);
a cancer's fused focus is about twice as long (280 px)."""
CONTEXT_GAP = 0.25
"""Context task: least distance between benign foci, edge to edge (their noisy edges take up to
a fifth of it), as a share of the image height (demo: 96 px, more than a 64 px MIL patch)."""
_CONTEXT_TRIES = 50
_GENERATOR_VERSIONS = {"plain": 1, "local": 3, "context": 2}
"""Version of each task's drawing, recorded in ``synthetic.json``: a set drawn by an older one
is refused (local and context 2: glandular textures, rearranged mimics; local 3: the mimic's
light pixels along its border)."""
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
class _Look:
    """The lattice of a tumour texture's round objects (see :func:`_lattice`) and its thresholds
    on the lattice ratio (distance to the object's centre over its radius)."""

    spacing: float
    radius: tuple[float, float]
    jitter: float
    presence: float  # share of lattice objects drawn
    rim: float = 0.0  # plain pattern 3: nuclei above this ratio
    nuclei: float = 0.0  # glandular: nuclei below this ratio (lining the lumen)
    lumen: float = 0.0  # lumen below this ratio


_PLAIN_LOOKS = {
    3: _Look(8.5, (2.8, 3.8), 0.7, 0.85, rim=0.55, lumen=0.35),
    4: _Look(5.5, (1.0, 1.6), 1.0, 0.7),
    5: _Look(3.0, (0.9, 1.25), 0.3, 0.85),
}
"""Tumour textures of the ``plain`` task (the generator before issue 13, unchanged)."""
_GLANDULAR_LOOKS = {
    3: _Look(12.0, (4.2, 5.2), 0.8, 0.85, nuclei=0.75, lumen=0.4),  # separate glands
    4: _Look(8.0, (2.6, 3.2), 0.6, 0.75, nuclei=1.0, lumen=0.5),  # cribriform lumina
    5: _Look(5.0, (1.6, 2.2), 0.4, 0.9),  # the sheet's nuclei
    "comedo": _Look(10.0, (1.5, 2.0), 1.0, 0.6, nuclei=1.0, lumen=0.55),  # pattern 5's necrosis
}
"""Tumour textures of the local and context tasks: every lumen is lined directly by dark
nuclei (:func:`_paint_glandular_tumour`), the one arrangement a mimic never has."""
_MIMIC_LIGHT = 0.8
"""Mimic: pixels lighter than this (mean RGB in [0, 1]; tumour lumina) form its border cleft."""
_MIMIC_DARK = 0.35
"""Mimic: pixels darker than this (tumour nuclei) are its dark dots."""
_MIMIC_SEPARATION = 2
"""Mimic: dark dots keep more than this many px (at 0.96 um/px) from every light pixel."""


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
    out_dir: str | os.PathLike[str],
    n_images: int,
    size: int,
    seed: int,
    task: SyntheticTask = "plain",
) -> Path:
    """Write a synthetic PANDA-format set (idempotent); returns ``out_dir``.

    Args:
        out_dir: gets ``train.csv``, ``train_images/<image_id>.tiff``,
            ``train_label_masks/<image_id>_mask.tiff`` and ``synthetic.json``.
        n_images: number of biopsies (>= 4 so that every class is present).
        size: level-0 width in pixels; images are ``size x size // 2`` at 0.48 um/px.
        seed: everything (labels, images) follows from it.
        task: what separates the classes (module docstring).

    A second call with the same arguments only regenerates missing images and label masks; with
    different arguments on an existing set it raises ``ValueError`` (delete the folder to
    regenerate; a set written before the tasks existed counts as ``plain``). Files are written
    to a temporary name and renamed when complete; ``train.csv`` last. Biopsies are drawn at
    0.96 um/px and enlarged 2x to level 0, so level 0 holds no detail finer than the 0.96 um/px
    the models see; label masks are enlarged by pixel replication.
    """
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"task must be one of {SYNTHETIC_TASKS}, got {task!r}")
    if n_images < 4:
        raise ValueError(f"n_images must be >= 4 (negatives and patterns 3, 4, 5), got {n_images}")
    if size < 64:
        raise ValueError(f"size must be >= 64 px, got {size}")
    root = Path(out_dir)
    info = {
        "n_images": int(n_images),
        "size": int(size),
        "seed": int(seed),
        "task": task,
        "version": _GENERATOR_VERSIONS[task],
    }
    info_path = root / _INFO_FILE
    if info_path.exists():
        existing = {"task": "plain", **json.loads(info_path.read_text())}
        if existing != info:
            raise ValueError(
                f"{root} holds a synthetic set made with {existing}, not {info}; delete the "
                "folder (and the prepared set made from it) to generate a new one"
            )
    raw = PandaLayout(root)
    for folder in (raw.images, raw.label_masks):
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder)
    write_text_atomic(info_path, json.dumps(info, indent=2))
    cases = synthetic_cases(n_images, seed)
    missing = [
        case
        for case in cases
        if not (raw.image(case.image_id).exists() and raw.label_mask(case.image_id).exists())
    ]
    scale = RENDER_MPP / LEVEL0_MPP  # drawn at 0.96 um/px, enlarged to PANDA's 0.48 um/px
    kernel = "linear" if task == "plain" else "nearest"  # plain: as before the tasks
    for case in tqdm(missing, desc="synthetic slides", unit="slide", disable=not missing):
        rng = np.random.default_rng([seed, case.index])
        pixels, labels = render_case(
            rng, size // 2, size // 4, case.primary, case.secondary, task
        )
        if not raw.image(case.image_id).exists():
            level0 = pyvips.Image.new_from_array(pixels, interpretation="srgb")
            level0 = level0.resize(scale, kernel=kernel).embed(0, 0, size, size // 2, extend="copy")
            write_slide(level0, raw.image(case.image_id), LEVEL0_MPP)
        if not raw.label_mask(case.image_id).exists():
            mask0 = pyvips.Image.new_from_array(labels).resize(scale, kernel="nearest")
            mask0 = mask0.embed(0, 0, size, size // 2, extend="copy")
            write_label_mask(mask0, raw.label_mask(case.image_id), LEVEL0_MPP)
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
    task: SyntheticTask = "plain",
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic H&E biopsy as a uint8 ``(height, width, 3)`` array at 0.96 um/px.

    ``primary`` 0 draws a benign biopsy; 3, 4 or 5 one with tumour of that Gleason pattern (and
    of ``secondary`` when it differs). With ``return_masks``, also the boolean tissue and tumour
    masks (ground truth). See :func:`render_case`.
    """
    pixels, labels = render_case(rng, width, height, primary, secondary, task)
    return (pixels, labels > 0, labels >= 3) if return_masks else pixels


def render_case(
    rng: np.random.Generator,
    width: int,
    height: int,
    primary: int,
    secondary: int = 0,
    task: SyntheticTask = "plain",
) -> tuple[np.ndarray, np.ndarray]:
    """A biopsy (uint8 ``(height, width, 3)``) and its label mask (uint8 ``(height, width)``,
    Radboud values: 0 background, 1 stroma, 2 benign epithelium, 3/4/5 Gleason pattern), at
    0.96 um/px, for ``task`` (module docstring). Sizes below are pixels at 0.96 um/px.
    """
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"task must be one of {SYNTHETIC_TASKS}, got {task!r}")
    yy, xx = _grid(height, width)
    # Shared smooth noise fields (different places of a field are independent enough).
    coarse = _smooth_noise(rng, height, width, 12)
    fine = _smooth_noise(rng, height, width, 3)
    fibres = _smooth_noise(rng, height, width, 24, 2.5)
    strips = _draw_strips(rng, width, height, wide=task == "context")
    tissue = np.zeros((height, width), bool)
    for strip in strips:
        tissue |= _strip_mask(rng, xx, yy, strip, 0.18 * coarse + 0.06 * fine)
    labels = tissue.astype(np.uint8)

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
    labels[gland] = 2

    def paint(region: np.ndarray, pattern: int) -> None:
        if task == "plain":
            look = _PLAIN_LOOKS[pattern]
            _paint_tumour(rng, image, region, look, pattern, fine, nucleus, nucleus_draw)
        else:
            _paint_glandular_tumour(rng, image, region, pattern, fine)

    cancer = primary > 0
    if task == "plain":  # tumour: one or two regions of the primary, one smaller of the secondary
        patterns = _region_patterns(rng, primary, secondary) if cancer else []
        for number, pattern in enumerate(patterns):
            shrink = 0.7 if number and pattern != primary else 1.0
            region = _tumour_region(rng, xx, yy, strips, tissue, shrink, coarse)
            paint(region, pattern)
            labels[region] = pattern
    else:  # a negative gets a phantom grade: its dark regions are drawn like a positive's
        if not cancer:
            primary, secondary = _phantom_grade(rng)
        if task == "local":
            patterns = _region_patterns(rng, primary, secondary)
            n_tumour = len(patterns) if cancer else 0
            patterns += [int(rng.choice(patterns)) for _ in range(int(rng.integers(0, 3)))]
            for number, pattern in enumerate(patterns):
                shrink = 0.7 if number and pattern != primary else 1.0
                region = _tumour_region(rng, xx, yy, strips, tissue, shrink, coarse)
                paint(region, pattern)
                if number < n_tumour:
                    labels[region] = pattern
                else:  # the mimic: the same pixels, no lumen lined by nuclei
                    _rearrange_as_mimic(rng, image, region)
                    labels[region] = 1
        else:
            for region in _context_regions(rng, xx, yy, tissue, cancer):
                paint(region, primary)
                labels[region] = primary if cancer else 2

    # Per-image stain variation, inside the tissue only (the background stays unsaturated).
    stain = 1 + rng.normal(0, 0.025, 3).astype(np.float32)
    image[tissue] *= stain
    pixels = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
    return pixels, labels


def _region_patterns(rng: np.random.Generator, primary: int, secondary: int) -> list[int]:
    """The patterns of a cancer's tumour regions: the primary once or twice, the secondary once
    when it differs."""
    patterns = [primary] * (1 + int(rng.random() < 0.4))
    if secondary and secondary != primary:
        patterns.append(secondary)
    return patterns


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


def _draw_strips(
    rng: np.random.Generator, width: int, height: int, wide: bool = False
) -> list[_Strip]:
    """One to three needle biopsies; ``wide``: one broad, nearly straight fragment filling most
    of the image (the context task), whole inside it."""
    n_strips = 1 if wide else int(rng.choice([1, 2, 2, 3]))
    band = height / n_strips
    strips = []
    for number in range(n_strips):
        if wide:
            half_width = height * rng.uniform(0.28, 0.32)
            angle = np.deg2rad(rng.uniform(-3.0, 3.0))
            half_length = width * rng.uniform(0.30, 0.42)
            # its ends reach up to 12% further where the edge noise is high
            reach_x = 1.12 * half_length * abs(np.cos(angle)) + half_width * abs(np.sin(angle))
        else:
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
                bend=float(half_width * rng.uniform(0.0, 0.1 if wide else 0.8)),
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


def _phantom_grade(rng: np.random.Generator) -> tuple[int, int]:
    """A (primary, secondary) drawn like a positive case's, for a negative's dark regions."""
    primary = int(rng.choice(list(PATTERN_WEIGHTS), p=_PATTERN_P))
    return primary, int(rng.choice(_SECONDARY[primary]))


def _rearrange_as_mimic(rng: np.random.Generator, image: np.ndarray, region: np.ndarray) -> None:
    """Rearrange the pixels of ``region`` (a tumour texture) into a benign mimic, in place.

    The region keeps exactly its pixels (so its colour histogram and its mean colour), but they
    are laid out anew, like inflammation or crowded benign cells with a retraction cleft: the
    light ones (lumina) along the region's border, the dark ones (nuclei) as small dots inside it
    kept more than :data:`_MIMIC_SEPARATION` px from every light pixel, the rest between them.
    A tumour lines each lumen with dark nuclei inside the region; the mimic has no light spot
    inside, so only the high-resolution arrangement tells them apart.
    """
    rows, cols = np.nonzero(region)
    if rows.size == 0:
        return
    height, width = region.shape
    pixels = image[rows, cols]
    lightness = pixels.mean(axis=1)
    by_lightness = np.argsort(lightness, kind="stable")
    n_dark = int((lightness < _MIMIC_DARK).sum())
    n_light = int((lightness > _MIMIC_LIGHT).sum())
    jitter = 1e-3 * rng.random(rows.size)  # ties broken at random
    depth = ndimage.distance_transform_edt(region)[rows, cols]
    cleft = _smooth_noise(rng, height, width, 8)[rows, cols]  # an irregular cleft
    light_at = np.argsort(depth + 0.8 * cleft + jitter)[:n_light]
    near_light = np.zeros_like(region)
    near_light[rows[light_at], cols[light_at]] = True
    near_light = ndimage.binary_dilation(near_light, iterations=_MIMIC_SEPARATION)
    dots, _ = _lattice(rng, height, width, 4.0, (1.0, 1.4), 0.5)
    dark_rank = dots[rows, cols] + jitter + 10.0 * near_light[rows, cols]
    dark_rank[light_at] = np.inf
    dark_at = np.argsort(dark_rank)[:n_dark]
    rest = np.ones(rows.size, bool)
    rest[light_at] = rest[dark_at] = False
    layout = np.empty_like(pixels)
    for places, chosen in (
        (dark_at, by_lightness[:n_dark]),
        (np.nonzero(rest)[0], by_lightness[n_dark : rows.size - n_light]),
        (light_at, by_lightness[rows.size - n_light :]),
    ):
        layout[places] = pixels[rng.permutation(chosen)]
    image[rows, cols] = layout


def _context_regions(
    rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, tissue: np.ndarray, cancer: bool
) -> list[np.ndarray]:
    """Context task: two round foci :data:`CONTEXT_FOCUS` x the image height across, at random
    places in the fragment. Benign: at least :data:`CONTEXT_GAP` x the height apart (edge to
    edge). Cancer: the two fused into one focus about twice as long, at one of the two places
    (centres 0.7 fused radii from its middle, radii 5% larger: about the same area)."""
    height, width = tissue.shape
    radius = CONTEXT_FOCUS * height / 2
    apart = 2 * radius + CONTEXT_GAP * height
    room = ndimage.distance_transform_edt(tissue)
    fits = room >= radius
    if not fits.any():
        fits = room >= room.max() * 0.9

    def pick(allowed: np.ndarray) -> tuple[float, float]:
        rows, cols = np.nonzero(allowed)
        index = int(rng.integers(len(rows)))
        return float(rows[index]), float(cols[index])

    for _ in range(_CONTEXT_TRIES):  # a first focus that leaves room for the second
        first = pick(fits)
        away = fits & ((yy - first[0]) ** 2 + (xx - first[1]) ** 2 >= apart**2)
        if away.any():
            break
    second = pick(away if away.any() else fits)
    foci = [(*first, radius), (*second, radius)]
    if cancer:  # fused at one of the two places (at random): both stay equally likely
        cy, cx, _ = foci[int(rng.integers(2))]
        fused = 1.05 * radius
        turn = rng.uniform(-0.35, 0.35)  # two discs 1.4 fused radii apart, along the fragment
        dy, dx = 0.7 * fused * np.sin(turn), 0.7 * fused * np.cos(turn)
        foci = [(cy - dy, cx - dx, fused), (cy + dy, cx + dx, fused)]
    regions = []
    for cy, cx, focus in foci:
        edge = _smooth_noise(rng, height, width, 10)
        distance = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / np.float32(focus)
        regions.append(tissue & (distance + 0.12 * edge < 1))
    return [regions[0] | regions[1]] if cancer else regions


def _paint_tumour(
    rng: np.random.Generator,
    image: np.ndarray,
    region: np.ndarray,
    look: _Look,
    pattern: int,
    noise: np.ndarray,
    nucleus: np.ndarray,
    nucleus_draw: np.ndarray,
) -> None:
    height, width = region.shape
    _paint(image, region, _TUMOUR_STROMA)
    if pattern == 3:  # small, separate, well-formed glands with lumina
        ratio, draw = _lattice(rng, height, width, look.spacing, look.radius, look.jitter)
        ratio += 0.1 * noise
        gland = region & (draw < look.presence) & (ratio < 1)
        _paint(image, gland, _TUMOUR_CYTOPLASM)
        _paint(image, gland & (ratio > look.rim) & (nucleus_draw < 0.8), _TUMOUR_NUCLEUS)
        _paint(image, gland & (ratio < look.lumen), _TUMOUR_LUMEN)
    elif pattern == 4:  # fused, cribriform blobs with punched-out lumina
        blob = region & (np.roll(noise, 11, axis=0) > -0.9)
        _paint(image, blob, _TUMOUR_CYTOPLASM)
        _paint(image, blob & nucleus & (nucleus_draw < 0.6), _TUMOUR_NUCLEUS)
        ratio, draw = _lattice(rng, height, width, look.spacing, look.radius, look.jitter)
        _paint(image, blob & (ratio < 1) & (draw < look.presence), _TUMOUR_LUMEN)
    else:  # pattern 5: solid sheets of dark nuclei, no lumina
        _paint(image, region, _TUMOUR_CYTOPLASM * 0.85)
        ratio, draw = _lattice(rng, height, width, look.spacing, look.radius, look.jitter)
        _paint(image, region & (ratio < 1) & (draw < look.presence), _TUMOUR_NUCLEUS * 0.9)


def _paint_glandular_tumour(
    rng: np.random.Generator, image: np.ndarray, region: np.ndarray, pattern: int, noise: np.ndarray
) -> None:
    """The local and context tasks' tumour textures (:data:`_GLANDULAR_LOOKS`): pattern 3 small
    separate glands, 4 fused cribriform cytoplasm with punched-out lumina, 5 solid sheets of dark
    nuclei with small comedonecrosis; every lumen lined directly by dark nuclei."""
    height, width = region.shape
    _paint(image, region, _TUMOUR_STROMA)

    def objects(look: _Look, where: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ratio, draw = _lattice(rng, height, width, look.spacing, look.radius, look.jitter)
        return where & (draw < look.presence), ratio

    if pattern == 3:
        look = _GLANDULAR_LOOKS[3]
        gland, ratio = objects(look, region)
        ratio += 0.08 * noise
        gland &= ratio < 1
        _paint(image, gland, _TUMOUR_CYTOPLASM)
    elif pattern == 4:
        look = _GLANDULAR_LOOKS[4]
        blob = region & (np.roll(noise, 11, axis=0) > -0.9)
        _paint(image, blob, _TUMOUR_CYTOPLASM)
        gland, ratio = objects(look, blob)
        gland &= ratio < 1
    else:
        _paint(image, region, _TUMOUR_CYTOPLASM * 0.85)
        sheet, ratio = objects(_GLANDULAR_LOOKS[5], region)
        _paint(image, sheet & (ratio < 1), _TUMOUR_NUCLEUS * 0.9)
        look = _GLANDULAR_LOOKS["comedo"]
        gland, ratio = objects(look, region)
        gland &= ratio < 1
    _paint(image, gland & (ratio < look.nuclei), _TUMOUR_NUCLEUS * (0.9 if pattern == 5 else 1.0))
    _paint(image, gland & (ratio < look.lumen), _TUMOUR_LUMEN)


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

"""The MIL patch grid and patch reading (paper IV-B, after Campanella et al. 2019).

Each prepared biopsy is divided into a grid of ``mil.patch_size`` patches every
``mil.patch_stride`` pixels over its tissue (:func:`patch_grid`, settings in :class:`PatchGrid`);
:func:`patch_table` lists the patches of many biopsies (cached in the MIL run folder).
:class:`PatchDataset` reads one patch without decoding the rest of the image, augmented for an
epoch; :class:`PatchLoader` serves any list of patch keys from worker processes that live for the
whole run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from repro.config import AugmentationSettings, DataSettings, MILSettings
from repro.data.augment import Augmenter, augmentation_rng
from repro.data.sampling import KeySampler, persistent_loader
from repro.data.slides import crop_or_pad, to_numpy
from repro.data.store import load_tissue_mask, open_prepared
from repro.frames import require_columns
from repro.io.atomic import write_text_atomic
from repro.layout import MethodLayout, PreparedLayout

logger = logging.getLogger(__name__)

PATCH_COLUMNS = ["image_id", "x", "y"]


@dataclass(frozen=True)
class PatchGrid:
    """Where the patches of a prepared biopsy are.

    Attributes:
        image_size: side of the (square) prepared image (``data.input_size``).
        patch_size, stride: ``mil.patch_size`` and ``mil.patch_stride``.
        min_tissue_fraction: ``mil.min_tissue_fraction``.
        tissue_downsample: ``data.tissue_downsample`` (for masks the manifest does not describe).
        key: plain values the grid depends on (the prepared data and the settings above), to
            validate a cached grid.
    """

    image_size: int
    patch_size: int
    stride: int
    min_tissue_fraction: float
    tissue_downsample: int
    key: dict[str, Any] = dataclasses.field(compare=False, hash=False)

    @classmethod
    def from_settings(cls, data: DataSettings, mil: MILSettings) -> PatchGrid:
        return cls(
            image_size=data.input_size,
            patch_size=mil.patch_size,
            stride=mil.patch_stride,
            min_tissue_fraction=mil.min_tissue_fraction,
            tissue_downsample=data.tissue_downsample,
            key={
                "data": dataclasses.asdict(data),
                "patch_size": mil.patch_size,
                "patch_stride": mil.patch_stride,
                "min_tissue_fraction": mil.min_tissue_fraction,
            },
        )


def grid_positions(length: int, patch_size: int, stride: int) -> np.ndarray:
    """Start offsets of patches along one axis of ``length`` pixels.

    Offsets are ``0, stride, 2 * stride, ...`` while a patch fits; when that leaves pixels uncovered
    at the end, one more patch is aligned with the edge (our choice, so no tissue is missed).

    Raises:
        ValueError: the patch is larger than the image, or a size is not positive.
    """
    if patch_size <= 0 or stride <= 0:
        raise ValueError(f"patch_size and stride must be > 0, got {patch_size} and {stride}")
    if patch_size > length:
        raise ValueError(f"patch_size {patch_size} is larger than the image side {length}")
    positions = np.arange(0, length - patch_size + 1, stride)
    if positions[-1] + patch_size < length:
        positions = np.append(positions, length - patch_size)
    return positions


def _overlap_matrix(positions: np.ndarray, patch_size: int, cells: int, cell: float) -> np.ndarray:
    """Overlap in pixels of patch ``[p, p + patch_size)`` (rows) with mask cell ``j`` (columns),
    which covers ``[j * cell, (j + 1) * cell)``."""
    starts = np.arange(cells) * cell
    low = np.maximum(positions[:, None], starts[None, :])
    high = np.minimum(positions[:, None] + patch_size, starts[None, :] + cell)
    return np.clip(high - low, 0, None)


def tissue_fractions(
    mask: np.ndarray, downsample: float, xs: np.ndarray, ys: np.ndarray, patch_size: int
) -> np.ndarray:
    """Fraction of tissue in each patch of the grid ``ys x xs``, shape ``(len(ys), len(xs))``.

    ``mask`` is the tissue mask at ``1 / downsample`` of the image's resolution; each mask pixel
    stands for a ``downsample x downsample`` square of the image, and a patch's fraction is the
    area-weighted mean of the mask over the patch (exact for any downsample, no resizing).
    """
    mask = np.asarray(mask, dtype=np.float64)
    rows = _overlap_matrix(np.asarray(ys), patch_size, mask.shape[0], downsample)
    cols = _overlap_matrix(np.asarray(xs), patch_size, mask.shape[1], downsample)
    return rows @ mask @ cols.T / float(patch_size * patch_size)


def grid_from_mask(
    mask: np.ndarray,
    downsample: float,
    width: int,
    height: int,
    patch_size: int,
    stride: int,
    min_tissue_fraction: float,
) -> pd.DataFrame:
    """Patches of a ``width x height`` image with at least ``min_tissue_fraction`` tissue.

    Returns:
        DataFrame(x, y, tissue_fraction): level-0 top-left corners (pixels of the prepared
        image), row-major order (by y, then x). A patch needs some tissue even when
        ``min_tissue_fraction`` is 0: pure background is never a patch.
    """
    xs = grid_positions(width, patch_size, stride)
    ys = grid_positions(height, patch_size, stride)
    fractions = tissue_fractions(mask, downsample, xs, ys, patch_size)
    keep = (fractions >= min_tissue_fraction) & (fractions > 0)
    row, col = np.nonzero(keep)
    return pd.DataFrame(
        {
            "x": xs[col].astype(np.int64),
            "y": ys[row].astype(np.int64),
            "tissue_fraction": fractions[row, col],
        }
    )


def patch_grid(prepared: PreparedLayout, image_id: str, grid: PatchGrid) -> pd.DataFrame:
    """The patches of one prepared biopsy: DataFrame(x, y, tissue_fraction).

    A grid of ``grid.patch_size`` patches every ``grid.stride`` pixels over the prepared image,
    keeping patches with at least ``grid.min_tissue_fraction`` tissue according to the prepared
    tissue mask. A biopsy with no such patch keeps its patch with the most tissue (or, with an
    empty mask, the centre patch), so that every biopsy can be scored; a warning says so.
    """
    mask, downsample = load_tissue_mask(prepared, image_id, grid.tissue_downsample)
    size, patch, stride = grid.image_size, grid.patch_size, grid.stride
    found = grid_from_mask(mask, downsample, size, size, patch, stride, grid.min_tissue_fraction)
    if len(found):
        return found
    everything = grid_from_mask(mask, downsample, size, size, patch, stride, 0.0)
    if len(everything):
        best = everything.iloc[[int(everything["tissue_fraction"].to_numpy().argmax())]]
    else:
        centre = (size - patch) // 2
        best = pd.DataFrame({"x": [centre], "y": [centre], "tissue_fraction": [0.0]})
    logger.warning(
        "%s: no patch has mil.min_tissue_fraction=%g tissue; using the patch at (%d, %d) with "
        "%.3f tissue",
        image_id,
        grid.min_tissue_fraction,
        best["x"].iloc[0],
        best["y"].iloc[0],
        best["tissue_fraction"].iloc[0],
    )
    return best.reset_index(drop=True)


def patch_table(
    rows: pd.DataFrame,
    prepared: PreparedLayout,
    grid: PatchGrid,
    files: MethodLayout,
    *,
    is_main: bool = True,
) -> pd.DataFrame:
    """The patches of every biopsy in ``rows``: DataFrame(image_id, x, y, tissue_fraction, label).

    Coordinates are computed once and cached in the MIL run folder (``files.patch_grid``, with
    the grid's key beside it; another key recomputes the cache). Rows keep the order of ``rows``,
    then row-major within a biopsy. Under torchrun only the main process (``is_main``) computes
    and writes the cache; call a barrier before the others read it.
    """
    require_columns(rows, ["image_id", "label"], "rows")
    wanted = [str(i) for i in rows["image_id"]]
    cached = (
        _cached_grid(wanted, prepared, grid, files)
        if is_main
        else pd.read_csv(files.patch_grid, dtype={"image_id": str})
    )
    order = pd.DataFrame({"image_id": wanted, "label": rows["label"].astype(int).to_numpy()})
    table = order.merge(cached, on="image_id", how="left", sort=False)
    return table[[*PATCH_COLUMNS, "tissue_fraction", "label"]].reset_index(drop=True)


def _cached_grid(
    image_ids: Sequence[str], prepared: PreparedLayout, grid: PatchGrid, files: MethodLayout
) -> pd.DataFrame:
    """The cached grid with the grids of ``image_ids`` added where missing."""
    cache_path, key_path = files.patch_grid, files.patch_grid_key
    columns = [*PATCH_COLUMNS, "tissue_fraction"]
    cached = pd.DataFrame(columns=columns)
    if cache_path.exists() and key_path.exists() and json.loads(key_path.read_text()) == grid.key:
        cached = pd.read_csv(cache_path, dtype={"image_id": str})
    missing = sorted(set(image_ids) - set(cached["image_id"]))
    if missing:
        key_path.unlink(missing_ok=True)  # killed before the key is back: recomputed next time
        computed = [
            patch_grid(prepared, image_id, grid).assign(image_id=image_id)
            for image_id in tqdm(missing, desc="patch grid", unit="biopsy", leave=False)
        ]
        frames = [cached, *computed] if len(cached) else computed
        cached = pd.concat(frames, ignore_index=True)[columns]
        write_text_atomic(cache_path, cached.to_csv(index=False))
        write_text_atomic(key_path, json.dumps(grid.key, indent=2) + "\n")
    return cached


class PatchDataset(torch.utils.data.Dataset):
    """Patches of the prepared images, read without decoding the rest of the image.

    The key of an item is ``(image_id, x, y, epoch)``: the patch whose top-left corner is
    ``(x, y)`` (prepared-image pixels), augmented for ``epoch`` (``None``: as stored); the item is
    ``dict(image=uint8 tensor (3, P, P), image_id=str, x=int, y=int)``. Keys carry everything, so
    one set of worker processes serves every phase of every epoch (:class:`PatchLoader`).

    With ``augmentation`` (and ``augmentation.enabled``), :class:`repro.data.augment.Augmenter`
    transforms the patch with :func:`repro.data.augment.augmentation_rng` of (``seed``, epoch,
    image_id, x, y): the inference and the training phase of an epoch see the same augmented patch
    (paper IV-A), and a resumed run the same augmentations. The patch is augmented with a margin
    of context around it (:func:`augmentation_margin`), so that rotation and elastic deformation
    move tissue into it, not a white border, and then cropped.

    Args:
        prepared: the prepared folder.
        patch_size: ``mil.patch_size``.
        augmentation: the settings, or None for no augmentation.
        seed: ``run.seed``.
    """

    def __init__(
        self,
        prepared: PreparedLayout,
        patch_size: int,
        augmentation: AugmentationSettings | None = None,
        *,
        seed: int = 0,
    ):
        self.prepared, self.size, self.seed = prepared, patch_size, seed
        self.augmenter = None
        self.margin = 0
        if augmentation is not None and augmentation.enabled:
            self.augmenter = Augmenter(augmentation)
            self.margin = augmentation_margin(augmentation, patch_size)

    def __getitem__(self, key: tuple[str, int, int, int | None]) -> dict[str, Any]:
        image_id, x, y, epoch = key
        patch = self.read(image_id, int(x), int(y), epoch)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(patch.transpose(2, 0, 1))),
            "image_id": str(image_id),
            "x": int(x),
            "y": int(y),
        }

    def read(self, image_id: str, x: int, y: int, epoch: int | None = None) -> np.ndarray:
        """The patch at ``(x, y)`` as uint8 (P, P, 3), augmented for ``epoch`` (None: not)."""
        size, margin = self.size, self.margin
        image = open_prepared(self.prepared, image_id)
        if self.augmenter is None or epoch is None:
            patch = crop_or_pad(image, x, y, size, size)
        else:
            side = size + 2 * margin
            context = crop_or_pad(image, x - margin, y - margin, side, side)
            rng = augmentation_rng(self.seed, epoch, image_id, x, y)
            patch = self.augmenter(context, rng).crop(margin, margin, size, size)
        return to_numpy(patch, self.prepared.image(image_id))


def patch_keys(patches: pd.DataFrame, epoch: int | None) -> list[tuple[str, int, int, int | None]]:
    """:class:`PatchDataset` keys of the rows of ``patches`` (image_id, x, y) in ``epoch``."""
    return [
        (str(image_id), int(x), int(y), epoch)
        for image_id, x, y in patches[PATCH_COLUMNS].itertuples(index=False)
    ]


def augmentation_margin(settings: AugmentationSettings, size: int) -> int:
    """Context (px) read around a ``size`` patch before augmenting it: enough for the largest
    rotation (``rotation_degrees``) plus the largest elastic displacement (``elastic_alpha``, per
    axis)."""
    angle = math.radians(min(abs(settings.rotation_degrees), 45.0))
    rotation = size * (math.cos(angle) + math.sin(angle) - 1) / 2
    elastic = settings.elastic_alpha if settings.elastic_sigma > 0 else 0.0
    return math.ceil(rotation + max(elastic, 0.0))


class PatchLoader:
    """Batches of :class:`PatchDataset` items for any list of keys, read by worker processes that
    live until :meth:`close` (or until this object is garbage).

    The ``num_workers`` workers are spawned once (pyvips and fork do not mix, see
    :mod:`repro.data.datasets`) and serve every phase of every epoch: the keys say which patches
    to read and for which epoch's augmentation. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, dataset: PatchDataset, *, num_workers: int = 0, pin_memory: bool = False):
        self.dataset = dataset
        self._feed = KeySampler()
        self.loader: torch.utils.data.DataLoader | None = persistent_loader(
            dataset, num_workers=num_workers, pin_memory=pin_memory, batch_sampler=self._feed
        )

    def batches(self, keys: Sequence[Any], batch_size: int) -> Iterator[dict[str, Any]]:
        """Collated batches of the items of ``keys``, in order."""
        if self.loader is None:
            raise RuntimeError("this PatchLoader is closed")
        self._feed.keys = [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]
        return iter(self.loader)

    def close(self) -> None:
        """Stop the worker processes (a few seconds while they exit)."""
        self.loader = None

    def __enter__(self) -> PatchLoader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

"""Whole-biopsy torch dataset and readers of prepared images (pyvips).

:class:`BiopsyDataset` gives each prepared biopsy as one uint8 ``(3, H, W)`` tensor (paper:
16384 x 16384 at 0.96 um/px), augmented when asked. Augmentation is seeded by
``(run.seed, epoch, image_id)``: a resumed run sees exactly the augmentations it would have seen.

pyvips and fork do not mix well (libvips keeps worker threads); give DataLoaders that use worker
processes ``multiprocessing_context="spawn"`` (or "forkserver"), and call
:meth:`BiopsyDataset.set_epoch` before creating each epoch's iterator (workers receive a copy of
the dataset when the iterator starts, so do not use ``persistent_workers`` with it).
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyvips
import torch

from repro.augment import Augmenter
from repro.config import Params, resolve_path
from repro.data.slides import SlideError, crop_or_pad, to_numpy


class BiopsyDataset(torch.utils.data.Dataset):
    """Prepared biopsies as tensors.

    Args:
        rows: a DataFrame with ``image_id`` and ``label`` (e.g. from
            :func:`repro.data.splits.load_split`).
        params: the experiment's settings (``data.prepared_dir``, ``augmentation``, ``run.seed``).
        augment: apply :class:`repro.augment.Augmenter` (``params.augmentation``).

    Item ``i``: ``{"image": uint8 tensor (3, H, W), "label": float32 scalar tensor,
    "image_id": str}``.
    """

    def __init__(self, rows: pd.DataFrame, params: Params, augment: bool = False) -> None:
        missing = [column for column in ("image_id", "label") if column not in rows.columns]
        if missing:
            raise ValueError(f"rows need columns {missing}; got {list(rows.columns)}")
        self.image_ids = [str(image_id) for image_id in rows["image_id"]]
        self.labels = [float(label) for label in rows["label"]]
        self.params = params
        self.augment = augment
        self.augmenter = Augmenter(params.augmentation)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.image_ids)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentations of ``epoch`` (see the module docstring)."""
        self.epoch = int(epoch)

    def rng(self, image_id: str) -> np.random.Generator:
        """The augmentation generator of ``image_id`` in the current epoch."""
        return augmentation_rng(self.params.run.seed, self.epoch, image_id)

    def load(self, index: int) -> pyvips.Image:
        """The (augmented) pyvips image of item ``index``, not yet decoded."""
        image_id = self.image_ids[index]
        image = open_prepared(self.params, image_id)
        if self.augment:
            image = self.augmenter(image, self.rng(image_id))
        return image

    def __getitem__(self, index: int) -> dict:
        image_id = self.image_ids[index]
        array = to_numpy(self.load(index), prepared_path(self.params, image_id))
        tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        return {
            "image": tensor,
            "label": torch.tensor(self.labels[index], dtype=torch.float32),
            "image_id": image_id,
        }


def augmentation_rng(seed: int, epoch: int, image_id: str) -> np.random.Generator:
    """A numpy generator determined by ``(seed, epoch, image_id)`` (stable across processes)."""
    digest = hashlib.sha256(str(image_id).encode()).digest()
    return np.random.default_rng([int(seed), int(epoch), int.from_bytes(digest[:8], "little")])


def prepared_path(params: Params, image_id: str) -> Path:
    """``<data.prepared_dir>/images/<image_id>.tiff``."""
    return resolve_path(params.data.prepared_dir) / "images" / f"{image_id}.tiff"


def open_prepared(params: Params, image_id: str, level: int = 0) -> pyvips.Image:
    """The prepared image of ``image_id`` as a lazy pyvips image (RGB uint8); ``level`` selects
    a pyramid level (0 = full size, each next level halves it)."""
    path = prepared_path(params, image_id)
    if not path.exists():
        raise SlideError(f"{path}: no such file (is the image prepared? run notebook 01)")
    try:
        image = pyvips.Image.new_from_file(str(path), page=level, access="random", fail_on="error")
    except pyvips.Error as error:
        raise SlideError(f"{path}: cannot open level {level}: {error.detail.strip()}") from None
    if image.bands > 3:
        image = image.extract_band(0, n=3)
    return image


def read_region(params: Params, image_id: str, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Pixels ``[y, y + h) x [x, x + w)`` of a prepared image as uint8 ``(h, w, 3)``.

    Only the tiles the region touches are decoded; parts outside the image are white.
    """
    image = open_prepared(params, image_id)
    return to_numpy(crop_or_pad(image, x, y, w, h), prepared_path(params, image_id))


def load_tissue_mask(params: Params, image_id: str) -> tuple[np.ndarray, int]:
    """The tissue mask of a prepared image and its downsample factor.

    Returns:
        ``(mask, downsample)``: mask pixel ``(i, j)`` covers image pixels
        ``[i * downsample, (i + 1) * downsample) x [j * downsample, (j + 1) * downsample)``.
    """
    prepared = resolve_path(params.data.prepared_dir)
    path = prepared / "masks" / f"{image_id}.png"
    downsample = _mask_downsamples(prepared / "manifest.csv").get(
        str(image_id), params.data.tissue_downsample
    )
    return read_mask_file(path), int(downsample)


def read_mask_file(path: str | os.PathLike[str]) -> np.ndarray:
    """A mask PNG (0 / 255) as a boolean array."""
    try:
        image = pyvips.Image.new_from_file(str(path), fail_on="error")
        return to_numpy(image, path)[..., 0] > 127
    except pyvips.Error as error:
        raise SlideError(f"{path}: cannot read the tissue mask: {error.detail.strip()}") from None


def _mask_downsamples(manifest: Path) -> dict[str, int]:
    if not manifest.exists():
        return {}
    stat = manifest.stat()
    return _read_downsamples(str(manifest), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_downsamples(path: str, mtime_ns: int, size: int) -> dict[str, int]:
    frame = pd.read_csv(path, dtype={"image_id": str}, usecols=["image_id", "mask_downsample"])
    frame = frame.dropna()
    return dict(zip(frame["image_id"], frame["mask_downsample"].astype(int), strict=True))

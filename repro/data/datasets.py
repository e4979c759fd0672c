"""Whole-biopsy torch dataset (pyvips): the streaming model's training and test items.

:class:`BiopsyDataset` gives each prepared biopsy as one uint8 ``(3, H, W)`` tensor (paper:
16384 x 16384 at 0.96 um/px), augmented when asked. Augmentation is seeded by
``(run.seed, epoch, image_id)`` (:func:`repro.data.augment.augmentation_rng`): a resumed run sees
exactly the augmentations it would have seen.

pyvips and fork do not mix well (libvips keeps worker threads); give DataLoaders that use worker
processes ``multiprocessing_context="spawn"`` (or "forkserver"), and call
:meth:`BiopsyDataset.set_epoch` before creating each epoch's iterator (workers receive a copy of
the dataset when the iterator starts, so do not use ``persistent_workers`` with it).
"""

from __future__ import annotations

import pandas as pd
import pyvips
import torch

from repro.config import AugmentationSettings
from repro.data.augment import Augmenter, augmentation_rng
from repro.data.slides import to_numpy
from repro.data.store import open_prepared
from repro.frames import require_columns
from repro.layout import PreparedLayout


class BiopsyDataset(torch.utils.data.Dataset):
    """Prepared biopsies as tensors.

    Args:
        rows: a DataFrame with ``image_id`` and ``label`` (e.g. from
            :func:`repro.data.splits.load_split`).
        prepared: the prepared folder (``params.prepared``).
        augmentation: the augmentation settings (``params.augmentation``).
        seed: seeds the augmentation (``run.seed``).
        augment: apply :class:`repro.data.augment.Augmenter`.

    Item ``i``: ``{"image": uint8 tensor (3, H, W), "label": float32 scalar tensor,
    "image_id": str}``.
    """

    def __init__(
        self,
        rows: pd.DataFrame,
        prepared: PreparedLayout,
        augmentation: AugmentationSettings,
        *,
        seed: int = 0,
        augment: bool = False,
    ) -> None:
        require_columns(rows, ["image_id", "label"], "rows")
        self.image_ids = [str(image_id) for image_id in rows["image_id"]]
        self.labels = [float(label) for label in rows["label"]]
        self.prepared = prepared
        self.seed = seed
        self.augment = augment
        self.augmenter = Augmenter(augmentation)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.image_ids)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentations of ``epoch`` (see the module docstring)."""
        self.epoch = int(epoch)

    def load(self, index: int) -> pyvips.Image:
        """The (augmented) pyvips image of item ``index``, not yet decoded."""
        image_id = self.image_ids[index]
        image = open_prepared(self.prepared, image_id)
        if self.augment:
            image = self.augmenter(image, augmentation_rng(self.seed, self.epoch, image_id))
        return image

    def __getitem__(self, index: int) -> dict:
        image_id = self.image_ids[index]
        array = to_numpy(self.load(index), self.prepared.image(image_id))
        tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        return {
            "image": tensor,
            "label": torch.tensor(self.labels[index], dtype=torch.float32),
            "image_id": image_id,
        }

"""Every file name under ``runs/<experiment>/``, a prepared-data folder and PANDA's raw folder.

An experiment's run directory::

    runs/<experiment>/
      splits.csv                      train/tune/test (+ subset rank) per image (notebook 02)
      run.log                         papermill and kernel log of ``python -m repro run``
      NN_<notebook>.ipynb (+ .html)   executed notebooks; .done/ marks the complete ones
      streaming/ and mil/             one method each (:class:`MethodLayout`)

A prepared dataset (notebook 01, shared by the experiments on it)::

    <data.prepared_dir>/
      manifest.csv                    one row per slide: label, status, sizes, ...
      images/<image_id>.tiff          the prepared image (pyramidal tiled TIFF)
      masks/<image_id>.png            its tissue mask
      labels/<image_id>.png           its label mask, when the raw slide has one
      records/<image_id>.json         per-slide preparation record (resumable preparation)

PANDA's raw folder (``data.panda_dir``; the synthetic set is written in the same layout)::

    <data.panda_dir>/
      train.csv                              image_id, data_provider, isup_grade, gleason_score
      train_images/<image_id>.tiff           the slide
      train_label_masks/<image_id>_mask.tiff its label mask (label in the red channel), if any

Code asks these classes for paths and never spells a run or prepared file name itself.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

METHODS = ("streaming", "mil")
"""The two methods of the paper, as they name their folders under ``runs/<experiment>/``."""

_EPOCH_CHECKPOINT = re.compile(r"stage(\d)_epoch(\d{3,})\.pt")


@dataclass(frozen=True)
class MethodLayout:
    """``runs/<experiment>/<method>/``: what one method's training and evaluation write."""

    root: Path

    @property
    def params(self) -> Path:
        """The resolved params the run was made with."""
        return self.root / "params.yaml"

    @property
    def init(self) -> Path:
        """Initial weights (normalisation and batch-norm statistics set), shared by all ranks."""
        return self.root / "init.pt"

    @property
    def normalization(self) -> Path:
        return self.root / "normalization.json"

    @property
    def batchnorm_calibration(self) -> Path:
        return self.root / "batchnorm_calibration.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, stage: int, epoch: int) -> Path:
        """``checkpoints/stage<S>_epoch<EEE>.pt``: the weights at the end of an epoch."""
        return self.checkpoints / f"stage{stage}_epoch{epoch:03d}.pt"

    def epoch_checkpoints(self) -> list[tuple[int, int, Path]]:
        """``(stage, epoch, path)`` of every epoch checkpoint on disk."""
        found = []
        for path in self.checkpoints.glob("stage*_epoch*.pt"):
            match = _EPOCH_CHECKPOINT.fullmatch(path.name)
            if match:
                found.append((int(match.group(1)), int(match.group(2)), path))
        return found

    @property
    def last_checkpoint(self) -> Path:
        """Mid-epoch resume point (removed at the end of each epoch)."""
        return self.checkpoints / "last.pt"

    @property
    def metrics(self) -> Path:
        """One row per epoch: training and tuning metrics."""
        return self.root / "metrics.csv"

    @property
    def selection(self) -> Path:
        """Which checkpoints were picked and averaged, and why."""
        return self.root / "selection.json"

    @property
    def final(self) -> Path:
        """The averaged inference weights."""
        return self.root / "final.pt"

    @property
    def loss_curves(self) -> Path:
        return self.root / "loss_curves.png"

    def predictions(self, split: str) -> Path:
        """``predictions_<split>.csv``: image_id, label, score of the final weights."""
        return self.root / f"predictions_{split}.csv"

    # -- streaming

    @property
    def saliency(self) -> Path:
        """Cached SmoothGrad maps, ``saliency/<image_id>.npz``."""
        return self.root / "saliency"

    # -- MIL

    @property
    def patch_grid(self) -> Path:
        """The patch coordinates of every biopsy (image_id, x, y, tissue_fraction)."""
        return self.root / "patches.csv"

    @property
    def patch_grid_key(self) -> Path:
        """The settings ``patches.csv`` was computed with."""
        return self.root / "patches.json"

    @property
    def patch_probability_cache(self) -> Path:
        """Per-biopsy patch probabilities of ``final.pt``: ``patch_probability_cache/<id>.csv``."""
        return self.root / "patch_probability_cache"

    def patch_probability_file(self, image_id: str) -> Path:
        return self.patch_probability_cache / f"{image_id}.csv"

    @property
    def patch_probability_key(self) -> Path:
        """Which weights and grid the cached probabilities belong to."""
        return self.patch_probability_cache / "model.json"

    def patch_scores(self, split: str) -> Path:
        """``patch_scores_<split>.csv``: image_id, x, y, score of every patch of a split."""
        return self.root / f"patch_scores_{split}.csv"


@dataclass(frozen=True)
class RunLayout:
    """``runs/<experiment>/``."""

    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike[str]) -> RunLayout:
        return cls(Path(path))

    @property
    def splits(self) -> Path:
        return self.root / "splits.csv"

    @property
    def log(self) -> Path:
        return self.root / "run.log"

    def notebook(self, name: str) -> Path:
        """The executed copy of notebook ``name`` (e.g. ``03_train_streaming.ipynb``)."""
        return self.root / name

    def notebook_done(self, stem: str) -> Path:
        """The marker that the notebook ``stem`` ran to the end with these params."""
        return self.root / ".done" / f"{stem}.json"

    def method(self, name: str) -> MethodLayout:
        """The folder of ``name`` (one of :data:`METHODS`)."""
        if name not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {name!r}")
        return MethodLayout(self.root / name)

    @property
    def streaming(self) -> MethodLayout:
        return self.method("streaming")

    @property
    def mil(self) -> MethodLayout:
        return self.method("mil")

    def params_candidates(self) -> list[Path]:
        """Where a run's resolved params may be, in the order to try them."""
        return [self.streaming.params, self.mil.params, self.root / "params.yaml"]


@dataclass(frozen=True)
class PreparedLayout:
    """``<data.prepared_dir>/``: prepared images, masks and the manifest."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def masks(self) -> Path:
        return self.root / "masks"

    @property
    def records(self) -> Path:
        return self.root / "records"

    def image(self, image_id: str) -> Path:
        return self.images / f"{image_id}.tiff"

    @property
    def labels(self) -> Path:
        return self.root / "labels"

    def mask(self, image_id: str) -> Path:
        return self.masks / f"{image_id}.png"

    def label_mask(self, image_id: str) -> Path:
        """``labels/<image_id>.png``: the prepared label mask (one uint8 band, label values)."""
        return self.labels / f"{image_id}.png"

    def record(self, image_id: str) -> Path:
        return self.records / f"{image_id}.json"


@dataclass(frozen=True)
class PandaLayout:
    """``<data.panda_dir>/``: PANDA's raw slides, labels and label masks."""

    root: Path

    @property
    def labels(self) -> Path:
        return self.root / "train.csv"

    @property
    def images(self) -> Path:
        return self.root / "train_images"

    @property
    def label_masks(self) -> Path:
        return self.root / "train_label_masks"

    def image(self, image_id: str) -> Path:
        return self.images / f"{image_id}.tiff"

    def label_mask(self, image_id: str) -> Path:
        return self.label_masks / f"{image_id}_mask.tiff"

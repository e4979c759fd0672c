"""Top-1 multiple-instance-learning baseline (paper IV-B, after Campanella et al. 2019).

Each prepared biopsy is divided into a grid of patches over its tissue (:func:`patch_grid`). Every
epoch has two phases: an inference phase scores every patch of every training biopsy, and the
patch with the highest tumour probability (the top-1 patch, :func:`select_top1`) gets the biopsy
label; a training phase then optimises the network on those top-1 patches only (SGD, mini-batch
16, negatives oversampled). The same augmented patch serves both phases of an epoch: augmentation
is seeded by (run seed, epoch, image_id, patch position). A biopsy's prediction is its highest
patch probability (:func:`biopsy_scores`).

The network is a conventionally run ResNet with frozen batch norm and ImageNet normalisation
(:func:`repro.models.build_resnet`). The training loop, the two-stage schedule (moving-average
checkpoint pick, stage 2 at a lower learning rate, weight averaging), checkpoints, resume, mixed
precision and multi-GPU are shared with the streaming trainer: :class:`MILTrainer` is a
:class:`repro.train.StreamingTrainer` whose epoch starts with the inference phase and whose
training items are the top-1 patches; :func:`repro.schedule.run_schedule` runs it.

Public: :func:`train_mil`, :func:`predict`, :func:`load_final_model`, :func:`patch_grid`,
:func:`patch_table`, :class:`PatchDataset`, :class:`PatchLoader`, :func:`score_patches`,
:func:`select_top1`, :func:`biopsy_scores`, :func:`patch_score_map`;
``python -m repro.mil params/<name>.yaml`` (also under ``torchrun``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.special import expit
from torch import nn
from tqdm.auto import tqdm

from repro.atomic import write_text_atomic
from repro.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from repro.config import Params
from repro.data.sampling import BalancedSampler, KeySampler, persistent_loader
from repro.runtime import (
    DistributedContext,
    all_gather_objects,
    autocast,
    barrier,
    broadcast_parameters,
    seed_everything,
    select_device,
    use_channels_last,
)
from repro.schedule import (
    EpochRun,
    ScheduleResult,
    ScheduleSettings,
    command_line,
    load_final_weights,
    run_schedule,
    save_loss_curves,
    start_run,
)
from repro.train import StreamingTrainer, trainer_options, tuning_metrics

logger = logging.getLogger(__name__)

METHOD_DIR = "mil"
PATCH_COLUMNS = ["image_id", "x", "y"]
HEAD_POOL = "avg"  # torchvision's ResNet head, as Campanella et al. use it


def mil_dir(params: Params) -> Path:
    """``runs/<experiment>/mil``: everything the MIL baseline writes."""
    return params.run_dir / METHOD_DIR


# ----------------------------------------------------------------------------- patch grid


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


def patch_grid(params: Params, image_id: str) -> pd.DataFrame:
    """The patches of one prepared biopsy: DataFrame(x, y, tissue_fraction).

    A grid of ``mil.patch_size`` patches every ``mil.patch_stride`` pixels over the prepared image
    (``data.input_size`` square, at ``data.target_mpp``), keeping patches with at least
    ``mil.min_tissue_fraction`` tissue according to the prepared tissue mask. A biopsy with no
    such patch keeps its patch with the most tissue (or, with an empty mask, the centre patch), so
    that every biopsy can be scored; a warning says so.
    """
    from repro.data.dataset import load_tissue_mask

    mask, downsample = load_tissue_mask(params, image_id)
    size, patch, stride = params.data.input_size, params.mil.patch_size, params.mil.patch_stride
    grid = grid_from_mask(
        mask, downsample, size, size, patch, stride, params.mil.min_tissue_fraction
    )
    if len(grid):
        return grid
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
        params.mil.min_tissue_fraction,
        best["x"].iloc[0],
        best["y"].iloc[0],
        best["tissue_fraction"].iloc[0],
    )
    return best.reset_index(drop=True)


def patch_table(
    params: Params, rows: pd.DataFrame, *, context: DistributedContext | None = None
) -> pd.DataFrame:
    """The patches of every biopsy in ``rows``: DataFrame(image_id, x, y, tissue_fraction, label).

    Coordinates are computed once and cached in ``runs/<experiment>/mil/patches.csv`` (with the
    grid settings in ``patches.json``; other settings recompute the cache). Rows keep the order of
    ``rows``, then row-major within a biopsy. Under torchrun rank 0 writes the cache.
    """
    context = context or DistributedContext()
    _require_columns(rows, ["image_id", "label"], "rows")
    wanted = [str(i) for i in rows["image_id"]]
    if context.is_main:
        cached = _cached_grid(params, wanted)
    barrier(context)
    if not context.is_main:
        cached = pd.read_csv(mil_dir(params) / "patches.csv", dtype={"image_id": str})
    order = pd.DataFrame({"image_id": wanted, "label": rows["label"].astype(int).to_numpy()})
    table = order.merge(cached, on="image_id", how="left", sort=False)
    return table[[*PATCH_COLUMNS, "tissue_fraction", "label"]].reset_index(drop=True)


def _cached_grid(params: Params, image_ids: Sequence[str]) -> pd.DataFrame:
    """``patches.csv`` with the grids of ``image_ids`` added where missing."""
    out = mil_dir(params)
    cache_path, key_path = out / "patches.csv", out / "patches.json"
    key = _grid_key(params)
    columns = [*PATCH_COLUMNS, "tissue_fraction"]
    cached = pd.DataFrame(columns=columns)
    if cache_path.exists() and key_path.exists() and json.loads(key_path.read_text()) == key:
        cached = pd.read_csv(cache_path, dtype={"image_id": str})
    missing = sorted(set(image_ids) - set(cached["image_id"]))
    if missing:
        key_path.unlink(missing_ok=True)  # killed before the key is back: recomputed next time
        computed = [
            patch_grid(params, image_id).assign(image_id=image_id)
            for image_id in tqdm(missing, desc="patch grid", unit="biopsy", leave=False)
        ]
        frames = [cached, *computed] if len(cached) else computed
        cached = pd.concat(frames, ignore_index=True)[columns]
        write_text_atomic(cache_path, cached.to_csv(index=False))
        write_text_atomic(key_path, json.dumps(key, indent=2) + "\n")
    return cached


def _grid_key(params: Params) -> dict[str, Any]:
    """What the patch grid depends on: the prepared data (its masks) and the grid settings."""
    return {
        "data": dataclasses.asdict(params.data),
        "patch_size": params.mil.patch_size,
        "patch_stride": params.mil.patch_stride,
        "min_tissue_fraction": params.mil.min_tissue_fraction,
    }


# ----------------------------------------------------------------------------- top-1 and scores


def select_top1(patches: pd.DataFrame, score: str = "score") -> pd.DataFrame:
    """The patch with the highest ``score`` per ``image_id`` (ties: the first in table order).

    Returns the selected rows (all columns), one per biopsy, in order of first appearance.
    """
    _require_columns(patches, ["image_id", score], "patches")
    if patches[score].isna().any():
        raise ValueError(f"patches: column {score!r} has NaN values")
    order = patches.reset_index(drop=True)
    best = order.groupby("image_id", sort=False)[score].idxmax()
    return order.loc[best.to_numpy()].reset_index(drop=True)


def biopsy_scores(patches: pd.DataFrame, score: str = "score") -> pd.DataFrame:
    """A biopsy's score is its highest patch score: DataFrame(image_id, score)."""
    _require_columns(patches, ["image_id", score], "patches")
    best = patches.groupby("image_id", sort=False)[score].max()
    return pd.DataFrame({"image_id": best.index.to_numpy(), "score": best.to_numpy()})


def patch_score_map(patches: pd.DataFrame, params: Params, downsample: int = 1) -> np.ndarray:
    """One biopsy's patch probabilities as an image (the MIL heatmap of Fig. 5 and 6).

    Args:
        patches: the biopsy's rows of :func:`predict`'s patches (x, y, score).
        params: for ``data.input_size`` and ``mil.patch_size``.
        downsample: the map is ``input_size / downsample`` pixels square.

    Returns:
        float array: each pixel holds the highest score of the patches covering it, NaN where
        no patch does (background).
    """
    side = math.ceil(params.data.input_size / downsample)
    heat = np.full((side, side), np.nan)
    size = params.mil.patch_size
    for x, y, score in patches[["x", "y", "score"]].itertuples(index=False):
        top, left = y // downsample, x // downsample
        bottom, right = math.ceil((y + size) / downsample), math.ceil((x + size) / downsample)
        region = heat[top:bottom, left:right]
        np.fmax(region, score, out=region)
    return heat


def _require_columns(frame: pd.DataFrame, columns: list[str], name: str) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{name}: missing columns {missing}; got {list(frame.columns)}")


# ----------------------------------------------------------------------------- patches as tensors


class PatchDataset(torch.utils.data.Dataset):
    """Patches of the prepared images, read without decoding the rest of the image.

    The key of an item is ``(image_id, x, y, epoch)``: the patch whose top-left corner is
    ``(x, y)`` (prepared-image pixels), augmented for ``epoch`` (``None``: as stored); the item is
    ``dict(image=uint8 tensor (3, P, P), image_id=str, x=int, y=int)``. Keys carry everything, so
    one set of worker processes serves every phase of every epoch (:class:`PatchLoader`).

    With ``augment`` (and ``augmentation.enabled``), :class:`repro.augment.Augmenter` transforms
    the patch with a generator seeded by (``run.seed``, epoch, image_id, x, y): the inference and
    the training phase of an epoch see the same augmented patch (paper IV-A), and a resumed run
    the same augmentations. The patch is augmented with a margin of context around it
    (:func:`augmentation_margin`), so that rotation and elastic deformation move tissue into it,
    not a white border, and then cropped.
    """

    def __init__(self, params: Params, augment: bool = True):
        self.params = params
        self.size = params.mil.patch_size
        self.augmenter = None
        if augment and params.augmentation.enabled:
            from repro.augment import Augmenter

            self.augmenter = Augmenter(params.augmentation)
        self.margin = augmentation_margin(params, self.size) if self.augmenter else 0

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
        from repro.data.dataset import open_prepared, prepared_path
        from repro.data.slides import crop_or_pad, to_numpy

        size, margin = self.size, self.margin
        image = open_prepared(self.params, image_id)
        if self.augmenter is None or epoch is None:
            patch = crop_or_pad(image, x, y, size, size)
        else:
            side = size + 2 * margin
            context = crop_or_pad(image, x - margin, y - margin, side, side)
            rng = patch_rng(self.params.run.seed, epoch, image_id, x, y)
            patch = self.augmenter(context, rng).crop(margin, margin, size, size)
        return to_numpy(patch, prepared_path(self.params, image_id))


def patch_keys(patches: pd.DataFrame, epoch: int | None) -> list[tuple[str, int, int, int | None]]:
    """:class:`PatchDataset` keys of the rows of ``patches`` (image_id, x, y) in ``epoch``."""
    return [
        (str(image_id), int(x), int(y), epoch)
        for image_id, x, y in patches[PATCH_COLUMNS].itertuples(index=False)
    ]


def augmentation_margin(params: Params, size: int) -> int:
    """Context (px) read around a ``size`` patch before augmenting it: enough for the largest
    rotation (``augmentation.rotation_degrees``) plus the largest elastic displacement
    (``augmentation.elastic_alpha``, per axis)."""
    settings = params.augmentation
    angle = math.radians(min(abs(settings.rotation_degrees), 45.0))
    rotation = size * (math.cos(angle) + math.sin(angle) - 1) / 2
    elastic = settings.elastic_alpha if settings.elastic_sigma > 0 else 0.0
    return math.ceil(rotation + max(elastic, 0.0))


def patch_rng(seed: int, epoch: int, image_id: str, x: int, y: int) -> np.random.Generator:
    """The augmentation generator of one patch in one epoch (stable across processes)."""
    return np.random.default_rng([seed, epoch, zlib.crc32(image_id.encode()), x, y])


class PatchLoader:
    """Batches of :class:`PatchDataset` items for any list of keys, read by worker processes that
    live until :meth:`close` (or until this object is garbage).

    The ``num_workers`` workers are spawned once (pyvips and fork do not mix, see
    :mod:`repro.data.dataset`) and serve every phase of every epoch: the keys say which patches
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


@torch.no_grad()
def score_patches(
    model: nn.Module,
    loader: PatchLoader,
    keys: Sequence[Any],
    *,
    batch_size: int,
    device: torch.device,
    context: DistributedContext | None = None,
    mixed_precision: bool = False,
    channels_last: bool = False,
    desc: str = "patches",
    progress: bool = True,
) -> np.ndarray:
    """Logits (float32) of the patches of ``keys``, in order: batched, without gradients.

    Under torchrun every rank scores a contiguous share of the keys and the shares are gathered,
    so every rank returns all logits.
    """
    context = context or DistributedContext()
    bounds = np.linspace(0, len(keys), context.world_size + 1).astype(int)
    share = keys[bounds[context.rank] : bounds[context.rank + 1]]
    was_training = model.training
    model.eval()
    logits = [np.zeros(0, np.float32)]
    bar = tqdm(
        total=len(keys), desc=desc, unit="patch", disable=not (progress and context.is_main),
        leave=False,
    )  # fmt: skip
    for batch in loader.batches(share, batch_size):
        images = batch["image"].to(device, non_blocking=True)
        if use_channels_last(device, channels_last):
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, mixed_precision):
            output = model(images)
        logits.append(output.reshape(len(images), -1)[:, 0].float().cpu().numpy())
        bar.update(len(images) * context.world_size)
    bar.close()
    model.train(was_training)
    return np.concatenate(all_gather_objects(np.concatenate(logits), context))


def _biopsy_logits(patches: pd.DataFrame, logits: np.ndarray) -> pd.DataFrame:
    """DataFrame(image_id, label, logit, score): a biopsy's logit is its highest patch logit."""
    scored = patches[["image_id", "label"]].assign(logit=logits.astype(np.float64))
    best = biopsy_scores(scored, score="logit").rename(columns={"score": "logit"})
    labels = scored.drop_duplicates("image_id")[["image_id", "label"]]
    frame = labels.merge(best, on="image_id", how="left", sort=False)
    frame["score"] = _sigmoid(frame["logit"].to_numpy())
    return frame.reset_index(drop=True)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return expit(np.asarray(logits, dtype=np.float64))


# ----------------------------------------------------------------------------- trainer


class MILTrainer(StreamingTrainer):
    """The :class:`repro.schedule.MethodTrainer` of the MIL baseline.

    A :class:`repro.train.StreamingTrainer` (the same optimiser step, mixed precision, rank split
    and metrics) whose epoch starts with the inference phase over every training patch, and whose
    training items are the top-1 patches, one per training biopsy (the sampler draws biopsies).
    The whole network trains in both stages (Campanella et al. freeze nothing); batch norm stays
    frozen. Its :class:`PatchLoader` (``patch_loader``) reads the patches of every phase; close it
    when done.

    Args:
        model: the patch classifier (:func:`build_model`), on ``device``.
        params: the experiment's settings (``mil``, ``run``, ``augmentation``).
        train_patches, tune_patches: :func:`patch_table` of the training and tuning biopsies.
        sampler: e.g. :class:`repro.data.sampling.BalancedSampler` over the training biopsies'
            labels, in the order in which they first appear in ``train_patches``.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Params,
        train_patches: pd.DataFrame,
        tune_patches: pd.DataFrame,
        sampler: Any,
        *,
        device: torch.device | None = None,
        context: DistributedContext | None = None,
        progress: bool = True,
    ):
        super().__init__(
            model,
            None,
            None,
            sampler,
            device=device,
            context=context,
            progress=progress,
            freeze=_train_everything,
            **trainer_options(params, params.mil),
        )
        self.params = params
        self.stack_items = True  # a mini-batch of patches is one forward/backward pass
        self.train_patches = train_patches.reset_index(drop=True)
        self.tune_patches = tune_patches.reset_index(drop=True)
        self.biopsies = self.train_patches["image_id"].nunique()
        self.patch_loader = PatchLoader(
            PatchDataset(params, augment=True),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        self.last_top1: pd.DataFrame | None = None

    def train_epoch(self, run: EpochRun) -> dict[str, float]:
        """Inference phase (top-1 patch per training biopsy), then the training phase on them."""
        if run.resume is not None:
            raise NotImplementedError("MIL epochs cannot resume mid-epoch (no checkpoint_every)")
        started = time.perf_counter()
        keys = patch_keys(self.train_patches, run.global_epoch)
        logits = self.score(keys, f"stage {run.stage} epoch {run.epoch}: inference phase")
        inference_seconds = time.perf_counter() - started
        top = select_top1(self.train_patches.assign(score=logits))  # logit: same order
        if len(top) != self.biopsies:
            raise RuntimeError(f"top-1 selection gave {len(top)} of {self.biopsies} biopsies")
        self.last_top1 = top
        # what the sampler's biopsy indices refer to: (image_id, x, y, label) of its top-1 patch
        self.train_data = list(top[[*PATCH_COLUMNS, "label"]].itertuples(index=False))
        metrics = super().train_epoch(run)
        return {
            **metrics,
            "inference_patches": len(logits),
            "inference_seconds": inference_seconds,
            "inference_patches_per_second": len(logits) / max(inference_seconds, 1e-9),
        }

    def evaluate(self, run: EpochRun | None = None) -> dict[str, float]:
        """Tuning loss, accuracy and AUC of the biopsy predictions (highest patch probability)."""
        logits = self.score(patch_keys(self.tune_patches, None), "tuning set")
        frame = _biopsy_logits(self.tune_patches, logits)
        self.last_tune_predictions = frame
        return tuning_metrics(frame)

    def score(self, keys: Sequence[Any], desc: str) -> np.ndarray:
        """:func:`score_patches` of ``keys`` with this trainer's settings."""
        return score_patches(
            self.model,
            self.patch_loader,
            keys,
            batch_size=self.params.mil.inference_batch_size,
            device=self.device,
            context=self.context,
            mixed_precision=self.mixed_precision,
            channels_last=self.channels_last,
            desc=desc,
            progress=self.progress,
        )

    def _loader(self, data: list[tuple], indices: Sequence[int], epoch: int) -> Iterator[dict]:
        """The training phase's items: for each biopsy index the sampler drew, its top-1 patch
        (``data``), augmented as in this epoch's inference phase, with the biopsy label."""
        chosen = [data[index] for index in indices]
        keys = [(image_id, x, y, epoch) for image_id, x, y, _ in chosen]
        labels = iter([float(label) for *_, label in chosen])
        for batch in self.patch_loader.batches(keys, self.params.mil.batch_size):
            for image, image_id in zip(batch["image"], batch["image_id"], strict=True):
                yield {"image": image, "label": next(labels), "image_id": image_id}

    def calibration_batches(self, count: int) -> tuple[Iterator[torch.Tensor], list[str]]:
        """Float batches in [0, 1] of every patch of ``count`` randomly chosen (seeded) training
        biopsies, without augmentation, for :func:`repro.models.calibrate_batchnorm`."""
        biopsies = self.train_patches["image_id"].drop_duplicates().to_numpy()
        rng = np.random.default_rng(self.params.run.seed)
        chosen = biopsies[np.sort(rng.permutation(len(biopsies))[: min(count, len(biopsies))])]
        patches = self.train_patches[self.train_patches["image_id"].isin(chosen)]
        keys = patch_keys(patches, None)
        batches = self.patch_loader.batches(keys, self.params.mil.inference_batch_size)
        return (batch["image"].float().div(255) for batch in batches), [str(i) for i in chosen]


def _train_everything(model: nn.Module, stage: int) -> None:
    for param in model.parameters():
        param.requires_grad_(True)


# ----------------------------------------------------------------------------- wiring


def build_model(params: Params, *, weights: str | bool | None = True) -> nn.Module:
    """The patch classifier of ``params.mil``: ResNet, frozen batch norm, ImageNet mean/std.

    Args:
        params: the experiment's settings.
        weights: ``True``: ``mil.weights`` (ImageNet, a file, or random); ``None``: random (when
            trained weights are loaded next); a string: that source.
    """
    from repro.config import resolve_path
    from repro.models import build_resnet

    weights = params.mil.weights if weights is True else weights
    if weights not in (None, "imagenet"):
        weights = str(resolve_path(weights))
    return build_resnet(params.mil.arch, weights=weights, num_classes=1, head_pool=HEAD_POOL)


def _initialise(trainer: MILTrainer, out: Path, context: DistributedContext) -> None:
    """Calibrate batch norm (random init only) and make every rank start from the same weights.

    The initial weights are saved as ``init.pt`` by rank 0 and loaded by every rank, so that a
    restart does not recompute them. ``init.pt`` records the settings the run's weights depend on
    (beyond the schedule's, which :func:`repro.schedule.run_schedule` checks); other settings are
    an error, not a silent mix of two runs.

    Raises:
        CheckpointError: ``init.pt`` (and so the checkpoints) were made with other settings.
    """
    params, model = trainer.params, trainer.model
    init_path = out / "init.pt"
    schedule = {"lr", "epochs", "stage2_lr", "stage2_epochs", "window", "inference_batch_size"}
    made_with = json.dumps(
        {
            "mil": {k: v for k, v in dataclasses.asdict(params.mil).items() if k not in schedule},
            "augmentation": dataclasses.asdict(params.augmentation),
            "grid": _grid_key(params),
            "seed": params.run.seed,
        },
        sort_keys=True,
    )
    if context.is_main and not init_path.exists():
        count = params.mil.calibrate_batchnorm_images
        if params.mil.weights is not None or count == 0:
            reason = (
                "pretrained weights: their batch-norm statistics are kept (paper)"
                if params.mil.weights is not None
                else "mil.calibrate_batchnorm_images is 0: batch norm keeps mean 0, variance 1"
            )
            calibration: dict[str, Any] = {"calibrated": False, "reason": reason}
        else:
            from repro.models import calibrate_batchnorm

            batches, biopsies = trainer.calibration_batches(count)
            calibrate_batchnorm(model, batches)
            calibration = {
                "calibrated": True,
                "reason": "random initialisation: frozen batch norm needs statistics of this data",
                "images": biopsies,
                "patches": "all patches of these training biopsies, not augmented",
            }
        write_text_atomic(out / "batchnorm_calibration.json", json.dumps(calibration, indent=2))
        save_checkpoint({"model": model.state_dict(), "made_with": made_with}, init_path)
    barrier(context)
    state = load_checkpoint(init_path)
    if state.get("made_with") != made_with:
        raise CheckpointError(
            f"{init_path} was made with other settings ({state.get('made_with')}) than these "
            f"({made_with}); use the params of that run to resume it, or delete {out} to start "
            "over"
        )
    model.load_state_dict(state["model"])
    seed_everything(params.run.seed)


def train_mil(
    params: Params, *, progress: bool = True, context: DistributedContext | None = None
) -> ScheduleResult:
    """Train (or resume) the MIL baseline of ``params`` and write its run directory.

    Writes ``runs/<experiment>/mil/``: ``params.yaml`` (resolved), ``patches.csv`` (the patch
    grid), ``batchnorm_calibration.json``, ``init.pt``, ``checkpoints/``, ``metrics.csv``,
    ``selection.json``, ``final.pt`` (averaged weights), ``predictions_tune.csv``,
    ``patch_scores/`` (patch probabilities of the tuning and test biopsies, see :func:`predict`)
    and ``loss_curves.png``. Running it again with the same params resumes where it stopped.
    """
    from repro.data.splits import load_split

    out = mil_dir(params)
    context, device = start_run(params, out, context)

    train_rows = load_split(params, "train").reset_index(drop=True)
    tune_rows = load_split(params, "tune").reset_index(drop=True)
    train_patches = patch_table(params, train_rows, context=context)
    tune_patches = patch_table(params, tune_rows, context=context)
    logger.info(
        "MIL: %d training biopsies (%d patches), %d tuning biopsies (%d patches)",
        len(train_rows),
        len(train_patches),
        len(tune_rows),
        len(tune_patches),
    )
    sampler = BalancedSampler(
        train_rows["label"].astype(int).tolist(),
        seed=params.run.seed,
        num_replicas=context.world_size,
        rank=context.rank,
        oversample=params.mil.oversample_negatives,
    )
    seed_everything(params.run.seed)
    model = build_model(params).to(device)
    trainer = MILTrainer(
        model,
        params,
        train_patches,
        tune_patches,
        sampler,
        device=device,
        context=context,
        progress=progress,
    )
    _initialise(trainer, out, context)
    if use_channels_last(device, params.run.channels_last):
        model.to(memory_format=torch.channels_last)
    broadcast_parameters(model, context)
    metadata = {
        "method": METHOD_DIR,
        "arch": params.mil.arch,
        "head_pool": HEAD_POOL,
        "normalization": "imagenet",
        "patch_size": params.mil.patch_size,
        "patch_stride": params.mil.patch_stride,
    }
    settings = ScheduleSettings.from_settings(params.mil)
    try:
        result = run_schedule(trainer, settings, out, context=context, metadata=metadata)
        # Patch probabilities of the final weights for the tuning and test sets (cached).
        rows = pd.concat([tune_rows, load_split(params, "test")], ignore_index=True)
        biopsies, _ = predict(
            params, rows, loader=trainer.patch_loader, context=context, progress=progress
        )
    finally:
        trainer.patch_loader.close()
    if context.is_main:
        tune = biopsies.iloc[: len(tune_rows)]
        write_text_atomic(out / "predictions_tune.csv", tune.to_csv(index=False))
    if context.is_main:
        import matplotlib.pyplot as plt

        plt.close(save_loss_curves(out))
    barrier(context)
    return result


def load_final_model(params: Params, device: str | torch.device | None = None) -> nn.Module:
    """The averaged inference weights (``mil/final.pt``) in the classifier, in eval mode.

    Raises:
        CheckpointError: there is no ``final.pt`` (train first: notebook 04).
    """
    device = device if device is not None else select_device(params.run.device)
    return load_final_weights(build_model(params, weights=None), mil_dir(params), device)


def predict(
    params: Params,
    rows: pd.DataFrame,
    *,
    model: nn.Module | None = None,
    loader: PatchLoader | None = None,
    context: DistributedContext | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Patch and biopsy probabilities, without augmentation.

    Args:
        params: the experiment's settings.
        rows: biopsies with columns image_id and label (e.g. ``load_split(params, "test")``).
        model: a patch classifier; default: the final weights (:func:`load_final_model`), whose
            patch probabilities are cached per biopsy in ``mil/patch_scores/<image_id>.csv`` (x,
            y, score) and reused while ``final.pt`` and the patch grid are unchanged.
        loader: reads the patches (default: a new one with ``run.num_workers`` workers).
        context: under torchrun, the patches are scored by all ranks.

    Returns:
        ``biopsies``: DataFrame(image_id, label, score) in the order of ``rows``, score = the
        highest patch probability; ``patches``: DataFrame(image_id, x, y, score) with the patches'
        top-left corners in prepared-image pixels (``mil.patch_size`` square).
    """
    context = context or DistributedContext()
    rows = rows.reset_index(drop=True)
    table = patch_table(params, rows, context=context)
    cache = _ScoreCache(params) if model is None else None
    scores = cache.lookup(table) if cache is not None else np.full(len(table), np.nan)
    todo = np.flatnonzero(np.isnan(scores))
    if len(todo):
        if model is None:
            model = load_final_model(params, select_device(params.run.device, context.local_rank))
        device = next(model.parameters()).device
        own = loader is None
        if own:
            dataset = PatchDataset(params, augment=False)
            workers = params.run.num_workers
            loader = PatchLoader(dataset, num_workers=workers, pin_memory=device.type == "cuda")
        try:
            logits = score_patches(
                model,
                loader,
                patch_keys(table.iloc[todo], None),
                batch_size=params.mil.inference_batch_size,
                device=device,
                context=context,
                mixed_precision=params.run.mixed_precision,
                channels_last=params.run.channels_last,
                desc="predict",
                progress=progress,
            )
        finally:
            if own:
                loader.close()
        scores[todo] = _sigmoid(logits)
        if cache is not None and context.is_main:
            cache.store(table.iloc[todo].assign(score=scores[todo]))
        barrier(context)
    patches = table[PATCH_COLUMNS].assign(score=scores)
    best = biopsy_scores(patches)
    biopsies = pd.DataFrame(
        {"image_id": rows["image_id"].astype(str), "label": rows["label"].astype(int)}
    ).merge(best, on="image_id", how="left", sort=False)
    return biopsies, patches


class _ScoreCache:
    """Per-biopsy patch probabilities of the final weights, in ``mil/patch_scores/``."""

    def __init__(self, params: Params):
        self.folder = mil_dir(params) / "patch_scores"
        final = mil_dir(params) / "final.pt"
        if not final.exists():
            raise CheckpointError(
                f"{final} does not exist: train the MIL model first (notebook 04)"
            )
        digest = hashlib.sha256(final.read_bytes()).hexdigest()
        self.key = {"final_sha256": digest, "grid": _grid_key(params)}
        stamp = self.folder / "model.json"
        self.valid = stamp.exists() and json.loads(stamp.read_text()) == self.key

    def lookup(self, table: pd.DataFrame) -> np.ndarray:
        """Cached scores aligned with ``table`` (NaN where a biopsy is not cached)."""
        scores = np.full(len(table), np.nan)
        if not self.valid:
            return scores
        for image_id, index in table.groupby("image_id", sort=False).indices.items():
            path = self.folder / f"{image_id}.csv"
            if path.exists():
                cached = pd.read_csv(path)
                same = table.iloc[index][["x", "y"]].to_numpy()
                if np.array_equal(same, cached[["x", "y"]].to_numpy()):
                    scores[index] = cached["score"].to_numpy()
        return scores

    def store(self, scored: pd.DataFrame) -> None:
        """Write one CSV (x, y, score) per biopsy of ``scored``."""
        if not self.valid:  # scores of other weights or another grid: start afresh
            for stale in self.folder.glob("*.csv"):
                stale.unlink()
        for image_id, group in scored.groupby("image_id", sort=False):
            text = group[["x", "y", "score"]].to_csv(index=False)
            write_text_atomic(self.folder / f"{image_id}.csv", text)
        write_text_atomic(self.folder / "model.json", json.dumps(self.key, indent=2))
        self.valid = True


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m repro.mil params/X.yaml``, also under ``torchrun --nproc_per_node N``."""
    return command_line("repro.mil", train_mil, argv)


if __name__ == "__main__":
    raise SystemExit(main())

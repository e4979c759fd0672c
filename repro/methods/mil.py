"""Top-1 multiple-instance-learning baseline (paper IV-B, after Campanella et al. 2019).

Each prepared biopsy is divided into a grid of patches over its tissue
(:mod:`repro.data.patches`). Every epoch has two phases: an inference phase scores every patch of
every training biopsy, and the patch with the highest tumour probability (the top-1 patch,
:func:`select_top1`) gets the biopsy label; a training phase then optimises the network on those
top-1 patches only (mini-batch 16, negatives oversampled). The same augmented patch serves both
phases of an epoch. A biopsy's prediction is its highest patch probability
(:func:`biopsy_scores`).

The network is a conventionally run ResNet with frozen batch norm and ImageNet normalisation
(:func:`repro.nn.resnet.build_resnet`). :class:`TopOnePatches` is this method's side of the
shared loop (:class:`repro.training.loop.Trainer`), which with
:func:`repro.training.schedule.run_schedule` gives both methods the same optimiser step, two-stage
schedule, checkpoints, resume, mixed precision and multi-GPU.

Public: :func:`train_mil`, :func:`predict`, :func:`load_final_model`, :func:`build_model`,
:func:`score_patches`, :func:`select_top1`, :func:`biopsy_scores`, :class:`TopOnePatches`;
``python -m repro train-mil params/<name>.yaml`` (also under ``torchrun``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.special import expit
from torch import nn
from tqdm.auto import tqdm

from repro.config import Params, resolve_path
from repro.data.patches import (
    PATCH_COLUMNS,
    PatchDataset,
    PatchGrid,
    PatchLoader,
    patch_keys,
    patch_table,
)
from repro.data.sampling import BalancedSampler
from repro.data.splits import load_split
from repro.exceptions import CheckpointError
from repro.frames import require_columns
from repro.io.atomic import write_text_atomic
from repro.layout import MethodLayout
from repro.methods.base import Predictions
from repro.nn.pixels import unit_float
from repro.nn.resnet import build_resnet
from repro.training.initial import calibrate_if_random, initial_weights
from repro.training.loop import Trainer
from repro.training.runtime import (
    DistributedContext,
    Runtime,
    all_gather_objects,
    barrier,
    broadcast_parameters,
    seed_everything,
    select_device,
)
from repro.training.schedule import (
    ScheduleResult,
    ScheduleSettings,
    load_final_weights,
    run_schedule,
    start_run,
)

logger = logging.getLogger(__name__)

HEAD_POOL = "avg"  # torchvision's ResNet head, as Campanella et al. use it


def mil_files(params: Params) -> MethodLayout:
    """``runs/<experiment>/mil``: everything the MIL baseline writes."""
    return params.layout.mil


def patch_grid_of(params: Params) -> PatchGrid:
    """The patch grid of ``params`` (``data`` and ``mil`` settings)."""
    return PatchGrid.from_settings(params.data, params.mil)


def experiment_patches(
    params: Params, rows: pd.DataFrame, context: DistributedContext | None = None
) -> pd.DataFrame:
    """:func:`repro.data.patches.patch_table` of ``rows`` with this experiment's grid and cache
    (rank 0 computes, every rank reads)."""
    context = context or DistributedContext()
    files = mil_files(params)
    if context.is_main:
        table = patch_table(rows, params.prepared, patch_grid_of(params), files)
    barrier(context)
    if not context.is_main:
        table = patch_table(rows, params.prepared, patch_grid_of(params), files, is_main=False)
    return table


# ----------------------------------------------------------------------------- top-1 and scores


def select_top1(patches: pd.DataFrame, score: str = "score") -> pd.DataFrame:
    """The patch with the highest ``score`` per ``image_id`` (ties: the first in table order).

    Returns the selected rows (all columns), one per biopsy, in order of first appearance.
    """
    require_columns(patches, ["image_id", score], "patches")
    if patches[score].isna().any():
        raise ValueError(f"patches: column {score!r} has NaN values")
    order = patches.reset_index(drop=True)
    best = order.groupby("image_id", sort=False)[score].idxmax()
    return order.loc[best.to_numpy()].reset_index(drop=True)


def biopsy_scores(patches: pd.DataFrame, score: str = "score") -> pd.DataFrame:
    """A biopsy's score is its highest patch score: DataFrame(image_id, score)."""
    require_columns(patches, ["image_id", score], "patches")
    best = patches.groupby("image_id", sort=False)[score].max()
    return pd.DataFrame({"image_id": best.index.to_numpy(), "score": best.to_numpy()})


@torch.no_grad()
def score_patches(
    model: nn.Module,
    loader: PatchLoader,
    keys: Sequence[Any],
    *,
    batch_size: int,
    runtime: Runtime | None = None,
    desc: str = "patches",
) -> np.ndarray:
    """Logits (float32) of the patches of ``keys``, in order: batched, without gradients.

    Under torchrun every rank scores a contiguous share of the keys and the shares are gathered,
    so every rank returns all logits.
    """
    runtime = runtime or Runtime()
    context = runtime.context
    bounds = np.linspace(0, len(keys), context.world_size + 1).astype(int)
    share = keys[bounds[context.rank] : bounds[context.rank + 1]]
    was_training = model.training
    model.eval()
    logits = [np.zeros(0, np.float32)]
    bar = tqdm(
        total=len(keys), desc=desc, unit="patch", disable=not runtime.shows_progress, leave=False
    )
    for batch in loader.batches(share, batch_size):
        images = runtime.batch(batch["image"])
        with runtime.autocast():
            output = model(images)
        logits.append(output.reshape(len(images), -1)[:, 0].float().cpu().numpy())
        bar.update(len(images) * context.world_size)
    bar.close()
    model.train(was_training)
    return np.concatenate(all_gather_objects(np.concatenate(logits), context))


# ----------------------------------------------------------------------------- training


class TopOnePatches:
    """The MIL baseline's side of :class:`repro.training.loop.Trainer`.

    An epoch starts with the inference phase over every training patch (augmented as in this
    epoch); its items are the top-1 patches, one per training biopsy, drawn by ``sampler`` (over
    biopsies) and read with the same augmentation. The tuning set is scored as the highest patch
    logit per biopsy. Its :class:`repro.data.patches.PatchLoader` (``loader``) reads the patches of
    every phase; close it when done.

    Args:
        train_patches, tune_patches: patch tables of the training and tuning biopsies.
        sampler: e.g. :class:`repro.data.sampling.BalancedSampler` over the training biopsies'
            labels, in the order in which they first appear in ``train_patches``.
        loader: reads augmented patches (``PatchDataset`` with augmentation).
        batch_size: mini-batch of the training phase (patches read together).
        inference_batch_size: patches scored together.
        runtime: device, process group and switches.
    """

    stack = True  # a mini-batch of patches is one forward/backward pass

    def __init__(
        self,
        train_patches: pd.DataFrame,
        tune_patches: pd.DataFrame,
        sampler: Any,
        loader: PatchLoader,
        *,
        batch_size: int,
        inference_batch_size: int,
        runtime: Runtime,
    ):
        self.train_patches = train_patches.reset_index(drop=True)
        self.tune_patches = tune_patches.reset_index(drop=True)
        self.sampler, self.loader, self.runtime = sampler, loader, runtime
        self.batch_size, self.inference_batch_size = batch_size, inference_batch_size
        self.biopsies = self.train_patches["image_id"].nunique()
        self.top1: list[tuple] = []
        self.last_top1: pd.DataFrame | None = None

    def epoch_indices(self, model: nn.Module, epoch: int) -> tuple[list[int], dict[str, float]]:
        """Inference phase (top-1 patch per training biopsy), then the sampler's biopsies."""
        started = time.perf_counter()
        keys = patch_keys(self.train_patches, epoch)
        logits = self.score(model, keys, f"epoch {epoch}: inference phase")
        seconds = time.perf_counter() - started
        top = select_top1(self.train_patches.assign(score=logits))  # logit: same order
        if len(top) != self.biopsies:
            raise RuntimeError(f"top-1 selection gave {len(top)} of {self.biopsies} biopsies")
        self.last_top1 = top
        # what the sampler's biopsy indices refer to: (image_id, x, y, label) of its top-1 patch
        self.top1 = list(top[[*PATCH_COLUMNS, "label"]].itertuples(index=False))
        self.sampler.set_epoch(epoch)
        metrics = {
            "inference_patches": len(logits),
            "inference_seconds": seconds,
            "inference_patches_per_second": len(logits) / max(seconds, 1e-9),
        }
        return [int(i) for i in self.sampler], metrics

    def items(self, indices: Sequence[int], epoch: int) -> Iterator[dict[str, Any]]:
        """For each biopsy index, its top-1 patch augmented as in this epoch's inference phase,
        with the biopsy label."""
        chosen = [self.top1[index] for index in indices]
        keys = [(image_id, x, y, epoch) for image_id, x, y, _ in chosen]
        labels = iter([float(label) for *_, label in chosen])
        for batch in self.loader.batches(keys, self.batch_size):
            for image, image_id in zip(batch["image"], batch["image_id"], strict=True):
                yield {"image": image, "label": next(labels), "image_id": image_id}

    def tune_predictions(self, model: nn.Module) -> pd.DataFrame:
        """Tuning biopsies' logits: the highest patch logit, patches not augmented."""
        logits = self.score(model, patch_keys(self.tune_patches, None), "tuning set")
        return biopsy_logits(self.tune_patches, logits)

    def score(self, model: nn.Module, keys: Sequence[Any], desc: str) -> np.ndarray:
        """:func:`score_patches` of ``keys`` with this object's loader and settings."""
        return score_patches(
            model, self.loader, keys, batch_size=self.inference_batch_size,
            runtime=self.runtime, desc=desc,
        )  # fmt: skip

    def calibration_batches(self, count: int) -> tuple[Iterator[torch.Tensor], dict[str, Any]]:
        """Float batches in [0, 1] of every patch of ``count`` randomly chosen (seeded by the
        sampler's seed) training biopsies, without augmentation, for batch-norm calibration."""
        biopsies = self.train_patches["image_id"].drop_duplicates().to_numpy()
        rng = np.random.default_rng(self.sampler.seed)
        chosen = biopsies[np.sort(rng.permutation(len(biopsies))[: min(count, len(biopsies))])]
        patches = self.train_patches[self.train_patches["image_id"].isin(chosen)]
        batches = self.loader.batches(patch_keys(patches, None), self.inference_batch_size)
        details = {
            "images": [str(i) for i in chosen],
            "patches": "all patches of these training biopsies, not augmented",
        }
        return (unit_float(batch["image"]) for batch in batches), details


def biopsy_logits(patches: pd.DataFrame, logits: np.ndarray) -> pd.DataFrame:
    """DataFrame(image_id, label, logit, score): a biopsy's logit is its highest patch logit."""
    scored = patches[["image_id", "label"]].assign(logit=logits.astype(np.float64))
    best = biopsy_scores(scored, score="logit").rename(columns={"score": "logit"})
    labels = scored.drop_duplicates("image_id")[["image_id", "label"]]
    frame = labels.merge(best, on="image_id", how="left", sort=False)
    frame["score"] = _sigmoid(frame["logit"].to_numpy())
    return frame.reset_index(drop=True)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return expit(np.asarray(logits, dtype=np.float64))


def build_model(params: Params, *, weights: str | bool | None = True) -> nn.Module:
    """The patch classifier of ``params.mil``: ResNet, frozen batch norm, ImageNet mean/std.

    Args:
        params: the experiment's settings.
        weights: ``True``: ``mil.weights`` (ImageNet, a file, or random); ``None``: random (when
            trained weights are loaded next); a string: that source.
    """
    weights = params.mil.weights if weights is True else weights
    if weights not in (None, "imagenet"):
        weights = str(resolve_path(weights))
    return build_resnet(
        params.mil.arch,
        weights=weights,
        num_classes=1,
        head_pool=HEAD_POOL,
        standardize_pooled=params.mil.standardize_pooled,
    )


def _made_with(params: Params) -> str:
    """The settings the initial weights depend on (beyond the schedule's, which
    :func:`repro.training.schedule.run_schedule` checks)."""
    schedule = {"lr", "epochs", "stage2_lr", "stage2_epochs", "window", "inference_batch_size"}
    return json.dumps(
        {
            "mil": {k: v for k, v in dataclasses.asdict(params.mil).items() if k not in schedule},
            "augmentation": dataclasses.asdict(params.augmentation),
            "grid": patch_grid_of(params).key,
            "seed": params.run.seed,
        },
        sort_keys=True,
    )


def train_mil(
    params: Params, *, progress: bool = True, context: DistributedContext | None = None
) -> ScheduleResult:
    """Train (or resume) the MIL baseline of ``params`` and write its run directory.

    Writes ``runs/<experiment>/mil/`` (:class:`repro.layout.MethodLayout`): the resolved params,
    the patch grid, the batch-norm calibration record, the initial weights, checkpoints, metrics,
    the selection, the averaged final weights and the tuning set's predictions (with the patch
    probabilities of the final weights cached, see :func:`predict`). Running it again with the
    same params resumes where it stopped.
    """
    files = mil_files(params)
    context, device = start_run(params, files.root, context)
    runtime = Runtime.of_run(params.run, device, context, progress=progress)
    train_rows = load_split(params, "train").reset_index(drop=True)
    tune_rows = load_split(params, "tune").reset_index(drop=True)
    train_patches = experiment_patches(params, train_rows, context)
    tune_patches = experiment_patches(params, tune_rows, context)
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
    dataset = PatchDataset(
        params.prepared, params.mil.patch_size, params.augmentation, seed=params.run.seed
    )
    with PatchLoader(
        dataset, num_workers=params.run.num_workers, pin_memory=device.type == "cuda"
    ) as loader:
        data = TopOnePatches(
            train_patches, tune_patches, sampler, loader,
            batch_size=params.mil.batch_size,
            inference_batch_size=params.mil.inference_batch_size,
            runtime=runtime,
        )  # fmt: skip

        def prepare(model: nn.Module) -> dict[str, Any]:
            calibrate_if_random(
                model,
                files,
                pretrained=params.mil.weights is not None,
                count=params.mil.calibrate_batchnorm_images,
                count_key="mil.calibrate_batchnorm_images",
                batches=data.calibration_batches,
            )
            return {}

        initial_weights(
            model, files, _made_with(params), prepare, seed=params.run.seed, context=context
        )
        model = runtime.place(model)
        broadcast_parameters(model, context)
        trainer = Trainer(
            model,
            data,
            batch_size=params.mil.batch_size,
            momentum=params.mil.momentum,
            optimizer=params.mil.optimizer,
            runtime=runtime,
        )
        metadata = {
            "method": "mil",
            "arch": params.mil.arch,
            "head_pool": HEAD_POOL,
            "normalization": "imagenet",
            "patch_size": params.mil.patch_size,
            "patch_stride": params.mil.patch_stride,
        }
        settings = ScheduleSettings.from_settings(params.mil)
        result = run_schedule(trainer, settings, files.root, context=context, metadata=metadata)
        # The tuning set's patch probabilities of the final weights (cached for later use).
        tune = predict(params, tune_rows, loader=loader, context=context, progress=progress)
    if context.is_main:
        write_text_atomic(files.predictions("tune"), tune.biopsies.to_csv(index=False))
    barrier(context)
    return result


def load_final_model(params: Params, device: str | torch.device | None = None) -> nn.Module:
    """The averaged inference weights (``mil/final.pt``) in the classifier, in eval mode.

    Raises:
        CheckpointError: there is no ``final.pt`` (train first: notebook 04).
    """
    device = device if device is not None else select_device(params.run.device)
    return load_final_weights(build_model(params, weights=None), mil_files(params).root, device)


def predict(
    params: Params,
    rows: pd.DataFrame,
    *,
    model: nn.Module | None = None,
    loader: PatchLoader | None = None,
    context: DistributedContext | None = None,
    progress: bool = True,
) -> Predictions:
    """Patch and biopsy probabilities, without augmentation.

    Args:
        params: the experiment's settings.
        rows: biopsies with columns image_id and label (e.g. ``load_split(params, "test")``).
        model: a patch classifier; default: the final weights (:func:`load_final_model`), whose
            patch probabilities are cached per biopsy in the MIL run folder and reused while
            ``final.pt`` and the patch grid are unchanged.
        loader: reads the patches (default: a new one with ``run.num_workers`` workers).
        context: under torchrun, the patches are scored by all ranks.

    Returns:
        :class:`repro.methods.base.Predictions`: ``biopsies`` in the order of ``rows``, score =
        the highest patch probability; ``patches`` (image_id, x, y, score) with the patches'
        top-left corners in prepared-image pixels (``mil.patch_size`` square).
    """
    context = context or DistributedContext()
    rows = rows.reset_index(drop=True)
    table = experiment_patches(params, rows, context)
    cache = _ScoreCache(params) if model is None else None
    scores = cache.lookup(table) if cache is not None else np.full(len(table), np.nan)
    todo = np.flatnonzero(np.isnan(scores))
    if len(todo):
        if model is None:
            model = load_final_model(params, select_device(params.run.device, context.local_rank))
        device = next(model.parameters()).device
        runtime = Runtime.of_run(params.run, device, context, progress=progress)
        own = loader is None
        if own:
            dataset = PatchDataset(params.prepared, params.mil.patch_size, seed=params.run.seed)
            workers = params.run.num_workers
            loader = PatchLoader(dataset, num_workers=workers, pin_memory=device.type == "cuda")
        try:
            logits = score_patches(
                model,
                loader,
                patch_keys(table.iloc[todo], None),
                batch_size=params.mil.inference_batch_size,
                runtime=runtime,
                desc="predict",
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
    return Predictions(biopsies, patches)


class _ScoreCache:
    """Per-biopsy patch probabilities of the final weights, in the MIL run folder."""

    def __init__(self, params: Params):
        self.files = mil_files(params)
        final = self.files.final
        if not final.exists():
            raise CheckpointError(
                f"{final} does not exist: train the MIL model first (notebook 04)"
            )
        digest = hashlib.sha256(final.read_bytes()).hexdigest()
        self.key = {"final_sha256": digest, "grid": patch_grid_of(params).key}
        stamp = self.files.patch_probability_key
        self.valid = stamp.exists() and json.loads(stamp.read_text()) == self.key

    def lookup(self, table: pd.DataFrame) -> np.ndarray:
        """Cached scores aligned with ``table`` (NaN where a biopsy is not cached)."""
        scores = np.full(len(table), np.nan)
        if not self.valid:
            return scores
        for image_id, index in table.groupby("image_id", sort=False).indices.items():
            path = self.files.patch_probability_file(image_id)
            if path.exists():
                cached = pd.read_csv(path)
                same = table.iloc[index][["x", "y"]].to_numpy()
                if np.array_equal(same, cached[["x", "y"]].to_numpy()):
                    scores[index] = cached["score"].to_numpy()
        return scores

    def store(self, scored: pd.DataFrame) -> None:
        """Write one CSV (x, y, score) per biopsy of ``scored``."""
        if not self.valid:  # scores of other weights or another grid: start afresh
            for stale in self.files.patch_probability_cache.glob("*.csv"):
                stale.unlink()
        for image_id, group in scored.groupby("image_id", sort=False):
            text = group[["x", "y", "score"]].to_csv(index=False)
            write_text_atomic(self.files.patch_probability_file(image_id), text)
        write_text_atomic(self.files.patch_probability_key, json.dumps(self.key, indent=2))
        self.valid = True

"""The streaming method (paper IV-A): whole biopsies, image-level labels, end to end.

One image is in memory at a time; its gradients are accumulated until ``train.batch_size`` images
(16 in the paper) have been seen, then the optimiser takes one step on the mean binary
cross-entropy of the mini-batch (:class:`repro.training.loop.Trainer`). Negatives are oversampled
by :class:`repro.data.sampling.BalancedSampler`; batch norm is frozen; images are augmented by the
data pipeline and normalised with the training set's per-channel mean and std. The schedule
(stage 1 with the streamed layers frozen, the moving-average checkpoint pick, stage 2, weight
averaging) is :mod:`repro.training.schedule`, shared with the MIL baseline.

:class:`WholeBiopsies` is this method's side of the shared loop. ``python -m repro
train-streaming params/<name>.yaml`` runs the training outside the notebooks, also under
``torchrun`` (see the README's multi-GPU section).

Public: :func:`train_streaming`, :func:`load_final_model`, :func:`predict`, :func:`build_model`,
:func:`resolve_tile_size`, :class:`WholeBiopsies`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from repro.config import Params, resolve_path
from repro.data.datasets import BiopsyDataset
from repro.data.sampling import BalancedSampler, KeySampler, persistent_loader
from repro.data.splits import load_split
from repro.data.stats import channel_stats
from repro.io.atomic import write_text_atomic
from repro.layout import MethodLayout
from repro.methods.base import Predictions
from repro.nn.pixels import unit_float
from repro.nn.resnet import build_streaming_resnet, freeze_streamed, unfreeze_streamed
from repro.nn.streaming import plan_tile_size
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

CALIBRATION_MAX_SIDE = 1024  # our choice: BN statistics from crops of at most 1024 px


def streaming_files(params: Params) -> MethodLayout:
    """``runs/<experiment>/streaming``: everything this method writes."""
    return params.layout.streaming


# ----------------------------------------------------------------------------- data side


class WholeBiopsies:
    """The streaming method's side of :class:`repro.training.loop.Trainer`: an epoch's items are
    whole (augmented) biopsies in the order ``sampler`` draws them; the tuning set is scored by
    streamed inference, split over ranks.

    The training and tuning sets share one DataLoader for the whole run: with worker processes
    they are started once ("spawn": pyvips and fork do not mix) and kept; the dataset and the
    epoch travel with each index.

    Args:
        train_data, tune_data: :class:`repro.data.datasets.BiopsyDataset` (the tuning set
            without augmentation).
        sampler: ``set_epoch(e)`` then ``iter()`` gives this rank's training indices of epoch
            ``e`` (e.g. :class:`repro.data.sampling.BalancedSampler`).
        runtime: device, process group and switches.
        num_workers: data-loading processes.
        seed: seeds the data loader's own generator.
    """

    stack = False

    def __init__(
        self,
        train_data: Any,
        tune_data: Any,
        sampler: Any,
        *,
        runtime: Runtime,
        num_workers: int = 0,
        seed: int = 0,
    ):
        self.train_data, self.tune_data, self.sampler = train_data, tune_data, sampler
        self.runtime, self.num_workers, self.seed = runtime, num_workers, seed
        self._shared: tuple[Any, KeySampler] | None = None

    def epoch_indices(self, model: nn.Module, epoch: int) -> tuple[list[int], dict[str, float]]:
        self.sampler.set_epoch(epoch)
        return [int(i) for i in self.sampler], {}

    def items(self, indices: Sequence[int], epoch: int) -> Any:
        return self._loader(1, indices, epoch)

    def tune_predictions(self, model: nn.Module) -> pd.DataFrame:
        """``image_id, label, logit, score`` of the tuning set (split over ranks, gathered)."""
        context = self.runtime.context
        indices = list(range(context.rank, len(self.tune_data), context.world_size))
        rows = predict_items(
            model, self._loader(2, indices, 0), self.runtime, total=len(indices), desc="tuning set"
        )
        gathered = [row for part in all_gather_objects(rows, context) for row in part]
        gathered.sort(key=lambda row: row.pop("index"))
        return pd.DataFrame(gathered, columns=["image_id", "label", "logit", "score"])

    def _loader(self, which: int, indices: Sequence[int], epoch: int) -> Any:
        if self._shared is None:
            sets = {1: self.train_data, 2: self.tune_data}
            self._shared = make_loader(sets, self.num_workers, self.runtime.device, self.seed)
        loader, sampler = self._shared
        sampler.keys = [(which, int(index), int(epoch)) for index in indices]
        return loader


class _Keyed(torch.utils.data.Dataset):
    """Items of several datasets keyed by ``(dataset, index, epoch)``: sets the augmentation
    epoch in whichever process loads the item, and adds ``index`` (to put rank-split predictions
    back in order)."""

    def __init__(self, datasets: dict[int, Any]):
        self.datasets = datasets

    def __len__(self) -> int:
        return sum(len(data) for data in self.datasets.values())

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        which, index, epoch = key
        data = self.datasets[which]
        if hasattr(data, "set_epoch"):  # augmented datasets
            data.set_epoch(epoch)
        return {**data[index], "index": index}


def make_loader(
    datasets: dict[int, Any], num_workers: int, device: torch.device, seed: int
) -> tuple[torch.utils.data.DataLoader, KeySampler]:
    """A loader over ``datasets`` (key -> dataset) that reads whatever its sampler's keys
    ``(dataset key, index, epoch)`` say; its worker processes live as long as it does."""
    sampler = KeySampler()
    loader = persistent_loader(
        _Keyed(datasets),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        sampler=sampler,
        batch_size=None,
        generator=torch.Generator().manual_seed(seed),  # leaves the global RNG alone
    )
    return loader, sampler


@torch.no_grad()
def predict_items(
    model: nn.Module, items: Any, runtime: Runtime, *, total: int, desc: str
) -> list[dict[str, Any]]:
    """Streamed inference: ``index, image_id, label, logit, score`` per item (no augmentation)."""
    was_training = model.training
    model.eval()
    rows = []
    bar = tqdm(items, total=total, desc=desc, unit="img", disable=not runtime.shows_progress,
               leave=False)  # fmt: skip
    for item in bar:
        image = runtime.batch(item["image"].reshape(1, *item["image"].shape[-3:]))
        with runtime.autocast():
            logit = float(model(image).reshape(-1)[0].float())
        rows.append(
            {
                "index": int(item.get("index", len(rows))),
                "image_id": str(item["image_id"]),
                "label": int(float(item["label"]) > 0.5),
                "logit": logit,
                "score": float(torch.sigmoid(torch.tensor(logit, dtype=torch.float64))),
            }
        )
    model.train(was_training)
    return rows


def freeze_for_stage(model: nn.Module, stage: int) -> None:
    """Stage 1: the streamed part frozen (no backward through it); stage 2: everything."""
    for param in model.parameters():
        param.requires_grad_(True)
    if stage == 1:
        freeze_streamed(model)
    else:
        unfreeze_streamed(model)


# ----------------------------------------------------------------------------- wiring


def biopsy_dataset(params: Params, rows: pd.DataFrame, *, augment: bool) -> BiopsyDataset:
    """The whole-biopsy dataset of ``rows`` with this experiment's data and augmentation."""
    return BiopsyDataset(
        rows.reset_index(drop=True),
        params.prepared,
        params.augmentation,
        seed=params.run.seed,
        augment=augment and params.augmentation.enabled,
    )


def resolve_tile_size(params: Params, model: nn.Module | None = None) -> int:
    """``streaming.tile_size``, or planned from ``streaming.memory_budget_gb`` for the streamed
    part over one ``input_size`` image (stage 2: every weight trainable; uint8 input)."""
    budget = params.streaming.memory_budget_gb
    if budget is None:
        return params.streaming.tile_size
    model = model if model is not None else _build(params, weights=None)
    size = params.data.input_size
    tile = plan_tile_size(
        model.streamed, (1, 3, size, size), int(budget * 2**30), input_dtype=torch.uint8
    )
    logger.info("tile size %d planned for a %.1f GB budget", tile, budget)
    return tile


def build_model(params: Params, *, weights: str | bool | None = True) -> nn.Module:
    """The streamed ResNet of ``params.streaming`` with its resolved tile size.

    Args:
        params: the experiment's settings.
        weights: ``True``: ``streaming.weights`` (ImageNet, a file, or random); ``None``: random
            (when trained weights are loaded next); a string: that source.
    """
    model = _build(params, params.streaming.weights if weights is True else weights)
    model.streamed.tile_size = resolve_tile_size(params, model)
    return model


def _build(params: Params, weights: str | None) -> nn.Module:
    if weights not in (None, "imagenet"):
        weights = str(resolve_path(weights))
    settings = params.streaming
    return build_streaming_resnet(
        settings.arch,
        weights=weights,
        stream_until=settings.stream_until,
        tile_size=settings.tile_size,
        num_classes=1,
        head_pool=settings.head_pool,
        standardize_pooled=settings.standardize_pooled,
    )


def _made_with(params: Params) -> dict[str, Any]:
    """The settings the initial weights depend on (the schedule checks lr, epochs and window)."""
    streaming = dataclasses.asdict(params.streaming)
    for key in ("tile_size", "memory_budget_gb"):  # tiling does not change the weights
        streaming.pop(key)
    return {
        "streaming": streaming,
        "input_size": params.data.input_size,
        "train": {
            key: getattr(params.train, key)
            for key in (
                "batch_size",
                "momentum",
                "optimizer",
                "epoch_images",
                "oversample_negatives",
                "calibrate_batchnorm_images",
            )
        },
        "augmentation": dataclasses.asdict(params.augmentation),
        "seed": params.run.seed,
    }


def _prepare_initial(params: Params, files: MethodLayout, model: nn.Module) -> dict[str, Any]:
    """Input normalisation from the training set, and batch-norm statistics (random init)."""
    train_rows = load_split(params, "train")
    mean, std = channel_stats(train_rows, params.prepared)
    model.normalize.set_stats(mean, std)
    info: dict[str, Any] = {
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "images": len(train_rows),
        "source": "repro.data.stats.channel_stats over the training split",
    }
    write_text_atomic(files.normalization, json.dumps(info, indent=2) + "\n")

    def batches(count: int) -> tuple[Iterator[torch.Tensor], dict[str, Any]]:
        rng = np.random.default_rng(params.run.seed)
        chosen = train_rows.iloc[np.sort(rng.permutation(len(train_rows))[:count])]
        dataset = biopsy_dataset(params, chosen, augment=False)

        def crops() -> Iterator[torch.Tensor]:
            for index in range(len(dataset)):
                image = unit_float(dataset[index]["image"])
                side = min(CALIBRATION_MAX_SIDE, image.shape[-1], image.shape[-2])
                top = (image.shape[-2] - side) // 2
                left = (image.shape[-1] - side) // 2
                yield image[:, top : top + side, left : left + side].unsqueeze(0)

        details = {
            "images": [str(i) for i in chosen["image_id"]],
            "crop": f"centre crop of at most {CALIBRATION_MAX_SIDE} px, no augmentation",
        }
        return crops(), details

    calibrate_if_random(
        model,
        files,
        pretrained=params.streaming.weights is not None,
        count=params.train.calibrate_batchnorm_images,
        count_key="train.calibrate_batchnorm_images",
        batches=batches,
    )
    return {"normalization": info}


def train_streaming(
    params: Params,
    *,
    progress: bool = True,
    context: DistributedContext | None = None,
) -> ScheduleResult:
    """Train (or resume) the streaming model of ``params`` and write its run directory.

    Writes ``runs/<experiment>/streaming/`` (:class:`repro.layout.MethodLayout`): the resolved
    params, the normalisation and batch-norm calibration records, the initial weights,
    checkpoints, metrics, the selection, the averaged final weights and the tuning set's
    predictions. Running it again with the same params resumes where it stopped.
    """
    files = streaming_files(params)
    context, device = start_run(params, files.root, context)
    runtime = Runtime.of_run(params.run, device, context, progress=progress)
    seed_everything(params.run.seed)
    model = build_model(params)
    initial_weights(
        model,
        files,
        _made_with(params),
        lambda model: _prepare_initial(params, files, model),
        seed=params.run.seed,
        context=context,
    )
    model = runtime.place(model)
    broadcast_parameters(model, context)

    train_rows = load_split(params, "train").reset_index(drop=True)
    tune_rows = load_split(params, "tune").reset_index(drop=True)
    sampler = BalancedSampler(
        train_rows["label"].astype(int).tolist(),
        seed=params.run.seed,
        num_replicas=context.world_size,
        rank=context.rank,
        oversample=params.train.oversample_negatives,
    )
    data = WholeBiopsies(
        biopsy_dataset(params, train_rows, augment=True),
        biopsy_dataset(params, tune_rows, augment=False),
        sampler,
        runtime=runtime,
        num_workers=params.run.num_workers,
        seed=params.run.seed,
    )
    trainer = Trainer(
        model,
        data,
        batch_size=params.train.batch_size,
        momentum=params.train.momentum,
        optimizer=params.train.optimizer,
        freeze=freeze_for_stage,
        runtime=runtime,
        epoch_images=params.train.epoch_images,
    )
    metadata = {
        "method": "streaming",
        "arch": params.streaming.arch,
        "stream_until": params.streaming.stream_until,
        "head_pool": params.streaming.head_pool,
        "tile_size": int(model.streamed.tile_size[0]),
        "input_size": params.data.input_size,
    }
    settings = ScheduleSettings.from_settings(params.train)
    result = run_schedule(trainer, settings, files.root, context=context, metadata=metadata)
    frame = data.tune_predictions(trainer.model)
    if context.is_main:
        predictions = frame[["image_id", "label", "score"]].to_csv(index=False)
        write_text_atomic(files.predictions("tune"), predictions)
    barrier(context)
    return result


def load_final_model(params: Params, device: str | torch.device | None = None) -> nn.Module:
    """The averaged inference weights (``final.pt``) in the model of ``params``, in eval mode.

    Args:
        params: the experiment's settings (architecture and tile size come from them).
        device: default ``run.device``.

    Raises:
        CheckpointError: there is no ``final.pt`` (train first: notebook 03).
    """
    device = device if device is not None else select_device(params.run.device)
    return load_final_weights(
        build_model(params, weights=None), streaming_files(params).root, device
    )


def predict(
    params: Params,
    rows: pd.DataFrame,
    *,
    model: nn.Module | None = None,
    progress: bool = True,
) -> Predictions:
    """Streamed inference without augmentation on whole biopsies.

    Args:
        params: the experiment's settings.
        rows: biopsies with columns image_id and label.
        model: default: the final weights (:func:`load_final_model`).

    Returns:
        :class:`repro.methods.base.Predictions` whose ``biopsies`` are (image_id, label, score),
        ``score = sigmoid(logit)``, in the order of ``rows``; ``patches`` is None.
    """
    model = model if model is not None else load_final_model(params)
    dataset = biopsy_dataset(params, rows, augment=False)
    device = next(model.parameters()).device
    runtime = Runtime.of_run(params.run, device, progress=progress)
    loader, sampler = make_loader({0: dataset}, params.run.num_workers, device, params.run.seed)
    sampler.keys = [(0, index, 0) for index in range(len(dataset))]
    rows_out = predict_items(model, loader, runtime, total=len(dataset), desc="predict")
    frame = pd.DataFrame(rows_out, columns=["index", "image_id", "label", "logit", "score"])
    return Predictions(frame[["image_id", "label", "score"]])

"""The streaming trainer (paper IV-A): whole biopsies, image-level labels, end to end.

One image is in memory at a time; its gradients are accumulated until ``train.batch_size`` images
(16 in the paper) have been seen, then SGD (momentum 0.9) takes one step on the mean
binary cross-entropy of the mini-batch. Negatives are oversampled by the shared
:class:`repro.data.sampling.BalancedSampler`; batch norm is frozen; images are augmented by the
data pipeline and normalised with the training set's per-channel mean and std. The schedule (stage
1 with the streamed layers frozen, the moving-average checkpoint pick, stage 2, weight averaging)
is :mod:`repro.schedule`, shared with the MIL baseline.

Under ``torchrun`` every process takes ``batch_size / world_size`` images of each mini-batch (the
sampler splits the epoch over ranks) and the accumulated gradients are summed over ranks before the
step, as in the authors' code. ``python -m repro.train params/<name>.yaml`` runs the training
outside the notebooks (see the README's multi-GPU section).

Public: :func:`train_streaming`, :func:`load_final_model`, :func:`predict`, :func:`build_model`,
:class:`StreamingTrainer` (the :class:`repro.schedule.MethodTrainer` of this method) and
:func:`train_minibatch` (one accumulated step; tested against a non-streamed reference).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from repro.atomic import write_text_atomic
from repro.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from repro.config import Params
from repro.data.sampling import BalancedSampler, KeySampler, persistent_loader
from repro.runtime import (
    DistributedContext,
    all_gather_objects,
    all_reduce_gradients,
    all_reduce_sum,
    autocast,
    barrier,
    broadcast_parameters,
    make_grad_scaler,
    seed_everything,
    select_device,
    use_channels_last,
)
from repro.schedule import (
    EpochRun,
    NonFiniteError,
    ScheduleResult,
    ScheduleSettings,
    command_line,
    load_final_weights,
    run_schedule,
    save_loss_curves,
    start_run,
)

logger = logging.getLogger(__name__)

METHOD_DIR = "streaming"
CALIBRATION_MAX_SIDE = 1024  # our choice: BN statistics from crops of at most 1024 px


def streaming_dir(params: Params) -> Path:
    """``runs/<experiment>/streaming``: everything this trainer writes."""
    return params.run_dir / METHOD_DIR


# ----------------------------------------------------------------------------- one step


def train_minibatch(
    model: nn.Module,
    items: Sequence[Mapping[str, Any]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    *,
    device: torch.device,
    images_in_step: int,
    context: DistributedContext | None = None,
    mixed_precision: bool = False,
    channels_last: bool = False,
    where: str = "",
    stack: bool = False,
) -> list[tuple[str, float, float]]:
    """Accumulate the gradients of this rank's images of one mini-batch, then take one step.

    Every image's loss is divided by ``images_in_step`` (the mini-batch over all ranks) before its
    backward pass, so after the all-reduce the gradient is that of the mini-batch's mean loss,
    exactly what a single forward/backward over the whole mini-batch would give.

    Args:
        model: logits ``(1, 1)`` for an image ``(1, 3, H, W)``.
        items: ``{"image": (3, H, W) tensor, "label": scalar, "image_id": str}`` each.
        optimizer: stepped once, then its gradients are cleared.
        scaler: GradScaler (a pass-through unless mixed precision on CUDA).
        device: where the model is.
        images_in_step: images in this mini-batch summed over ranks.
        context: the distributed context (gradients are summed over ranks).
        mixed_precision: autocast the forward pass (CUDA only).
        channels_last: feed the image in channels_last memory format (CUDA only).
        where: "stage S epoch E", for error messages.
        stack: run all items in one forward/backward pass (images of one size, e.g. MIL
            patches); with frozen batch norm the gradient is the same as image by image.

    Returns:
        ``(image_id, loss, logit)`` per image of this rank.

    Raises:
        NonFiniteError: a loss (any rank) or, without a GradScaler, a gradient was NaN/inf; the
            step is not taken, and the message names the images.
    """
    context = context or DistributedContext()
    results: list[tuple[str, float, float]] = []
    bad: list[str] = []
    param = next(model.parameters())
    for group in [list(items)] if stack else [[item] for item in items]:
        image = torch.stack([item["image"].reshape(item["image"].shape[-3:]) for item in group])
        image = image.to(device, non_blocking=True)
        if use_channels_last(device, channels_last):
            image = image.contiguous(memory_format=torch.channels_last)
        labels = [float(item["label"]) for item in group]
        label = torch.tensor(labels, dtype=param.dtype, device=device)
        with autocast(device, mixed_precision):
            logit = model(image)
        logit = logit.reshape(len(group), -1)[:, 0].to(param.dtype)
        loss = nn.functional.binary_cross_entropy_with_logits(logit, label, reduction="none")
        values = loss.detach().tolist()
        image_ids = [str(item["image_id"]) for item in group]
        if not all(math.isfinite(value) for value in values):
            pairs = zip(image_ids, values, strict=True)
            bad.extend(f"{i} (loss {v})" for i, v in pairs if not math.isfinite(v))
            continue
        scaler.scale(loss.sum() / images_in_step).backward()
        results.extend(zip(image_ids, values, logit.detach().tolist(), strict=True))
    problems = [p for rank_bad in all_gather_objects(bad, context) for p in rank_bad]
    if problems:
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(
            f"{where}: non-finite loss for image(s) {', '.join(problems)}; step not taken, "
            "no checkpoint written"
        )
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    all_reduce_gradients(parameters, context)
    if not scaler.is_enabled():
        finite = all(bool(torch.isfinite(p.grad).all()) for p in parameters if p.grad is not None)
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            ids = ", ".join(image_id for image_id, _, _ in results)
            raise NonFiniteError(
                f"{where}: non-finite gradient in the mini-batch of image(s) {ids}; step not "
                "taken, no checkpoint written"
            )
    scaler.step(optimizer)  # with mixed precision, skipped (and the scale lowered) on inf grads
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return results


# ----------------------------------------------------------------------------- trainer


class StreamingTrainer:
    """Implements :class:`repro.schedule.MethodTrainer` for the streamed network.

    Args:
        model: a :class:`repro.models.StreamingResNet` (or any module with ``streamed``), on
            ``device``; its initial weights must be the same on every rank.
        train_data: items ``{"image", "label", "image_id"}``; ``set_epoch(e)`` (if present) seeds
            the augmentation of epoch ``e``.
        tune_data: the tuning set, without augmentation.
        sampler: ``set_epoch(e)`` then ``iter()`` gives this rank's training indices of epoch
            ``e`` (its share of every mini-batch in turn, e.g. ``BalancedSampler``).
        batch_size: images per optimiser step over all ranks (paper: 16).
        momentum: SGD momentum (paper: 0.9).
        device, context: where to run; ``batch_size`` must be a multiple of the world size.
        mixed_precision, channels_last: CUDA switches (``run.*``).
        num_workers: data-loading processes.
        seed: seeds the data loaders' own generators.
        progress: show tqdm bars (rank 0 only).
        freeze: ``freeze(model, stage)`` makes the parameters of ``stage`` trainable; default:
            stage 1 freezes ``model.streamed`` (``repro.models.freeze_streamed``), stage 2 trains
            everything.
        optimizer: "sgd" (paper: SGD with ``momentum``) or "adam" (our choice, CPU demos from
            random initialisation; default betas).
        epoch_images: train on only the first N images of each epoch's sampler list (rounded
            down to a multiple of the world size); None: all of them.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Any,
        tune_data: Any,
        sampler: Any,
        *,
        batch_size: int,
        momentum: float = 0.9,
        device: torch.device | None = None,
        context: DistributedContext | None = None,
        mixed_precision: bool = False,
        channels_last: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        progress: bool = True,
        freeze: Callable[[nn.Module, int], None] | None = None,
        optimizer: str = "sgd",
        epoch_images: int | None = None,
    ):
        self.context = context or DistributedContext()
        if batch_size % self.context.world_size:
            raise ValueError(
                f"train.batch_size={batch_size} must be a multiple of the number of processes "
                f"({self.context.world_size})"
            )
        self.model = model
        self.train_data, self.tune_data, self.sampler = train_data, tune_data, sampler
        self.batch_size, self.momentum = batch_size, momentum
        self.device = device or torch.device("cpu")
        self.mixed_precision, self.channels_last = mixed_precision, channels_last
        self.num_workers, self.seed, self.progress = num_workers, seed, progress
        self.freeze = freeze or _freeze_for_stage
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        self.optimizer_name, self.epoch_images = optimizer, epoch_images
        self.scaler = make_grad_scaler(self.device, mixed_precision)
        self.optimizer: torch.optim.Optimizer | None = None
        self.stage = 0
        self.last_tune_predictions: pd.DataFrame | None = None
        self.stack_items = False  # True: one forward/backward per mini-batch (see train_minibatch)
        self._shared: tuple[Any, KeySampler] | None = None

    # -- MethodTrainer

    def begin_stage(self, stage: int, lr: float) -> None:
        """Stage 1: streamed part frozen (no backward through it); stage 2: everything."""
        self.freeze(self.model, stage)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.optimizer_name == "adam":
            self.optimizer = torch.optim.Adam(trainable, lr=lr)
        else:
            self.optimizer = torch.optim.SGD(trainable, lr=lr, momentum=self.momentum)
        self.stage = stage
        logger.info(
            "stage %d: %d trainable tensors (%d weights), lr %g",
            stage,
            len(trainable),
            sum(p.numel() for p in trainable),
            lr,
        )

    def train_epoch(self, run: EpochRun) -> dict[str, float]:
        """One pass over this rank's share of the epoch, one optimiser step per mini-batch."""
        assert self.optimizer is not None, "begin_stage first"
        context = self.context
        for data in (self.train_data, self.sampler):
            if hasattr(data, "set_epoch"):
                data.set_epoch(run.global_epoch)
        indices = [int(i) for i in iter(self.sampler)]
        if self.epoch_images is not None:
            indices = indices[: max(1, self.epoch_images // context.world_size)]
        local_batch = self.batch_size // context.world_size
        steps = math.ceil(len(indices) / local_batch)
        # A mid-epoch resume point is kept in world-size-independent terms (optimiser steps
        # done, sums over all ranks), so a run may resume on another number of processes.
        resume = run.resume or {}
        position = min(int(resume.get("steps", 0)) * local_batch, len(indices))
        sums = {
            key: float(resume.get(key, 0.0)) if context.is_main else 0.0
            for key in ("loss_sum", "correct", "images")
        }
        seconds = float(resume.get("seconds", 0.0))
        self.model.train()
        loader = self._loader(self.train_data, indices[position:], run.global_epoch)
        bar = tqdm(
            total=len(indices) * context.world_size,
            initial=position * context.world_size,
            desc=f"stage {run.stage} epoch {run.epoch}",
            unit="img",
            disable=not (self.progress and context.is_main),
            leave=False,
        )
        started = time.perf_counter()
        iterator = iter(loader)
        for step in range(position // local_batch, steps):
            items = [next(iterator) for _ in range(min(local_batch, len(indices) - position))]
            images_in_step = int(all_reduce_sum(len(items), context))
            results = train_minibatch(
                self.model,
                items,
                self.optimizer,
                self.scaler,
                device=self.device,
                images_in_step=images_in_step,
                context=context,
                mixed_precision=self.mixed_precision,
                channels_last=self.channels_last,
                where=f"stage {run.stage} epoch {run.epoch} step {step + 1}",
                stack=self.stack_items,
            )
            position += len(items)
            for (_, loss, logit), item in zip(results, items, strict=True):
                sums["loss_sum"] += loss
                sums["correct"] += float((logit > 0) == bool(float(item["label"]) > 0.5))
                sums["images"] += 1
            bar.update(images_in_step)
            elapsed = seconds + time.perf_counter() - started
            bar.set_postfix(
                loss=f"{sums['loss_sum'] / max(sums['images'], 1):.4f}",
                img_per_h=f"{bar.n / max(elapsed, 1e-9) * 3600:.0f}",
            )

            def snapshot(elapsed: float = elapsed) -> dict[str, float]:
                totals = {key: all_reduce_sum(value, context) for key, value in sums.items()}
                return dict(totals, seconds=elapsed)  # the schedule adds "steps"

            run.step_done(step + 1, snapshot)
        bar.close()
        seconds += time.perf_counter() - started
        totals = {key: all_reduce_sum(value, context) for key, value in sums.items()}
        seconds = max(all_gather_objects(seconds, context))
        images = totals["images"]
        return {
            "train_loss": totals["loss_sum"] / max(images, 1),
            "train_accuracy": totals["correct"] / max(images, 1),
            "train_images": int(images),
            "seconds": seconds,
            "images_per_hour": images / max(seconds, 1e-9) * 3600,
        }

    def evaluate(self, run: EpochRun | None = None) -> dict[str, float]:
        """Tuning loss, accuracy (logit > 0) and AUC, streamed inference without augmentation."""
        frame = self.predict_dataset(self.tune_data, desc="tuning set")
        self.last_tune_predictions = frame
        return tuning_metrics(frame)

    def predict_dataset(self, data: Any, desc: str = "predict") -> pd.DataFrame:
        """``image_id, label, logit, score`` for every item of ``data`` (split over ranks)."""
        context = self.context
        indices = list(range(context.rank, len(data), context.world_size))
        rows = _predict_items(
            self.model,
            self._loader(data, indices, 0),
            device=self.device,
            mixed_precision=self.mixed_precision,
            channels_last=self.channels_last,
            total=len(indices),
            desc=desc,
            progress=self.progress and context.is_main,
        )
        gathered = [row for part in all_gather_objects(rows, context) for row in part]
        order = {index: n for n, index in enumerate(range(len(data)))}
        gathered.sort(key=lambda row: order[row.pop("index")])
        return pd.DataFrame(gathered, columns=["image_id", "label", "logit", "score"])

    def state_dict(self) -> dict[str, Any]:
        assert self.optimizer is not None
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.optimizer is not None
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    # -- helpers

    def _loader(self, data: Any, indices: Sequence[int], epoch: int):
        """An iterator over ``data[i]`` for ``i`` in ``indices``, augmented as in ``epoch``.

        The training and tuning sets share one DataLoader for the whole run: with worker
        processes they are started once ("spawn": pyvips and fork do not mix) and kept; the
        dataset and the epoch travel with each index. Other datasets get a loader of their own.
        """
        sets = [self.train_data, self.tune_data]
        if self._shared is None:
            self._shared = _make_loader(sets, self.num_workers, self.device, self.seed)
        which = next((n for n, known in enumerate(sets) if known is data), None)
        if which is None:
            loader, sampler = _make_loader([data], 0, self.device, self.seed)
            which = 0
        else:
            loader, sampler = self._shared
        sampler.keys = [(which, int(index), int(epoch)) for index in indices]
        return loader


def trainer_options(params: Params, section: Any) -> dict[str, Any]:
    """:class:`StreamingTrainer` keyword arguments from a method's params section (``train`` or
    ``mil``: batch size, momentum, optimiser) and from ``run`` (mixed precision, channels_last,
    data workers, seed)."""
    return {
        "batch_size": section.batch_size,
        "momentum": section.momentum,
        "optimizer": section.optimizer,
        "mixed_precision": params.run.mixed_precision,
        "channels_last": params.run.channels_last,
        "num_workers": params.run.num_workers,
        "seed": params.run.seed,
    }


def tuning_metrics(frame: pd.DataFrame) -> dict[str, float]:
    """``tune_loss`` (mean BCE), ``tune_accuracy`` (logit > 0) and ``tune_auc`` of predictions
    with columns ``label`` and ``logit`` (or ``score``, a probability)."""
    from sklearn.metrics import roc_auc_score

    if "logit" in frame:
        logits = torch.tensor(frame["logit"].to_numpy(), dtype=torch.float64)
    else:
        logits = torch.logit(torch.tensor(frame["score"].to_numpy(), dtype=torch.float64), 1e-15)
    labels = torch.tensor(frame["label"].to_numpy(), dtype=torch.float64)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, labels).item()
    accuracy = float(((logits > 0).double() == labels).double().mean())
    both = labels.min() != labels.max()
    auc = float(roc_auc_score(labels.numpy(), logits.numpy())) if both else float("nan")
    return {"tune_loss": loss, "tune_accuracy": accuracy, "tune_auc": auc}


class _Indexed(torch.utils.data.Dataset):
    """Items of several datasets keyed by ``(dataset, index, epoch)``: sets the augmentation
    epoch in whichever process loads the item, and adds ``index`` (to put rank-split predictions
    back in order)."""

    def __init__(self, datasets: Sequence[Any]):
        self.datasets = list(datasets)

    def __len__(self) -> int:
        return sum(len(data) for data in self.datasets)

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        which, index, epoch = key
        data = self.datasets[which]
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)
        return {**data[index], "index": index}


def _make_loader(
    datasets: Sequence[Any], num_workers: int, device: torch.device, seed: int
) -> tuple[torch.utils.data.DataLoader, KeySampler]:
    sampler = KeySampler()
    loader = persistent_loader(
        _Indexed(datasets),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        sampler=sampler,
        batch_size=None,
        generator=torch.Generator().manual_seed(seed),  # leaves the global RNG alone
    )
    return loader, sampler


def _freeze_for_stage(model: nn.Module, stage: int) -> None:
    from repro.models import freeze_streamed, unfreeze_streamed

    for param in model.parameters():
        param.requires_grad_(True)
    if stage == 1:
        freeze_streamed(model)
    else:
        unfreeze_streamed(model)


@torch.no_grad()
def _predict_items(
    model: nn.Module,
    items: Any,
    *,
    device: torch.device,
    mixed_precision: bool,
    channels_last: bool,
    total: int,
    desc: str,
    progress: bool,
) -> list[dict[str, Any]]:
    was_training = model.training
    model.eval()
    rows = []
    for item in tqdm(items, total=total, desc=desc, unit="img", disable=not progress, leave=False):
        image = item["image"]
        image = (image.unsqueeze(0) if image.dim() == 3 else image).to(device)
        if use_channels_last(device, channels_last):
            image = image.contiguous(memory_format=torch.channels_last)
        with autocast(device, mixed_precision):
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


# ----------------------------------------------------------------------------- wiring


def resolve_tile_size(params: Params, model: nn.Module | None = None) -> int:
    """``streaming.tile_size``, or planned from ``streaming.memory_budget_gb`` for the streamed
    part over one ``input_size`` image (stage 2: every weight trainable; uint8 input)."""
    budget = params.streaming.memory_budget_gb
    if budget is None:
        return params.streaming.tile_size
    from repro.streaming import plan_tile_size

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
    from repro.config import resolve_path
    from repro.models import build_streaming_resnet

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
    )


def _initial_model(params: Params, out: Path, context: DistributedContext) -> nn.Module:
    """Build the model, set the normalisation, calibrate batch norm (random init only).

    Saved as ``init.pt`` by rank 0 (atomically) and loaded by every rank, so a restart and every
    process start from the same weights without recomputing the statistics.
    """
    init_path = out / "init.pt"
    streaming = dataclasses.asdict(params.streaming)
    for key in ("tile_size", "memory_budget_gb"):  # tiling does not change the weights
        streaming.pop(key)
    made_with = {
        "streaming": streaming,
        "input_size": params.data.input_size,
        "train": {  # what changes the weights; the schedule checks lr, epochs and window
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
    seed_everything(params.run.seed)
    model = build_model(params)
    if context.is_main and not init_path.exists():
        from repro.data.splits import load_split
        from repro.data.stats import channel_stats

        train_rows = load_split(params, "train")
        mean, std = channel_stats(train_rows, params)
        model.normalize.set_stats(mean, std)
        info: dict[str, Any] = {
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "images": len(train_rows),
            "source": "repro.data.stats.channel_stats over the training split",
        }
        _write_json(out / "normalization.json", info)
        calibration = _calibrate(model, train_rows, params)
        _write_json(out / "batchnorm_calibration.json", calibration)
        state = {"model": model.state_dict(), "normalization": info, "made_with": made_with}
        save_checkpoint(state, init_path)
    barrier(context)
    state = load_checkpoint(init_path)
    if state.get("made_with") != made_with:
        raise CheckpointError(
            f"{init_path} was made with {state.get('made_with')}, not {made_with}; use the same "
            f"params to resume, or delete {out} to start over"
        )
    model.load_state_dict(state["model"])
    seed_everything(params.run.seed)
    return model


def _calibrate(model: nn.Module, rows: pd.DataFrame, params: Params) -> dict[str, Any]:
    """Batch-norm statistics from ``train.calibrate_batchnorm_images`` training images, when the
    network is randomly initialised (otherwise the ImageNet statistics stay, as in the paper)."""
    count = params.train.calibrate_batchnorm_images
    if params.streaming.weights is not None or count == 0:
        reason = (
            "pretrained weights: their batch-norm statistics are kept (paper)"
            if params.streaming.weights is not None
            else "train.calibrate_batchnorm_images is 0: batch norm keeps mean 0, variance 1"
        )
        return {"calibrated": False, "reason": reason}
    from repro.data.dataset import BiopsyDataset
    from repro.models import calibrate_batchnorm

    rng = np.random.default_rng(params.run.seed)
    chosen = rows.iloc[np.sort(rng.permutation(len(rows))[: min(count, len(rows))])]
    dataset = BiopsyDataset(chosen.reset_index(drop=True), params, augment=False)

    def images():
        for index in range(len(dataset)):
            image = dataset[index]["image"].float().div(255)
            side = min(CALIBRATION_MAX_SIDE, image.shape[-1], image.shape[-2])
            top = (image.shape[-2] - side) // 2
            left = (image.shape[-1] - side) // 2
            yield image[:, top : top + side, left : left + side].unsqueeze(0)

    calibrate_batchnorm(model, images())
    return {
        "calibrated": True,
        "reason": "random initialisation: frozen batch norm needs statistics of this data",
        "images": [str(i) for i in chosen["image_id"]],
        "crop": f"centre crop of at most {CALIBRATION_MAX_SIDE} px, no augmentation",
    }


def train_streaming(
    params: Params,
    *,
    progress: bool = True,
    context: DistributedContext | None = None,
) -> ScheduleResult:
    """Train (or resume) the streaming model of ``params`` and write its run directory.

    Writes ``runs/<experiment>/streaming/``: ``params.yaml`` (resolved), ``normalization.json``,
    ``batchnorm_calibration.json``, ``init.pt``, ``checkpoints/``, ``metrics.csv``,
    ``selection.json``, ``final.pt`` (averaged weights), ``predictions_tune.csv`` and
    ``loss_curves.png``. Running it again with the same params resumes where it stopped.
    """
    from repro.data.dataset import BiopsyDataset
    from repro.data.splits import load_split

    out = streaming_dir(params)
    context, device = start_run(params, out, context)

    model = _initial_model(params, out, context).to(device)
    if use_channels_last(device, params.run.channels_last):
        model = model.to(memory_format=torch.channels_last)
    broadcast_parameters(model, context)

    train_rows = load_split(params, "train").reset_index(drop=True)
    tune_rows = load_split(params, "tune").reset_index(drop=True)
    train_data = BiopsyDataset(train_rows, params, augment=params.augmentation.enabled)
    tune_data = BiopsyDataset(tune_rows, params, augment=False)
    labels = train_rows["label"].astype(int).tolist()
    sampler = BalancedSampler(
        labels,
        seed=params.run.seed,
        num_replicas=context.world_size,
        rank=context.rank,
        oversample=params.train.oversample_negatives,
    )
    trainer = StreamingTrainer(
        model,
        train_data,
        tune_data,
        sampler,
        device=device,
        context=context,
        progress=progress,
        epoch_images=params.train.epoch_images,
        **trainer_options(params, params.train),
    )
    metadata = {
        "method": METHOD_DIR,
        "arch": params.streaming.arch,
        "stream_until": params.streaming.stream_until,
        "head_pool": params.streaming.head_pool,
        "tile_size": int(model.streamed.tile_size[0]),
        "input_size": params.data.input_size,
    }
    result = run_schedule(
        trainer,
        ScheduleSettings.from_settings(params.train),
        out,
        context=context,
        metadata=metadata,
    )
    frame = trainer.predict_dataset(tune_data, desc="tuning set, final weights")
    if context.is_main:
        predictions = frame[["image_id", "label", "score"]].to_csv(index=False)
        write_text_atomic(out / "predictions_tune.csv", predictions)
        import matplotlib.pyplot as plt

        plt.close(save_loss_curves(out))
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
    return load_final_weights(build_model(params, weights=None), streaming_dir(params), device)


def predict(
    model: nn.Module, rows: pd.DataFrame, params: Params, *, progress: bool = True
) -> pd.DataFrame:
    """Streamed inference without augmentation: ``DataFrame(image_id, label, score)`` with
    ``score = sigmoid(logit)``, in the order of ``rows``."""
    from repro.data.dataset import BiopsyDataset

    rows = rows.reset_index(drop=True)
    dataset = BiopsyDataset(rows, params, augment=False)
    device = next(model.parameters()).device
    loader, sampler = _make_loader([dataset], params.run.num_workers, device, params.run.seed)
    sampler.keys = [(0, index, 0) for index in range(len(dataset))]
    predictions = _predict_items(
        model,
        loader,
        device=device,
        mixed_precision=params.run.mixed_precision,
        channels_last=params.run.channels_last,
        total=len(dataset),
        desc="predict",
        progress=progress,
    )
    frame = pd.DataFrame(predictions)
    return frame[["image_id", "label", "score"]] if len(frame) else _empty_predictions()


def _empty_predictions() -> pd.DataFrame:
    return pd.DataFrame({"image_id": [], "label": [], "score": []})


def _write_json(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m repro.train params/X.yaml``, also under ``torchrun --nproc_per_node N``."""
    return command_line("repro.train", train_streaming, argv)


if __name__ == "__main__":
    raise SystemExit(main())

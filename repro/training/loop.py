"""The training loop both methods share: accumulated mini-batches, one optimiser step each.

:class:`Trainer` implements :class:`repro.training.schedule.MethodTrainer` for any model and any
:class:`EpochData`, the method's side: which items an epoch trains on (whole biopsies for
streaming; the top-1 patch of every biopsy for MIL, chosen by an inference phase at the start of
the epoch) and how the tuning set is scored. The loop knows neither method.

One optimiser step takes ``batch_size`` items over all ranks (paper: 16). Each rank accumulates
the gradients of its share, one item at a time (or, with :attr:`EpochData.stack`, all in one
forward/backward), every loss divided by the mini-batch size; the accumulated gradients are summed
over ranks before the step, as in the authors' code.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm.auto import tqdm

from repro.exceptions import NonFiniteError
from repro.training.runtime import (
    DistributedContext,
    Runtime,
    all_gather_objects,
    all_reduce_gradients,
    all_reduce_sum,
    autocast,
    make_grad_scaler,
)
from repro.training.schedule import EpochRun

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")


class EpochData(Protocol):
    """The method's side of the loop."""

    stack: bool
    """True: one forward/backward per mini-batch (items of one size, e.g. patches); with frozen
    batch norm the gradient is the same as item by item."""

    def epoch_indices(self, model: nn.Module, epoch: int) -> tuple[list[int], dict[str, float]]:
        """This rank's item indices of ``epoch`` in training order (its share of every mini-batch
        in turn), and metrics of any work done to choose them (MIL's inference phase)."""

    def items(self, indices: Sequence[int], epoch: int) -> Iterable[Mapping[str, Any]]:
        """``{"image", "label", "image_id"}`` for each index, augmented as in ``epoch``."""

    def tune_predictions(self, model: nn.Module) -> pd.DataFrame:
        """``image_id, label, logit`` of every tuning biopsy (gathered over ranks)."""


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
        stack: run all items in one forward/backward pass (see :attr:`EpochData.stack`).

    Returns:
        ``(image_id, loss, logit)`` per image of this rank.

    Raises:
        NonFiniteError: a loss (any rank) or, without a GradScaler, a gradient was NaN/inf; the
            step is not taken, and the message names the images.
    """
    runtime = Runtime(device, context or DistributedContext(), mixed_precision, channels_last)
    results: list[tuple[str, float, float]] = []
    bad: list[str] = []
    param = next(model.parameters())
    for group in [list(items)] if stack else [[item] for item in items]:
        image = runtime.batch([item["image"].reshape(item["image"].shape[-3:]) for item in group])
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
    problems = [p for rank_bad in all_gather_objects(bad, runtime.context) for p in rank_bad]
    if problems:
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(
            f"{where}: non-finite loss for image(s) {', '.join(problems)}; step not taken, "
            "no checkpoint written"
        )
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    all_reduce_gradients(parameters, runtime.context)
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


def tuning_metrics(frame: pd.DataFrame) -> dict[str, float]:
    """``tune_loss`` (mean BCE), ``tune_accuracy`` (logit > 0) and ``tune_auc`` of predictions
    with columns ``label`` and ``logit`` (or ``score``, a probability)."""
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


def train_all(model: nn.Module, stage: int) -> None:
    """The freeze policy that trains every parameter in both stages."""
    for param in model.parameters():
        param.requires_grad_(True)


class Trainer:
    """Implements :class:`repro.training.schedule.MethodTrainer` for ``model`` on ``data``.

    Args:
        model: on ``runtime.device``; its initial weights must be the same on every rank.
        data: the method's epochs and tuning set (:class:`EpochData`).
        batch_size: items per optimiser step over all ranks (paper: 16); a multiple of the world
            size.
        momentum: SGD momentum (paper: 0.9).
        optimizer: "sgd" (paper) or "adam" (our choice for CPU demos from random initialisation;
            default betas).
        freeze: ``freeze(model, stage)`` makes the parameters of ``stage`` trainable.
        runtime: device, process group and CUDA switches.
        epoch_images: train on only the first N items of each epoch (rounded down to a multiple
            of the world size); None: all of them.
    """

    def __init__(
        self,
        model: nn.Module,
        data: EpochData,
        *,
        batch_size: int,
        momentum: float = 0.9,
        optimizer: str = "sgd",
        freeze: Callable[[nn.Module, int], None] = train_all,
        runtime: Runtime | None = None,
        epoch_images: int | None = None,
    ):
        self.runtime = runtime or Runtime()
        world = self.runtime.context.world_size
        if batch_size % world:
            raise ValueError(
                f"batch_size={batch_size} must be a multiple of the number of processes ({world})"
            )
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.model, self.data = model, data
        self.batch_size, self.momentum, self.optimizer_name = batch_size, momentum, optimizer
        self.freeze, self.epoch_images = freeze, epoch_images
        self.scaler = make_grad_scaler(self.runtime.device, self.runtime.mixed_precision)
        self.optimizer: torch.optim.Optimizer | None = None
        self.last_tune_predictions: pd.DataFrame | None = None

    def begin_stage(self, stage: int, lr: float) -> None:
        """Apply the stage's freeze policy and build a fresh optimiser at ``lr``."""
        self.freeze(self.model, stage)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.optimizer_name == "adam":
            self.optimizer = torch.optim.Adam(trainable, lr=lr)
        else:
            self.optimizer = torch.optim.SGD(trainable, lr=lr, momentum=self.momentum)
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
        context = self.runtime.context
        indices, extra = self.data.epoch_indices(self.model, run.global_epoch)
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
        iterator = iter(self.data.items(indices[position:], run.global_epoch))
        bar = tqdm(
            total=len(indices) * context.world_size,
            initial=position * context.world_size,
            desc=f"stage {run.stage} epoch {run.epoch}",
            unit="img",
            disable=not (self.runtime.progress and context.is_main),
            leave=False,
        )
        started = time.perf_counter()
        for step in range(position // local_batch, steps):
            items = [next(iterator) for _ in range(min(local_batch, len(indices) - position))]
            images_in_step = int(all_reduce_sum(len(items), context))
            results = train_minibatch(
                self.model,
                items,
                self.optimizer,
                self.scaler,
                device=self.runtime.device,
                images_in_step=images_in_step,
                context=context,
                mixed_precision=self.runtime.mixed_precision,
                channels_last=self.runtime.channels_last,
                where=f"stage {run.stage} epoch {run.epoch} step {step + 1}",
                stack=self.data.stack,
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
            **extra,
        }

    def evaluate(self, run: EpochRun | None = None) -> dict[str, float]:
        """Tuning loss, accuracy (logit > 0) and AUC of the method's tuning predictions."""
        frame = self.data.tune_predictions(self.model)
        self.last_tune_predictions = frame
        return tuning_metrics(frame)

    def state_dict(self) -> dict[str, Any]:
        assert self.optimizer is not None
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.optimizer is not None
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

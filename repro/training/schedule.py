"""The paper's two-stage training schedule, shared by the streaming model and the MIL baseline.

Paper IV-A (streaming) and IV-B (MIL):

1. **Stage 1**: train with part of the network frozen (streaming: conv1..layer3) at ``lr`` for
   ``epochs`` epochs, evaluating the tuning loss after every epoch.
2. **Pick**: the moving average of the tuning loss over ``window`` epochs; the window with the
   lowest average; its middle checkpoint starts stage 2.
3. **Stage 2**: the whole network at ``stage2_lr`` for ``stage2_epochs`` epochs (a fresh optimiser).
4. **Average**: the inference weights are the mean of the weights of the checkpoints in stage 2's
   best window (``final.pt``).

What differs between methods (how an epoch trains, what is frozen, how the tuning set is scored)
lives in an object implementing :class:`MethodTrainer`; :func:`run_schedule` does the rest:
one checkpoint per epoch (atomic, in ``checkpoints/``), ``metrics.csv``, ``selection.json``,
``final.pt``, and resuming. A run killed at any moment and started again with the same command
continues from the last complete checkpoint (or from ``checkpoints/last.pt``, written every
``checkpoint_every`` optimiser steps inside an epoch when the method supports it) and ends with
the same weights as an uninterrupted run, provided the method is deterministic given its
checkpointed state and the epoch number (seeded sampler and augmentation, no global RNG use that
is not restored).

:func:`repro.reporting.curves.plot_loss_curves` draws the curves with the picked windows marked.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from repro.config import Params, format_params
from repro.exceptions import NonFiniteError
from repro.io.atomic import remove_stale_temporaries, write_text_atomic
from repro.io.checkpoints import (
    CheckpointError,
    load_checkpoint,
    nonfinite_tensors,
    save_checkpoint,
)
from repro.layout import MethodLayout
from repro.training.runtime import (
    DistributedContext,
    barrier,
    get_rng_state,
    init_distributed,
    select_device,
    set_rng_state,
    set_torch_threads,
)
from repro.training.selection import average_state_dicts, select_window

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class ScheduleSettings:
    """The schedule's numbers; :meth:`from_settings` reads them from ``TrainSettings`` or
    ``MILSettings`` (same field names)."""

    lr: float
    epochs: int
    stage2_lr: float
    stage2_epochs: int
    window: int
    checkpoint_every: int = 0  # mid-epoch last.pt every N optimiser steps; 0 = epoch ends only

    @classmethod
    def from_settings(cls, settings: Any) -> ScheduleSettings:
        """From a params section with ``lr, epochs, stage2_lr, stage2_epochs, window`` (and
        optionally ``checkpoint_every``)."""
        return cls(
            lr=settings.lr,
            epochs=settings.epochs,
            stage2_lr=settings.stage2_lr,
            stage2_epochs=settings.stage2_epochs,
            window=settings.window,
            checkpoint_every=getattr(settings, "checkpoint_every", 0),
        )

    def stages(self) -> list[tuple[int, float, int]]:
        """``(stage, lr, epochs)`` for stage 1 and 2."""
        return [(1, self.lr, self.epochs), (2, self.stage2_lr, self.stage2_epochs)]

    def trajectory(self) -> dict[str, Any]:
        """The values a resumed run must share with the run that wrote the checkpoints."""
        values = dataclasses.asdict(self)
        values.pop("checkpoint_every")
        return values


@dataclass
class EpochRun:
    """What a :class:`MethodTrainer` gets for one epoch.

    Attributes:
        stage: 1 or 2.
        epoch: 1-based epoch within the stage.
        global_epoch: 1-based epoch counted over both stages (seed augmentation and sampling with
            it, so stage 2 does not repeat stage 1's epochs).
        lr: the stage's learning rate.
        resume: the method's own state passed to :meth:`step_done` when ``last.pt`` was written
            mid-epoch, to continue from; ``None`` to start the epoch from its beginning.
    """

    stage: int
    epoch: int
    global_epoch: int
    lr: float
    resume: dict[str, Any] | None = None
    _on_step: Callable[[int, Callable[[], dict[str, Any]]], None] | None = field(
        default=None, repr=False
    )

    def step_done(self, steps: int, state: Callable[[], dict[str, Any]]) -> None:
        """Call after every optimiser step with the number of steps done in this epoch and a
        function returning the method's state to resume from (position in the epoch, running
        sums: tensors and plain values). The schedule writes ``last.pt`` every
        ``checkpoint_every`` steps (every rank must call this; rank 0 writes)."""
        if self._on_step is not None:
            self._on_step(steps, state)


class MethodTrainer(Protocol):
    """The per-method part of the schedule (streaming trainer, MIL trainer)."""

    model: torch.nn.Module
    """The weights the schedule checkpoints, picks and averages (``model.state_dict()``)."""

    def begin_stage(self, stage: int, lr: float) -> None:
        """Freeze/unfreeze for ``stage`` and build a fresh optimiser at ``lr``."""

    def train_epoch(self, run: EpochRun) -> dict[str, float]:
        """Train one epoch; returns training metrics (e.g. ``train_loss``, ``images``)."""

    def evaluate(self, run: EpochRun) -> dict[str, float]:
        """Score the tuning set; returns metrics that include ``tune_loss``."""

    def state_dict(self) -> dict[str, Any]:
        """Everything but the model needed to continue (optimiser, GradScaler, ...)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (called after :meth:`begin_stage` of the same stage)."""


@dataclass
class ScheduleResult:
    """What :func:`run_schedule` produced."""

    final_path: Path
    selection: dict[str, Any]
    history: list[dict[str, Any]]


def run_schedule(
    trainer: MethodTrainer,
    settings: ScheduleSettings,
    out_dir: str | os.PathLike[str],
    *,
    context: DistributedContext | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> ScheduleResult:
    """Run (or resume) both stages and write the run directory.

    Args:
        trainer: the method's part (see :class:`MethodTrainer`); its ``model`` must hold the
            initial weights (deterministic for a given seed, so a restart before the first
            checkpoint starts from the same place).
        settings: learning rates, epochs, window, mid-epoch checkpoint cadence.
        out_dir: the method's run directory (e.g. ``runs/<experiment>/streaming``).
        context: the distributed context; rank 0 writes files, every rank runs the schedule.
        metadata: plain values stored in every checkpoint and in ``final.pt`` (e.g. the
            architecture and normalisation that :func:`load_checkpoint` readers need).

    Returns:
        The final weights' path, the selection (also in ``selection.json``) and the metrics rows.
        On return ``trainer.model`` holds the averaged weights.

    Raises:
        NonFiniteError: a weight became NaN/inf (nothing is saved for that epoch).
        CheckpointError: the checkpoints in ``out_dir`` were written with other settings.
    """
    context = context or DistributedContext()
    files = MethodLayout(Path(out_dir))
    checkpoints = files.checkpoints
    if context.is_main:
        checkpoints.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(checkpoints)
    barrier(context)
    metadata = dict(metadata or {})

    resume, partial = _resume_points(files, settings)
    history: list[dict[str, Any]] = list(resume["history"]) if resume else []
    resume_stage = resume["stage"] if resume else 0
    selection: dict[str, Any] = {"window": settings.window, "stages": {}}
    global_epoch = 0

    def save(path: Path, kind: str, stage: int, epoch: int, extra: Mapping[str, Any]) -> None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "kind": kind,
            "stage": stage,
            "epoch": epoch,
            "settings": settings.trajectory(),
            "metadata": metadata,
            "model": trainer.model.state_dict(),
            "trainer": trainer.state_dict(),
            "rng": get_rng_state(),
            "history": history,
            **extra,
        }
        if context.is_main:
            save_checkpoint(state, path)

    for stage, lr, epochs in settings.stages():
        if stage == 2:
            selection["stages"]["1"] = _start_stage_two(trainer, history, settings, files)
        if stage < resume_stage:
            global_epoch += epochs
            continue
        trainer.begin_stage(stage, lr)
        first_epoch = 1
        if resume and stage == resume_stage:
            _restore(trainer, resume)
            first_epoch = resume["epoch"] + 1
            global_epoch += resume["epoch"]
            logger.info("resumed from stage %d epoch %d", stage, resume["epoch"])
        for epoch in range(first_epoch, epochs + 1):
            global_epoch += 1
            run = EpochRun(stage, epoch, global_epoch, lr)
            if partial and (partial["stage"], partial["epoch"]) == (stage, epoch):
                _restore(trainer, partial)
                history[:] = partial["history"]
                run.resume = partial["partial"]
                logger.info("resumed inside stage %d epoch %d", stage, epoch)
            partial = None

            def on_step(steps: int, state: Callable[[], dict], run: EpochRun = run) -> None:
                every = settings.checkpoint_every
                if every > 0 and steps % every == 0:
                    save(files.last_checkpoint, "partial", run.stage, run.epoch,
                         {"partial": {"steps": steps, **state()}})  # fmt: skip
                    barrier(context)

            run._on_step = on_step
            train_metrics = trainer.train_epoch(run)
            tune_metrics = trainer.evaluate(run)
            if "tune_loss" not in tune_metrics:
                raise KeyError("MethodTrainer.evaluate must return a 'tune_loss'")
            bad = nonfinite_tensors(trainer.model.state_dict())
            if bad:
                raise NonFiniteError(
                    f"stage {stage} epoch {epoch}: non-finite weights in {bad[:5]}; "
                    "no checkpoint written"
                )
            row = {"stage": stage, "epoch": epoch, "global_epoch": global_epoch, "lr": lr}
            history.append({**row, **_plain(train_metrics), **_plain(tune_metrics)})
            save(files.checkpoint(stage, epoch), "epoch", stage, epoch, {})
            if context.is_main:
                write_metrics(history, files.metrics)
                files.last_checkpoint.unlink(missing_ok=True)
            barrier(context)
            logger.info("stage %d epoch %d: %s", stage, epoch, _summary(history[-1]))

    if settings.stage2_epochs > 0:
        final_stage, final_epochs = 2, settings.stage2_epochs
    else:
        final_stage, final_epochs = 1, settings.epochs
    if final_epochs == 0:
        raise ValueError("the schedule has no epochs: set epochs or stage2_epochs > 0")
    final_selection = select_window(history, final_stage, settings.window, files.root)
    final_selection["averaged_checkpoints"] = [
        _relative(files.checkpoint(final_stage, e), files.root) for e in final_selection["epochs"]
    ]
    final_selection["reason"] = (
        f"inference weights: mean of the weights of the {len(final_selection['epochs'])} "
        f"stage-{final_stage} checkpoints in the window with the lowest moving-average tuning loss"
    )
    selection["stages"][str(final_stage)] = {**selection["stages"].get(str(final_stage), {})}
    selection["stages"][str(final_stage)].update(final_selection)
    selection["final"] = {"stage": final_stage, "epochs": final_selection["epochs"]}
    averaged = average_state_dicts(
        [files.checkpoint(final_stage, e) for e in final_selection["epochs"]]
    )
    trainer.model.load_state_dict(averaged)
    final_path = files.final
    if context.is_main:
        final = {
            "format": CHECKPOINT_FORMAT,
            "model": averaged,
            "metadata": metadata,
            "selection": selection,
        }
        save_checkpoint(final, final_path)
        write_text_atomic(files.selection, json.dumps(selection, indent=2) + "\n")
        write_metrics(history, files.metrics)
    barrier(context)
    return ScheduleResult(final_path, selection, history)


def load_final_weights(
    model: torch.nn.Module, out_dir: str | os.PathLike[str], device: str | torch.device
) -> torch.nn.Module:
    """A finished run's inference weights (``final.pt``: the averaged window) loaded
    into ``model``, which is moved to ``device`` and put in eval mode.

    Raises:
        CheckpointError: there is no ``final.pt`` (the run has not finished).
    """
    model.load_state_dict(load_checkpoint(MethodLayout(Path(out_dir)).final)["model"])
    return model.to(device).eval()


def write_metrics(history: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """``metrics.csv``: one row per epoch (columns: the union of the rows' keys), atomically."""
    columns: list[str] = []
    for row in history:
        columns.extend(key for key in row if key not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(path, buffer.getvalue())


def describe_selection(selection: Mapping[str, Any]) -> str:
    """``selection.json`` in a few lines of text (for notebooks and logs)."""
    lines = []
    for stage, chosen in selection.get("stages", {}).items():
        if not chosen.get("epochs"):
            lines.append(f"stage {stage}: {chosen.get('reason', 'no epochs')}")
            continue
        epochs = chosen["epochs"]
        lines.append(
            f"stage {stage}: epochs {epochs[0]}-{epochs[-1]}, mean tuning loss "
            f"{chosen['mean_tune_loss']:.4f} ({chosen['criterion']})"
        )
        lines.append(f"  {chosen['reason']}")
        if "note" in chosen:
            lines.append(f"  note: {chosen['note']}")
    return "\n".join(lines)


def start_run(
    params: Params, out: Path, context: DistributedContext | None = None
) -> tuple[DistributedContext, torch.device]:
    """Torch threads, the process group (``context`` or a new one) and this rank's device of a
    training run writing to ``out``; the main process writes the resolved ``out/params.yaml``."""
    set_torch_threads(params.run.torch_threads)
    context = context or init_distributed(params.run.device)
    device = select_device(params.run.device, context.local_rank)
    if context.is_main:
        write_text_atomic(MethodLayout(out).params, format_params(params))
    barrier(context)
    return context, device


# --------------------------------------------------------------------------------- helpers


def _resume_points(
    files: MethodLayout, settings: ScheduleSettings
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The newest complete epoch checkpoint and a later mid-epoch ``last.pt``, if any."""
    found = files.epoch_checkpoints()
    resume = None
    if found:
        *_, path = max(found)
        resume = load_checkpoint(path)
        _check_settings(resume, settings, path)
    partial = None
    last = files.last_checkpoint
    if last.exists():
        candidate = load_checkpoint(last)
        _check_settings(candidate, settings, last)
        done = (resume["stage"], resume["epoch"]) if resume else (1, 0)
        if (candidate["stage"], candidate["epoch"]) > done:
            partial = candidate
    return resume, partial


def _check_settings(state: Mapping[str, Any], settings: ScheduleSettings, path: Path) -> None:
    saved = state.get("settings")
    if state.get("format") != CHECKPOINT_FORMAT or saved != settings.trajectory():
        raise CheckpointError(
            f"{path} was written with schedule settings {saved}, not {settings.trajectory()}; "
            f"use the same params to resume, or delete {path.parent.parent} to start over"
        )


def _restore(trainer: MethodTrainer, state: Mapping[str, Any]) -> None:
    trainer.model.load_state_dict(state["model"])
    trainer.load_state_dict(state["trainer"])
    set_rng_state(state["rng"])


def _start_stage_two(
    trainer: MethodTrainer,
    history: list[dict[str, Any]],
    settings: ScheduleSettings,
    files: MethodLayout,
) -> dict[str, Any]:
    """Pick stage 1's window, load its middle checkpoint into the model; the selection record."""
    if settings.epochs == 0:
        return {"epochs": [], "reason": "stage 1 has no epochs: stage 2 starts from the start"}
    chosen = select_window(history, 1, settings.window, files.root)
    middle = chosen["middle_epoch"]
    path = files.checkpoint(1, middle)
    trainer.model.load_state_dict(load_checkpoint(path)["model"])
    chosen["checkpoint"] = _relative(path, files.root)
    chosen["reason"] = (
        f"stage 2 starts from the middle checkpoint (epoch {middle}) of the "
        f"{len(chosen['epochs'])}-epoch window of stage 1 with the lowest mean tuning loss"
    )
    return chosen


def _plain(metrics: Mapping[str, Any]) -> dict[str, Any]:
    plain: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor | np.generic):
            value = value.item()
        plain[key] = value
    return plain


def _summary(row: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
        for key, value in row.items()
    )


def _relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root))

"""Which checkpoints count: the moving-average window pick and weight averaging (paper IV-A).

"We calculated a moving average over five epochs. From these averages, we picked the window with
the lowest loss, taking the middle checkpoint of the averaging window" (start of stage 2), and "we
choose the checkpoints based on a moving average of five epochs with the lowest tuning set loss. We
averaged the weights of these checkpoints" (inference weights; after Izmailov et al., stochastic
weight averaging). Shared by both methods through :mod:`repro.training.schedule`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repro.exceptions import CheckpointError
from repro.io.atomic import PathLike
from repro.io.checkpoints import load_checkpoint


def moving_averages(losses: Sequence[float], window: int) -> np.ndarray:
    """Mean of every run of ``window`` consecutive losses: ``len(losses) - window + 1`` values.

    A non-finite loss (NaN, inf) makes its windows' averages ``inf``, so they are never picked
    while a finite window exists.
    """
    values = np.asarray(losses, dtype=np.float64)
    _check_window(values, window)
    values = np.where(np.isfinite(values), values, np.inf)
    return np.array([values[i : i + window].mean() for i in range(len(values) - window + 1)])


def moving_average_window(losses: Sequence[float], window: int) -> tuple[int, int, int]:
    """The window of ``window`` consecutive epochs with the lowest mean loss (paper IV-A).

    Args:
        losses: tuning loss per epoch, in epoch order.
        window: number of epochs averaged (paper: 5).

    Returns:
        ``(start, end, middle)`` as 0-based positions in ``losses``: the window is
        ``losses[start:end]`` (``end - start == window``) and ``middle = start + (window - 1) // 2``
        (for an even window, the earlier of the two middle epochs). Ties go to the earliest window.

    Raises:
        ValueError: ``window < 1`` or more than ``len(losses)``.
    """
    averages = moving_averages(losses, window)
    start = int(np.argmin(averages))
    return start, start + window, start + (window - 1) // 2


def average_state_dicts(
    sources: Sequence[PathLike | Mapping[str, torch.Tensor]], key: str | None = "model"
) -> dict[str, torch.Tensor]:
    """Element-wise mean of several models' weights (paper IV-A: the inference weights).

    Args:
        sources: checkpoint paths (the state dict is read from ``checkpoint[key]``, or the file is
            taken as a state dict itself when it has no ``key``) or state dicts.
        key: where the model's state dict sits in a checkpoint file.

    Returns:
        A state dict with the same keys, dtypes and devices as the first source. Floating-point
        tensors are averaged in float64 and cast back; integer tensors (e.g. batch norm's
        ``num_batches_tracked``) must agree, and are copied.

    Raises:
        ValueError: no sources, or the state dicts differ in keys, shapes or integer values.
    """
    if not sources:
        raise ValueError("average_state_dicts needs at least one state dict, got none")
    state_dicts = [_as_state_dict(source, key) for source in sources]
    first = state_dicts[0]
    for index, other in enumerate(state_dicts[1:], start=1):
        if other.keys() != first.keys():
            difference = sorted(set(first) ^ set(other))
            raise ValueError(f"state dict {index} has different keys than the first: {difference}")
    averaged: dict[str, torch.Tensor] = {}
    for name, reference in first.items():
        tensors = [state[name] for state in state_dicts]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(f"{name}: shapes differ between state dicts: {sorted(shapes)}")
        if reference.is_floating_point() or reference.is_complex():
            total = torch.zeros_like(reference, dtype=torch.float64)
            for tensor in tensors:
                total += tensor.to(device=reference.device, dtype=torch.float64)
            averaged[name] = (total / len(tensors)).to(reference.dtype)
        else:
            if any(not torch.equal(t.cpu(), reference.cpu()) for t in tensors[1:]):
                raise ValueError(f"{name}: integer tensor differs between state dicts")
            averaged[name] = reference.clone()
    return averaged


def select_window(
    history: list[dict[str, Any]], stage: int, window: int, out: Path
) -> dict[str, Any]:
    """The ``window``-epoch window of ``stage`` with the lowest mean tuning loss in ``history``
    (rows with ``stage``, ``epoch``, ``tune_loss``), as the record ``selection.json`` keeps.

    A stage with fewer epochs than ``window`` uses all of them (and says so in ``note``).
    """
    rows = [row for row in history if row["stage"] == stage]
    epochs = [int(row["epoch"]) for row in rows]
    losses = [float(row["tune_loss"]) for row in rows]
    if not rows:
        raise CheckpointError(f"{out}: no stage-{stage} epochs in the history to select from")
    used = min(window, len(losses))
    start, end, middle = moving_average_window(losses, used)
    averages = moving_averages(losses, used)
    record: dict[str, Any] = {
        "criterion": f"lowest {used}-epoch moving average of the tuning loss",
        "window": used,
        "epochs": epochs[start:end],
        "middle_epoch": epochs[middle],
        "mean_tune_loss": float(averages[start]),
        "tune_losses": losses,
        "moving_averages": {str(epochs[i + used - 1]): float(a) for i, a in enumerate(averages)},
    }
    if used < window:
        record["note"] = f"only {len(losses)} epochs: window shortened from {window} to {used}"
    return record


def _as_state_dict(source: PathLike | Mapping[str, Any], key: str | None) -> Mapping[str, Any]:
    state = source if isinstance(source, Mapping) else load_checkpoint(source)
    if key is not None and key in state and isinstance(state[key], Mapping):
        state = state[key]
    return state


def _check_window(values: np.ndarray, window: int) -> None:
    if not isinstance(window, int | np.integer) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    if window > len(values):
        raise ValueError(f"window={window} is longer than the {len(values)} losses given")

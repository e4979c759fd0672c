"""Loss curves of a training run (notebooks 03 and 04): training and tuning loss per epoch over
both stages, the moving average the schedule picks from, and the picked windows shaded."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from repro.io.atomic import atomic_path
from repro.layout import MethodLayout
from repro.training.selection import moving_averages


def plot_loss_curves(
    metrics: Any,
    selection: Mapping[str, Any] | None = None,
    ax: Any = None,
    title: str | None = None,
) -> Figure:
    """Training and tuning loss per epoch over both stages, with the picked windows marked.

    Args:
        metrics: ``metrics.csv`` rows (a DataFrame, a list of dicts or the file's path).
        selection: ``selection.json`` content (or its path); stage 1's window and its middle
            checkpoint, and stage 2's averaged window, are shaded.
        ax: a matplotlib Axes to draw on (a new figure when ``None``).
        title: the axes' title.

    Returns:
        The matplotlib Figure.
    """
    if isinstance(metrics, str | os.PathLike):
        metrics = pd.read_csv(metrics)
    frame = pd.DataFrame(metrics)
    if isinstance(selection, str | os.PathLike):
        selection = json.loads(Path(selection).read_text())
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4))
    x = frame["global_epoch"]
    if "train_loss" in frame:
        ax.plot(x, frame["train_loss"], "o-", ms=3, label="training loss", color="tab:blue")
    ax.plot(x, frame["tune_loss"], "o-", ms=3, label="tuning loss", color="tab:orange")
    window = int((selection or {}).get("window", 1))
    for stage, rows in frame.groupby("stage"):
        if window > 1 and len(rows) >= window:
            averages = moving_averages(rows["tune_loss"].tolist(), window)
            ends = rows["global_epoch"].to_numpy()[window - 1 :]
            label = f"tuning loss, {window}-epoch moving average" if stage == 1 else None
            ax.plot(ends, averages, "--", color="tab:red", lw=1, label=label)
    boundary = frame.loc[frame["stage"] == 2, "global_epoch"]
    if len(boundary) and (frame["stage"] == 1).any():
        ax.axvline(boundary.min() - 0.5, color="grey", lw=1, ls=":")
    colours = {"1": "tab:green", "2": "tab:purple"}
    for stage, chosen in (selection or {}).get("stages", {}).items():
        rows = frame[frame["stage"] == int(stage)]
        offset = rows["global_epoch"].min() - rows["epoch"].min()
        if not chosen.get("epochs"):
            continue
        first, last = min(chosen["epochs"]), max(chosen["epochs"])
        span = f"epoch {first}" if first == last else f"epochs {first}-{last}"
        what = "averaged" if "averaged_checkpoints" in chosen else "picked window"
        ax.axvspan(first + offset - 0.4, last + offset + 0.4, color=colours.get(stage, "grey"),
                   alpha=0.15, label=f"stage {stage}: {what} ({span})")  # fmt: skip
        if "middle_epoch" in chosen and stage == "1":
            middle = chosen["middle_epoch"] + offset
            loss = rows.loc[rows["epoch"] == chosen["middle_epoch"], "tune_loss"]
            ax.plot([middle], loss, "*", ms=14, color=colours["1"], label="stage 2 starts here")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (stage 1, then stage 2)")
    ax.set_ylabel("binary cross-entropy")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return ax.figure


def save_loss_curves(files: MethodLayout) -> Figure:
    """Plot a finished run's ``metrics.csv`` and ``selection.json`` into its ``loss_curves.png``
    (atomically); returns the figure."""
    title = f"{files.root.parent.name}: {files.root.name}"
    figure = plot_loss_curves(files.metrics, files.selection, title=title)
    figure.tight_layout()
    with atomic_path(files.loss_curves) as temporary:
        figure.savefig(temporary, dpi=120, format="png")
    return figure

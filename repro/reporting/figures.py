"""Plotting and table helpers for the paper's figures (Fig. 3-6) and tables (II, III).

Figures are :class:`matplotlib.figure.Figure` objects made without pyplot, so they work with any
backend (Agg under papermill and the command line) and leave no global state; :func:`save_figure`
writes PNG and PDF. Notebooks only call these and display the saved PNGs.

``python -m repro.reporting.figures --summary figures`` prints every Table II found in the folder
and lists the figure files (``make demo`` ends with it).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from repro.config import resolve_path
from repro.evaluation.tables import METHOD_NAMES, format_auc
from repro.io.atomic import atomic_path, write_text_atomic

FORMATS = ("png", "pdf")
METHOD_COLORS = dict(zip(("streaming", "mil"), sns.color_palette("colorblind", 2), strict=True))
LINESTYLES = ("-", "--", ":", "-.")
SALIENCY_CMAP = "inferno"
PROBABILITY_CMAP = "RdYlGn_r"


# ----------------------------------------------------------------------------- output


def new_figure(nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] = (5, 5), **kwargs):
    """A pyplot-free figure with a grid of axes (``squeeze=False``: always 2-D)."""
    with sns.axes_style("whitegrid"):
        figure = Figure(figsize=size, layout="constrained")
        axes = figure.subplots(nrows, ncols, squeeze=False, **kwargs)
    return figure, axes


def figure_paths(stem: str | os.PathLike[str]) -> list[Path]:
    """The files of one figure: ``<stem>.png`` and ``<stem>.pdf``."""
    stem = Path(stem)
    return [stem.with_name(f"{stem.name}.{suffix}") for suffix in FORMATS]


def save_figure(figure: Figure, stem: str | os.PathLike[str], dpi: int = 150) -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.pdf`` (each atomically); returns the paths."""
    paths = figure_paths(stem)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for path in paths:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format=path.suffix[1:], dpi=dpi)
    return paths


def png_bytes(figure: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (for ``IPython.display.Image(data=...)`` in widgets)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def markdown_table(frame: pd.DataFrame, float_format: str = "{:.3f}") -> str:
    """A GitHub markdown table (no extra dependency); floats with ``float_format``."""

    def cell(value) -> str:
        if isinstance(value, float | np.floating):
            return "–" if np.isnan(value) else float_format.format(value)
        return str(value).replace("|", "\\|")

    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + " --- |" * len(frame.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def save_table(
    frame: pd.DataFrame, stem: str | os.PathLike[str], markdown: str | None = None
) -> list[Path]:
    """Write ``<stem>.csv`` (the numbers) and ``<stem>.md`` (``markdown`` or the frame as a
    markdown table), atomically."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv = write_text_atomic(stem.with_name(f"{stem.name}.csv"), frame.to_csv(index=False))
    text = markdown if markdown is not None else markdown_table(frame)
    md = write_text_atomic(stem.with_name(f"{stem.name}.md"), text)
    return [csv, md]


# ----------------------------------------------------------------------------- Fig. 3


@dataclass
class RocCurve:
    """One model's test predictions and how to draw them."""

    method: str  # "streaming" or "mil"
    training_set: str  # e.g. "Whole set", "Subset of 40"
    y_true: np.ndarray
    y_score: np.ndarray
    auc: tuple[float, float, float]  # AUC, low, high
    linestyle: str = "-"

    @property
    def label(self) -> str:
        name = METHOD_NAMES.get(self.method, self.method)
        return f"{name}, {self.training_set}: {format_auc(*self.auc)}"


def plot_roc(ax, curves: Sequence[RocCurve], title: str = "") -> None:
    """ROC curves on one axes; the legend carries AUC (95% CI)."""
    ax.plot([0, 1], [0, 1], color="0.7", linewidth=0.8, linestyle=":", zorder=0)
    for curve in curves:
        fpr, tpr, _ = roc_curve(curve.y_true, curve.y_score)
        ax.plot(
            fpr,
            tpr,
            color=METHOD_COLORS.get(curve.method),
            linestyle=curve.linestyle,
            linewidth=1.6,
            label=curve.label,
        )
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title(title)
    if curves:
        ax.legend(loc="lower right", fontsize="small", title="AUC (95% CI)", title_fontsize="small")


def figure_3(all_curves: Sequence[RocCurve], pair: Sequence[RocCurve], pair_note: str = ""):
    """Fig. 3: (a) ROC curves of every model, (b) streaming vs. MIL on the whole set."""
    figure, axes = new_figure(1, 2, size=(11, 5.6))
    plot_roc(axes[0, 0], all_curves, "(a) All models, test set")
    title = "(b) Streaming vs. MIL"
    if pair:
        title += f", {pair[0].training_set.lower()}"
    plot_roc(axes[0, 1], pair, title)
    if pair_note:
        axes[0, 1].text(
            0.98,
            0.45,
            pair_note,
            transform=axes[0, 1].transAxes,
            ha="right",
            va="bottom",
            fontsize="small",
        )
    return figure


# ----------------------------------------------------------------------------- heatmaps


def show_overlay(
    ax,
    thumbnail: np.ndarray,
    heatmap: np.ndarray | None,
    kind: str = "saliency",
    title: str = "",
):
    """A thumbnail with a heatmap on top.

    ``kind="saliency"``: a map in [0, 1] drawn with ``inferno`` whose opacity grows with the
    value (so low sensitivity shows the tissue). ``kind="probability"``: patch probabilities in
    [0, 1] (NaN = no patch), half transparent, red = cancer. Returns the heatmap's image artist
    (for a colour bar), or None.
    """
    ax.imshow(thumbnail, interpolation="lanczos")
    artist = None
    if heatmap is not None:
        extent = (-0.5, thumbnail.shape[1] - 0.5, thumbnail.shape[0] - 0.5, -0.5)
        if kind == "saliency":
            alpha = np.clip(np.nan_to_num(heatmap), 0, 1) * 0.85
            artist = ax.imshow(
                heatmap,
                cmap=SALIENCY_CMAP,
                vmin=0,
                vmax=1,
                alpha=alpha,
                extent=extent,
                interpolation="bilinear",
            )
        elif kind == "probability":
            artist = ax.imshow(
                np.ma.masked_invalid(heatmap),
                cmap=PROBABILITY_CMAP,
                vmin=0,
                vmax=1,
                alpha=0.5,
                extent=extent,
                interpolation="nearest",
            )
        else:
            raise ValueError(f"kind must be 'saliency' or 'probability', got {kind!r}")
    ax.set_title(title, fontsize="small")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    return artist


@dataclass
class HeatmapExample:
    """One biopsy for a heatmap figure (Fig. 4-6)."""

    image_id: str
    caption: str  # e.g. "label 1, streaming 0.93, MIL 0.88"
    thumbnail: np.ndarray  # (h, w, 3) uint8
    saliency: np.ndarray | None  # SmoothGrad display map in [0, 1], (h, w)
    patches: np.ndarray | None  # MIL patch probabilities, (h, w), NaN outside patches


def heatmap_figure(examples: Sequence[HeatmapExample], title: str = "", column_width: float = 3.3):
    """Rows of biopsies; columns: thumbnail, SmoothGrad (streaming), MIL patch probabilities."""
    if not examples:
        raise ValueError("examples is empty: nothing to draw")
    heights = [e.thumbnail.shape[0] / e.thumbnail.shape[1] for e in examples]
    size = (3 * column_width + 0.8, sum(column_width * h for h in heights) + 0.6 * len(examples))
    figure, axes = new_figure(len(examples), 3, size=size)
    saliency_artist = probability_artist = None
    for row, example in zip(axes, examples, strict=True):
        show_overlay(
            row[0], example.thumbnail, None, title=f"{example.image_id}\n{example.caption}"
        )
        artist = show_overlay(
            row[1], example.thumbnail, example.saliency, "saliency", "Streaming: SmoothGrad"
        )
        saliency_artist = artist or saliency_artist
        artist = show_overlay(
            row[2], example.thumbnail, example.patches, "probability", "MIL: patch probability"
        )
        probability_artist = artist or probability_artist
    colorbars = [
        (saliency_artist, 1, "SmoothGrad sensitivity (scaled)"),
        (probability_artist, 2, "MIL patch P(cancer)"),
    ]
    for artist, column, label in colorbars:
        if artist is not None:
            figure.colorbar(
                artist, ax=axes[:, column], location="bottom", shrink=0.8, aspect=30, label=label
            )
    if title:
        figure.suptitle(title)
    return figure


# ----------------------------------------------------------------------------- summary


def summary(figures_dir: str | os.PathLike[str]) -> str:
    """Text listing every Table II (markdown) and the figure files in ``figures_dir``."""
    folder = resolve_path(figures_dir)
    if not folder.is_dir():
        return f"{folder}: no figures yet (run `python -m repro run params/demo.yaml`)\n"
    lines = []
    for table in sorted(folder.glob("table2_*.md")):
        lines += [f"Table II ({table.stem.removeprefix('table2_')}), {table}:", table.read_text()]
    if not lines:
        lines.append(f"{folder}: no Table II yet (notebook 05 writes table2_<dataset>.md)")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    lines.append(f"Files in {folder} ({len(files)}):")
    lines += [f"  {p.name}  ({_size(p.stat().st_size)})" for p in files]
    return "\n".join(lines) + "\n"


def _size(count: int) -> str:
    return f"{count} B" if count < 1024 else f"{count / 1024:.0f} KiB"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repro.reporting.figures", description=__doc__)
    parser.add_argument("--summary", metavar="DIR", required=True, help="figures folder")
    args = parser.parse_args(argv)
    sys.stdout.write(summary(args.summary))
    return 0


if __name__ == "__main__":
    matplotlib.use("Agg")
    sys.exit(main())

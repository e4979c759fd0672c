"""Preparation of the raw biopsies (paper III-A, IV-A): labels, 0.96 um/px, trimming, padding.

For each biopsy of ``train.csv`` (only ``data.data_provider``, unless it is ``"all"``), or of the
dataset CSV when ``data.source`` is ``csv`` (:mod:`repro.data.sources`; slides of any format
:func:`repro.data.slides.open_slide` reads, with the backend ``data.slide_backend``):

1. the label: binary (negative = ``gleason_score`` ``negative`` or ``0+0``) and the primary
   Gleason pattern (0 for negatives, 3/4/5), kept for stratification (:func:`parse_gleason`);
2. the slide is read at ``data.target_mpp`` (0.96 um/px): the pyramid level whose mpp is at most
   the target, shrunk by the exact ratio with antialiasing (PANDA's 0.48 um/px level 0: a 2x2 box
   average), see :meth:`repro.data.slides.Slide.read_at_mpp`;
3. the tissue mask (:mod:`repro.data.tissue`, on a 1/``data.tissue_downsample`` thumbnail read
   from a low pyramid level); the paper used a tissue-segmentation network here;
4. whitespace is trimmed to the bounding box of the mask, and the result is padded with white
   (centred) or centre-cropped to ``data.input_size`` square (paper: 16384; 99% of its biopsies
   fit). Offsets are rounded to whole mask pixels so that the mask stays aligned with the image
   (the centring is exact to ``tissue_downsample / 2`` px);
5. written once: ``images/<image_id>.tiff`` (tiled 256 px, JPEG Q90, pyramidal, with resolution
   tags), ``masks/<image_id>.png`` (the tissue mask of the prepared image at 1/downsample),
   ``labels/<image_id>.png`` (when the raw PANDA-layout set has the slide's label mask
   ``train_label_masks/<image_id>_mask.tiff``: the same resampling, trim and pad as the image,
   by nearest neighbour; :mod:`repro.data.masks`) and ``records/<image_id>.json`` (its manifest
   row). Each file goes to a temporary name first and is renamed when complete, the record last,
   so an interrupted run leaves no half-written file that looks finished.

:func:`prepare_dataset` runs the images in worker processes (``run.num_workers``), skips images
that are already prepared with the same settings (after verifying their files), retries images
whose worker died, and records every failure in the manifest's ``status`` column instead of
stopping: unknown grades, missing or unreadable images, slides without tissue.
``manifest.csv`` is written atomically, also every few images while the run goes on.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyvips
from tqdm.auto import tqdm

from repro.config import Params, check_data_paths, resolve_path
from repro.data.masks import prepare_label_mask
from repro.data.slides import SlideError, crop_or_pad, explain_error, open_slide, save_pyramid
from repro.data.sources import SOURCE_COLUMNS, read_csv_dataset
from repro.data.synthetic import generate_synthetic_panda
from repro.data.tissue import bounding_box, min_object_area, tissue_mask
from repro.exceptions import NoTissueError
from repro.io.atomic import atomic_path, remove_stale_temporaries, write_text_atomic
from repro.layout import PreparedLayout

logger = logging.getLogger(__name__)

OK = "ok"
FORMAT_VERSION = 1
"""Bumped when the prepared files change meaning; older prepared images are then redone."""

LABEL_COLUMNS = ["image_id", "data_provider", "isup_grade", "gleason_score"]
MANIFEST_COLUMNS = [
    "image_id",
    "data_provider",
    "isup_grade",
    "gleason_score",
    "label",
    "primary_pattern",
    "status",
    "width",
    "height",
    "path",
    "mask_path",
    "mask_downsample",
    "tissue_fraction",
    "tissue_kept",
    "fits",
    "orig_width",
    "orig_height",
    "orig_mpp",
    "level",
    "level_mpp",
    "scaled_width",
    "scaled_height",
    "trim_x",
    "trim_y",
    "trim_width",
    "trim_height",
    "offset_x",
    "offset_y",
    "label_path",
    "tumour_fraction",
]
"""Manifest columns. ``width``/``height``: the prepared size (input_size); ``orig_*``: level 0 of
the raw slide; ``scaled_*``: the slide at target mpp; ``trim_*``: the tissue bounding box in it;
``offset_*``: where that box's top-left corner lies in the prepared image (negative: cropped);
``tissue_fraction``: tissue share of the prepared image; ``tissue_kept``: share of the slide's
tissue that is in the prepared image (< 1 when cropped); ``fits``: no cropping was needed;
``label_path``, ``tumour_fraction``: the prepared label mask and its share of tumour (labels
>= 3), empty when the raw slide has no label mask."""

_GLEASON = re.compile(r"^\s*([0-5])\s*\+\s*([0-5])\s*$")
_SAVE_EVERY = 25
_MAX_POOL_RESTARTS = 3


# ----------------------------------------------------------------------------- labels


def parse_gleason(score: object) -> tuple[int, int]:
    """``(label, primary_pattern)`` from PANDA's ``gleason_score``.

    ``negative`` and ``0+0`` are label 0 with pattern 0; ``"a+b"`` with a, b in 3..5 is label 1
    with primary pattern a. Anything else raises ``ValueError``.

    >>> parse_gleason("4+3"), parse_gleason("negative")
    ((1, 4), (0, 0))
    """
    text = str(score).strip().lower()
    if text in {"negative", "0+0"}:
        return 0, 0
    match = _GLEASON.match(text)
    if match:
        primary, secondary = int(match.group(1)), int(match.group(2))
        if primary in (3, 4, 5) and secondary in (3, 4, 5):
            return 1, primary
    raise ValueError(f"unknown gleason_score {score!r}")


def read_labels(csv_path: str | os.PathLike[str], data_provider: str = "radboud") -> pd.DataFrame:
    """PANDA's ``train.csv`` with ``label``, ``primary_pattern`` and ``status`` columns.

    Only rows of ``data_provider`` are kept (all rows for ``"all"``). Rows whose grade cannot be
    read, or whose ``isup_grade`` contradicts the ``gleason_score`` on cancer vs. benign, keep
    label and pattern -1 and a status saying why; nothing is dropped silently.
    """
    path = Path(csv_path)
    try:
        table = pd.read_csv(path, dtype={"image_id": str, "gleason_score": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise ValueError(f"{path}: cannot read labels: {error}") from None
    missing = [column for column in LABEL_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; has {list(table.columns)}")
    if data_provider != "all":
        keep = table["data_provider"].astype(str).str.lower() == data_provider.lower()
        if not keep.any():
            providers = sorted(table["data_provider"].astype(str).unique())
            raise ValueError(f"{path}: no rows of data_provider {data_provider!r}; has {providers}")
        table = table.loc[keep]
    table = table[LABEL_COLUMNS].reset_index(drop=True)
    labels, patterns, statuses = [], [], []
    for score, isup in zip(table["gleason_score"], table["isup_grade"], strict=True):
        try:
            label, pattern = parse_gleason(score)
        except ValueError as error:
            labels.append(-1)
            patterns.append(-1)
            statuses.append(str(error))
            continue
        isup_negative = _isup_is_negative(isup)
        if isup_negative is not None and isup_negative != (label == 0):
            labels.append(-1)
            patterns.append(-1)
            statuses.append(f"inconsistent labels: gleason_score {score!r}, isup_grade {isup!r}")
            continue
        labels.append(label)
        patterns.append(pattern)
        statuses.append(OK)
    table["label"] = labels
    table["primary_pattern"] = patterns
    table["status"] = statuses
    bad = table.loc[table["status"] != OK]
    for row in bad.itertuples():
        logger.warning("%s: %s (image %s is left out)", path, row.status, row.image_id)
    return table


def _isup_is_negative(isup: object) -> bool | None:
    try:
        return int(isup) == 0
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- one image


@dataclass(frozen=True)
class PrepareSettings:
    """What determines a prepared image (its fingerprint decides whether a re-run redoes it)."""

    target_mpp: float
    input_size: int
    tissue_saturation: float
    tissue_min_object_px: int
    tissue_downsample: int
    mpp_override: float | None
    slide_backend: str = "auto"

    @classmethod
    def from_params(cls, params: Params) -> PrepareSettings:
        data = params.data
        if data.tissue_downsample < 1:
            raise ValueError(f"data.tissue_downsample must be >= 1, got {data.tissue_downsample}")
        return cls(
            target_mpp=data.target_mpp,
            input_size=data.input_size,
            tissue_saturation=data.tissue_saturation,
            tissue_min_object_px=data.tissue_min_object_px,
            tissue_downsample=data.tissue_downsample,
            mpp_override=data.mpp_override,
            slide_backend=data.slide_backend,
        )

    def fingerprint(self) -> str:
        text = json.dumps({"version": FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepare_image(
    source: str | os.PathLike[str],
    image_path: str | os.PathLike[str],
    mask_path: str | os.PathLike[str],
    settings: PrepareSettings,
    labels: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
) -> dict[str, Any]:
    """Prepare one slide (steps 2-5 of the module docstring); returns its geometry.

    Writes ``image_path`` (prepared TIFF) and ``mask_path`` (PNG), each via a temporary name;
    with ``labels`` = (raw label mask, prepared label mask), also the prepared label mask
    (PNG, :func:`repro.data.masks.prepare_label_mask`), and the row gets ``tumour_fraction``.

    Raises:
        SlideError: the slide or its label mask cannot be read (the message names the file).
        NoTissueError: no tissue was found.
    """
    size = settings.input_size
    down = settings.tissue_downsample
    slide = open_slide(source, mpp_override=settings.mpp_override, backend=settings.slide_backend)
    level = slide.best_level(settings.target_mpp)
    scaled = slide.read_at_mpp(settings.target_mpp)
    mask_width, mask_height = math.ceil(scaled.width / down), math.ceil(scaled.height / down)
    thumbnail = slide.read_at_mpp(settings.target_mpp * down)
    thumbnail = crop_or_pad(thumbnail, 0, 0, mask_width, mask_height)
    try:
        mask = tissue_mask(
            thumbnail,
            settings.tissue_saturation,
            min_object_area(settings.tissue_min_object_px, down),
        )
    except pyvips.Error as error:
        raise SlideError(f"{source}: cannot decode the thumbnail: {error.detail}") from None
    box = bounding_box(mask)
    if box is None:
        raise NoTissueError(
            f"{source}: no tissue found (HSV saturation > {settings.tissue_saturation})"
        )
    mx0, my0, mx1, my1 = box
    x0, y0 = mx0 * down, my0 * down
    width, height = min(mx1 * down, scaled.width) - x0, min(my1 * down, scaled.height) - y0
    # Centre the tissue box, offsets rounded to whole mask pixels (negative: centre crop).
    left = down * round((size - width) / (2 * down))
    top = down * round((size - height) / (2 * down))
    prepared = scaled.crop(x0, y0, width, height).embed(left, top, size, size, extend="white")

    out_mask = np.zeros((math.ceil(size / down), math.ceil(size / down)), bool)
    _paste(out_mask, mask[my0:my1, mx0:mx1], left // down, top // down)
    tissue_total = int(mask.sum())

    with atomic_path(image_path) as partial_image:  # renamed after the mask
        try:
            save_pyramid(prepared, partial_image, settings.target_mpp)
        except pyvips.Error as error:
            reason = explain_error(error, "cannot read or write pixels")
            where = f"level {level.index} ({level.width}x{level.height}, whole level)"
            raise SlideError(f"{source}: {where}, read with {slide.backend}: {reason}") from None
        with atomic_path(mask_path) as partial_mask:
            pyvips.Image.new_from_array(out_mask.astype(np.uint8) * 255).pngsave(str(partial_mask))
        tumour = {}
        if labels is not None:
            fraction = prepare_label_mask(
                labels[0],
                labels[1],
                scaled_size=(scaled.width, scaled.height),
                box=(x0, y0, width, height),
                offset=(left, top),
                size=size,
            )
            tumour = {"tumour_fraction": fraction}
    return {
        **tumour,
        "width": size,
        "height": size,
        "mask_downsample": down,
        "tissue_fraction": float(out_mask.mean()),
        "tissue_kept": float(out_mask.sum() / tissue_total),
        "fits": bool(width <= size and height <= size),
        "orig_width": slide.dimensions[0],
        "orig_height": slide.dimensions[1],
        "orig_mpp": slide.mpp,
        "level": level.index,
        "level_mpp": level.mpp,
        "scaled_width": scaled.width,
        "scaled_height": scaled.height,
        "trim_x": x0,
        "trim_y": y0,
        "trim_width": width,
        "trim_height": height,
        "offset_x": left,
        "offset_y": top,
        "backend": slide.backend,
    }


def _paste(target: np.ndarray, source: np.ndarray, left: int, top: int) -> None:
    """``target[top:, left:] = source``, clipped to both arrays (offsets may be negative)."""
    ty0, tx0 = max(top, 0), max(left, 0)
    ty1 = min(top + source.shape[0], target.shape[0])
    tx1 = min(left + source.shape[1], target.shape[1])
    if ty0 < ty1 and tx0 < tx1:
        target[ty0:ty1, tx0:tx1] = source[ty0 - top : ty1 - top, tx0 - left : tx1 - left]


# ----------------------------------------------------------------------------- the dataset


@dataclass(frozen=True)
class _Task:
    image_id: str
    source: str
    prepared_dir: str
    settings: PrepareSettings
    label_source: str | None = None  # the raw label mask, when the slide has one


def prepared_paths(prepared_dir: str | os.PathLike[str], image_id: str) -> dict[str, Path]:
    """The files of one prepared image: ``image``, ``mask``, ``labels`` and ``record``."""
    layout = PreparedLayout(Path(prepared_dir))
    return {
        "image": layout.image(image_id),
        "mask": layout.mask(image_id),
        "labels": layout.label_mask(image_id),
        "record": layout.record(image_id),
    }


def prepare_dataset(params: Params, *, progress: bool = True) -> pd.DataFrame:
    """Prepare every biopsy of the params' dataset; returns (and writes) the manifest.

    With ``data.source == "synthetic"`` the raw set is generated into ``data.panda_dir`` first
    if it is missing (``data.synthetic_images`` images of ``data.synthetic_size`` px, seed
    ``run.seed``, task ``data.synthetic_task``). See the module docstring for what happens to
    each image; label masks are looked for in PANDA's layout (PANDA and synthetic sources).

    Returns:
        The manifest (:data:`MANIFEST_COLUMNS`), also written to
        ``<data.prepared_dir>/manifest.csv``; rows whose ``status`` is not ``"ok"`` say why.
    """
    data = params.data
    raw = params.panda
    if data.source == "synthetic":
        generate_synthetic_panda(
            raw.root,
            data.synthetic_images,
            data.synthetic_size,
            params.run.seed,
            data.synthetic_task,
        )
    check_data_paths(params)
    prepared = resolve_path(data.prepared_dir)
    layout = PreparedLayout(prepared)
    for folder in (layout.images, layout.masks, layout.labels, layout.records):
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder)
    settings = PrepareSettings.from_params(params)
    if data.source == "csv":
        labels = read_csv_dataset(resolve_path(data.csv_path))
    else:
        labels = read_labels(raw.labels, data.data_provider)

    rows: dict[str, dict[str, Any]] = {}
    tasks: list[_Task] = []
    for entry in labels.to_dict("records"):
        image_id = entry["image_id"]
        source = Path(entry.get("slide") or raw.image(image_id))
        label_source = raw.label_mask(image_id) if data.source != "csv" else None
        if label_source is not None and not label_source.exists():
            label_source = None
        mpp = entry.pop("mpp", None)
        image_settings = (
            settings if mpp is None or pd.isna(mpp) else replace(settings, mpp_override=mpp)
        )
        if entry["status"] != OK:
            rows[image_id] = entry
        elif not source.exists():
            rows[image_id] = {**entry, "status": f"missing image: {source}"}
            logger.warning("%s: missing image file %s", image_id, source)
        else:
            has_labels = label_source is not None
            finished = _finished_row(prepared, image_id, image_settings, has_labels)
            if finished is not None:
                rows[image_id] = {**entry, **finished}
            else:
                rows[image_id] = {**entry, "status": "not prepared (interrupted)"}
                label = str(label_source) if has_labels else None
                tasks.append(_Task(image_id, str(source), str(prepared), image_settings, label))
    skipped = sum(1 for row in rows.values() if row["status"] == OK)
    if skipped:
        logger.info("%d of %d images already prepared (verified), skipped", skipped, len(rows))

    order = list(labels["image_id"])
    manifest_path = layout.manifest
    completed = 0

    def record(image_id: str, result: dict[str, Any]) -> None:
        nonlocal completed
        rows[image_id] = {**rows[image_id], **result}
        completed += 1
        if completed % _SAVE_EVERY == 0:
            write_text_atomic(manifest_path, _frame(rows, order).to_csv(index=False))

    try:
        _run_tasks(tasks, params.run.num_workers, record, progress)
    finally:
        manifest = _frame(rows, order)
        write_text_atomic(manifest_path, manifest.to_csv(index=False))
    ok = manifest["status"] == OK
    logger.info(
        "%d images ok (%d prepared now, %d already done), %d failed; manifest: %s",
        int(ok.sum()),
        int(ok.sum()) - skipped,
        skipped,
        int((~ok).sum()),
        manifest_path,
    )
    return manifest


def load_manifest(params: Params) -> pd.DataFrame:
    """``<data.prepared_dir>/manifest.csv`` (written by notebook 01 / :func:`prepare_dataset`)."""
    path = params.prepared.manifest
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run notebook 01 (prepare_dataset) first")
    dtypes = {"image_id": str, "gleason_score": str, "status": str, "patient_id": str, "split": str}
    return pd.read_csv(path, dtype=dtypes)


def summarize(manifest: pd.DataFrame) -> pd.DataFrame:
    """Counts per class (negative, pattern 3/4/5, unknown) and outcome (ok / failed)."""
    names = {0: "negative", 1: "positive", 3: "pattern 3", 4: "pattern 4", 5: "pattern 5"}
    names[-1] = "unknown grade"
    classes = manifest["primary_pattern"].map(names).fillna("unknown grade").rename("class")
    outcome = pd.Series(
        np.where(manifest["status"] == OK, "ok", "failed"), index=manifest.index, name="images"
    )
    table = pd.crosstab(classes, outcome, margins=True, margins_name="total")
    return table.reindex(columns=[c for c in ("ok", "failed", "total") if c in table.columns])


def failures(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest rows whose status is not ``"ok"``."""
    columns = ["image_id", "gleason_score", "isup_grade", "status"]
    return manifest.loc[manifest["status"] != OK, columns].reset_index(drop=True)


def _finished_row(
    prepared: Path, image_id: str, settings: PrepareSettings, has_labels: bool
) -> dict | None:
    """The recorded manifest row if the image is prepared with these settings and its files
    verify (TIFF opens with the expected size, its smallest level decodes, mask size matches,
    a label mask is there exactly when the raw slide has one and has the image's size)."""
    paths = prepared_paths(prepared, image_id)
    try:
        stored = json.loads(paths["record"].read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if stored.get("fingerprint") != settings.fingerprint():
        return None
    if has_labels != bool(stored["row"].get("label_path")):
        return None
    size = settings.input_size
    mask_side = math.ceil(size / settings.tissue_downsample)
    try:
        image = pyvips.Image.new_from_file(str(paths["image"]), revalidate=True, fail_on="error")
        pages = image.get("n-pages") if image.get_typeof("n-pages") else 1
        smallest = pyvips.Image.new_from_file(
            str(paths["image"]), page=pages - 1, revalidate=True, fail_on="error"
        )
        smallest.avg()
        mask = pyvips.Image.new_from_file(str(paths["mask"]), revalidate=True)
        labels = (
            pyvips.Image.new_from_file(str(paths["labels"]), revalidate=True)
            if has_labels
            else image
        )
    except pyvips.Error:
        return None
    if (labels.width, labels.height) != (size, size):
        return None
    if (image.width, image.height, image.bands) != (size, size, 3):
        return None
    if (mask.width, mask.height) != (mask_side, mask_side):
        return None
    return stored["row"]


def _prepare_one(task: _Task) -> dict[str, Any]:
    """Worker: prepare one image and write its record; failures come back as a status."""
    paths = prepared_paths(task.prepared_dir, task.image_id)
    labels = None if task.label_source is None else (task.label_source, paths["labels"])
    if labels is None:
        paths["labels"].unlink(missing_ok=True)  # left by an earlier set that had label masks
    try:
        geometry = prepare_image(
            task.source, paths["image"], paths["mask"], task.settings, labels=labels
        )
    except (SlideError, NoTissueError) as error:
        return {"status": str(error)}
    except Exception as error:  # any failure is recorded, the run goes on
        return {"status": f"{task.source}: {type(error).__name__}: {error}"}
    root = Path(task.prepared_dir)
    row = {
        **geometry,
        "path": paths["image"].relative_to(root).as_posix(),
        "mask_path": paths["mask"].relative_to(root).as_posix(),
        "status": OK,
    }
    if labels is not None:
        row["label_path"] = paths["labels"].relative_to(root).as_posix()
    record = {"fingerprint": task.settings.fingerprint(), "row": row}
    write_text_atomic(paths["record"], json.dumps(record, indent=1))
    return row


def _init_worker(threads: int, parent: int) -> None:
    """Worker setup: libvips threads per worker, and exit when the parent process ``parent``
    dies (e.g. a killed notebook kernel), instead of lingering as an orphan."""
    pyvips.concurrency_set(threads)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _run_tasks(tasks: list[_Task], workers: int, record, progress: bool, function=None) -> None:
    """Run ``function`` (default :func:`_prepare_one`) over ``tasks`` (in ``workers`` processes;
    0 = in this process), calling ``record(image_id, result)`` as results arrive. A pool whose
    worker died (killed, out of memory) is restarted for the unfinished images, up to three
    times; images still unfinished then get a failure status."""
    function = function or _prepare_one
    bar = tqdm(total=len(tasks), desc="prepare", unit="image", disable=not progress or not tasks)
    pending = list(tasks)
    try:
        if workers == 0:
            for task in pending:
                record(task.image_id, function(task))
                bar.update()
            return
        threads = max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context("spawn")
        for attempt in range(_MAX_POOL_RESTARTS + 1):
            done: set[str] = set()
            pool = concurrent.futures.ProcessPoolExecutor(
                workers,
                mp_context=context,
                initializer=_init_worker,
                initargs=(threads, os.getpid()),
            )
            try:
                futures = {pool.submit(function, task): task for task in pending}
                for future in concurrent.futures.as_completed(futures):
                    task = futures[future]
                    record(task.image_id, future.result())
                    done.add(task.image_id)
                    bar.update()
                return
            except BrokenProcessPool:
                pending = [task for task in pending if task.image_id not in done]
                logger.warning(
                    "a preparation worker died (attempt %d of %d); %d images left",
                    attempt + 1,
                    _MAX_POOL_RESTARTS + 1,
                    len(pending),
                )
            finally:
                # On an interrupt, do not wait for the queued images.
                pool.shutdown(wait=True, cancel_futures=True)
        for task in pending:
            record(task.image_id, {"status": "worker process died while preparing this image"})
            bar.update()
    finally:
        bar.close()


def _frame(rows: dict[str, dict[str, Any]], order: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame([rows[image_id] for image_id in order])
    for column in MANIFEST_COLUMNS:
        if column not in frame.columns:
            frame[column] = np.nan
    return frame[MANIFEST_COLUMNS + [c for c in SOURCE_COLUMNS if c in frame.columns]]

"""repro.data.masks: label masks go through the same trim, pad / crop and resampling as images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pyvips
from scipy import ndimage

from repro.data.masks import read_label_mask, read_prepared_labels, write_label_mask
from repro.data.prepare import PrepareSettings, parse_gleason, prepare_dataset, prepare_image
from repro.data.synthetic import write_slide
from repro.layout import PandaLayout, PreparedLayout

DOWN = 8


def _raw_pair(raw: PandaLayout, mpp: float, shape: tuple[int, int] = (512, 1024)) -> Path:
    """A slide with a pink tissue rectangle holding a dark object, and its label mask (stroma 1,
    the object 4), in PANDA's layout; returns the slide's path."""
    tissue, thing = np.s_[100:300, 200:700], np.s_[150:210, 320:440]
    image = np.full((*shape, 3), 246, np.uint8)
    image[tissue] = (225, 140, 185)
    image[thing] = (70, 40, 120)
    labels = np.zeros(shape, np.uint8)
    labels[tissue] = 1
    labels[thing] = 4
    for folder in (raw.images, raw.label_masks):
        folder.mkdir(parents=True)
    write_slide(image, raw.image("slide"), mpp)
    write_label_mask(labels, raw.label_mask("slide"), mpp)
    return raw.image("slide")


def _prepare(root: Path, size: int, labels: bool = True) -> tuple[np.ndarray, Path, dict]:
    raw, prepared = PandaLayout(root / "raw"), PreparedLayout(root / "prepared")
    for folder in (prepared.images, prepared.masks, prepared.labels):
        folder.mkdir(parents=True)
    pair = (raw.label_mask("slide"), prepared.label_mask("slide")) if labels else None
    row = prepare_image(
        raw.image("slide"),
        prepared.image("slide"),
        prepared.mask("slide"),
        PrepareSettings(0.96, size, 0.07, 1, DOWN, None),
        labels=pair,
    )
    image = pyvips.Image.new_from_file(str(prepared.image("slide"))).numpy()
    return image, prepared.label_mask("slide"), row


@pytest.mark.parametrize(
    ("mpp", "size", "tolerance"),
    [
        (0.48, 256, 0),  # PANDA: an exact 2x box shrink, then trim and pad
        (0.48, 128, 0),  # the tissue does not fit: centre crop
        (0.5, 256, 1),  # a non-integer ratio (lanczos for the image, nearest for the mask)
    ],
)
def test_drawn_object_lands_on_the_same_pixels(tmp_path, mpp, size, tolerance):
    _raw_pair(PandaLayout(tmp_path / "raw"), mpp)
    image, label_path, row = _prepare(tmp_path, size)
    labels = read_prepared_labels(label_path)
    assert labels.shape == image.shape[:2] == (size, size)
    assert set(np.unique(labels).tolist()) <= {0, 1, 4}  # nearest neighbour: no blended labels
    thing, drawn = labels == 4, image.astype(int).sum(axis=2) < 330
    assert thing.any()
    if tolerance == 0:
        assert (thing == drawn).mean() > 0.999
    else:  # resampling edges may differ by a pixel, never more
        grown = ndimage.binary_dilation(thing, iterations=tolerance)
        shrunk = ndimage.binary_erosion(thing, iterations=tolerance)
        assert (drawn <= grown).all() and (shrunk <= drawn).all()
    assert (labels[image.min(axis=2) > 240] == 0).mean() > 0.99  # white padding is background
    assert row["tumour_fraction"] == pytest.approx(thing.mean())


def test_no_label_mask_no_labels(tmp_path):
    _raw_pair(PandaLayout(tmp_path / "raw"), 0.48)
    _, label_path, row = _prepare(tmp_path, 256, labels=False)
    assert "tumour_fraction" not in row
    assert not label_path.exists()


def test_raw_label_mask_reads_the_red_channel_at_every_level(tmp_path):
    raw = PandaLayout(tmp_path / "raw")
    _raw_pair(raw, 0.48)
    full = read_label_mask(raw.label_mask("slide"))
    assert full.shape == (512, 1024) and (full == 4).sum() == 60 * 120
    smallest = read_label_mask(raw.label_mask("slide"), level=-1)
    assert smallest.shape == (32, 64) and set(np.unique(smallest).tolist()) == {0, 1, 4}


def test_prepared_labels_at_a_map_size(tmp_path):
    labels = np.array([[0, 1], [3, 5]], np.uint8).repeat(4, axis=0).repeat(4, axis=1)
    path = tmp_path / "labels.png"
    pyvips.Image.new_from_array(labels).pngsave(str(path))
    assert read_prepared_labels(path, (2, 2)).tolist() == [[0, 1], [3, 5]]
    assert read_prepared_labels(path, (16, 16)).shape == (16, 16)
    assert set(np.unique(read_prepared_labels(path, (5, 3))).tolist()) <= {0, 1, 3, 5}


def test_synthetic_set_prepares_its_masks_and_resumes(make_params, tmp_path):
    params = make_params(tmp_path, data={"synthetic_task": "local"})
    manifest = prepare_dataset(params, progress=False)
    assert (manifest["status"] == "ok").all()
    for row in manifest.itertuples():
        labels = read_prepared_labels(params.prepared.root / row.label_path)
        assert labels.shape == (256, 256)
        assert (labels >= 3).any() == bool(parse_gleason(row.gleason_score)[0])
        assert row.tumour_fraction == pytest.approx((labels >= 3).mean())
    saved = pd.read_csv(params.prepared.manifest)
    assert saved["label_path"].notna().all()

    # A second run (the raw set read as PANDA's, so not regenerated) verifies the label masks
    # too; a slide whose raw label mask went is redone without one.
    victim = manifest["image_id"].iloc[0]
    params.panda.label_mask(victim).unlink()
    records = {i: params.prepared.record(i).stat().st_mtime_ns for i in manifest["image_id"]}
    panda = make_params(tmp_path, data={"source": "panda"})
    again = prepare_dataset(panda, progress=False).set_index("image_id")
    assert again["label_path"].isna().sum() == 1 and pd.isna(again.at[victim, "label_path"])
    assert not params.prepared.label_mask(victim).exists()
    assert (again["status"] == "ok").all()
    redone = [
        i for i, mtime in records.items() if params.prepared.record(i).stat().st_mtime_ns != mtime
    ]
    assert redone == [victim]

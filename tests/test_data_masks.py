"""repro.data.masks: label masks go through the same trim, pad / crop and resampling as images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pyvips

from repro.config import build_params
from repro.data.masks import (
    label_mask_path,
    prepared_label_path,
    read_label_mask,
    write_label_mask,
)
from repro.data.prepare import PrepareSettings, parse_gleason, prepare_dataset, prepare_image
from repro.data.synthetic import write_slide

DOWN = 8


def _raw_pair(raw: Path, mpp: float, shape=(512, 1024), tissue=None, thing=None) -> Path:
    """A slide with a pink tissue rectangle holding a dark object, and its label mask (stroma 1,
    the object 4), in PANDA's layout under ``raw``; returns the slide's path."""
    tissue = tissue or (slice(100, 300), slice(200, 700))
    thing = thing or (slice(150, 210), slice(320, 440))
    image = np.full((*shape, 3), 246, np.uint8)
    image[tissue] = (225, 140, 185)
    image[thing] = (70, 40, 120)
    labels = np.zeros(shape, np.uint8)
    labels[tissue] = 1
    labels[thing] = 4
    source = raw / "train_images" / "slide.tiff"
    source.parent.mkdir(parents=True)
    write_slide(image, source, mpp)
    label_mask_path(raw, "slide").parent.mkdir(parents=True)
    write_label_mask(labels, label_mask_path(raw, "slide"), mpp)
    return source


def _prepare(tmp_path: Path, source: Path, size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    prepared = tmp_path / "prepared"
    (prepared / "images").mkdir(parents=True)
    (prepared / "masks").mkdir()
    settings = PrepareSettings(0.96, size, 0.07, 1, DOWN, None)
    row = prepare_image(
        source, prepared / "images" / "slide.tiff", prepared / "masks" / "slide.png", settings
    )
    image = pyvips.Image.new_from_file(str(prepared / "images" / "slide.tiff")).numpy()
    labels = read_label_mask(prepared_label_path(prepared, "slide"))
    return image, labels, row


def _dark(image: np.ndarray) -> np.ndarray:
    return image.astype(int).sum(axis=2) < 330


@pytest.mark.parametrize(
    ("mpp", "size", "tolerance"),
    [
        (0.48, 256, 0),  # PANDA: an exact 2x box shrink, then trim and pad
        (0.48, 128, 0),  # the tissue does not fit: centre crop
        (0.5, 256, 1),  # a non-integer ratio (lanczos for the image, nearest for the mask)
    ],
)
def test_drawn_object_lands_on_the_same_pixels(tmp_path, mpp, size, tolerance):
    source = _raw_pair(tmp_path / "raw", mpp)
    image, labels, row = _prepare(tmp_path, source, size)
    assert labels.shape == image.shape[:2] == (size, size)
    assert set(np.unique(labels).tolist()) <= {0, 1, 4}  # nearest neighbour: no blended labels
    thing, drawn = labels == 4, _dark(image)
    assert thing.any()
    if tolerance == 0:
        assert (thing == drawn).mean() > 0.999
    else:  # resampling edges may differ by a pixel, never more
        from scipy import ndimage

        grown = ndimage.binary_dilation(thing, iterations=tolerance)
        shrunk = ndimage.binary_erosion(thing, iterations=tolerance)
        assert (drawn <= grown).all() and (shrunk <= drawn).all()
    # background padding is label 0, tissue is labelled where the image has tissue
    assert (labels[image.min(axis=2) > 240] == 0).mean() > 0.99
    assert row["tumour_fraction"] == pytest.approx(thing.mean())
    assert row["label_path"] == "labels/slide.png"


def test_no_label_mask_no_labels(tmp_path):
    source = _raw_pair(tmp_path / "raw", 0.48)
    label_mask_path(tmp_path / "raw", "slide").unlink()
    prepared = tmp_path / "prepared"
    (prepared / "masks").mkdir(parents=True)
    settings = PrepareSettings(0.96, 256, 0.07, 1, DOWN, None)
    row = prepare_image(source, prepared / "slide.tiff", prepared / "masks" / "slide.png", settings)
    assert "label_path" not in row
    assert not prepared_label_path(prepared, "slide").exists()


def test_synthetic_set_prepares_its_masks(tmp_path):
    params = build_params(
        {
            "experiment": "masks",
            "run": {"num_workers": 0, "out_dir": str(tmp_path / "runs")},
            "data": {
                "source": "synthetic",
                "panda_dir": str(tmp_path / "raw"),
                "prepared_dir": str(tmp_path / "prepared"),
                "input_size": 256,
                "synthetic_images": 10,
                "synthetic_size": 512,
                "tissue_downsample": DOWN,
                "tissue_min_object_px": 1,
            },
        }
    )
    manifest = prepare_dataset(params, progress=False)
    assert (manifest["status"] == "ok").all()
    for row in manifest.itertuples():
        labels = read_label_mask(tmp_path / "prepared" / row.label_path)
        assert labels.shape == (256, 256)
        assert (labels >= 3).any() == bool(parse_gleason(row.gleason_score)[0])
        assert row.tumour_fraction == pytest.approx((labels >= 3).mean())
    saved = pd.read_csv(tmp_path / "prepared" / "manifest.csv")
    assert saved["label_path"].notna().all()

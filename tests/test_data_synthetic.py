"""repro.data.synthetic: the PANDA-format synthetic set."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import pyvips

from repro.data.prepare import parse_gleason
from repro.data.slides import open_slide
from repro.data.synthetic import generate_synthetic_panda, render_biopsy, synthetic_cases


@pytest.fixture(scope="module")
def raw_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return generate_synthetic_panda(root, n_images=12, size=512, seed=7)


def test_layout_labels_and_class_balance(raw_set):
    table = pd.read_csv(raw_set / "train.csv", dtype={"image_id": str})
    assert list(table.columns) == ["image_id", "data_provider", "isup_grade", "gleason_score"]
    assert len(table) == 12 and table["image_id"].is_unique
    assert (table["data_provider"] == "radboud").all()
    parsed = [parse_gleason(score) for score in table["gleason_score"]]
    labels = [label for label, _ in parsed]
    patterns = {pattern for _, pattern in parsed}
    assert labels.count(0) == 4  # a third negatives
    assert patterns == {0, 3, 4, 5}
    assert ((table["isup_grade"] == 0) == (np.array(labels) == 0)).all()
    for image_id in table["image_id"]:
        assert (raw_set / "train_images" / f"{image_id}.tiff").exists()


def test_slides_are_pyramidal_with_resolution_tags(raw_set):
    path = next((raw_set / "train_images").glob("*.tiff"))
    slide = open_slide(path)
    assert slide.mpp == pytest.approx(0.48, rel=1e-3)
    assert slide.dimensions == (512, 256)
    assert len(slide.levels) >= 2
    image = pyvips.Image.new_from_file(str(path))
    assert image.get("tile-width") == 256


def test_deterministic_and_idempotent(raw_set, tmp_path):
    again = generate_synthetic_panda(tmp_path / "again", n_images=12, size=512, seed=7)
    first = sorted((raw_set / "train_images").glob("*.tiff"))
    second = sorted((again / "train_images").glob("*.tiff"))
    assert [p.name for p in first] == [p.name for p in second]
    assert first[0].read_bytes() == second[0].read_bytes()
    mtimes = {p: p.stat().st_mtime_ns for p in second}
    generate_synthetic_panda(again, n_images=12, size=512, seed=7)  # nothing to do
    assert {p: p.stat().st_mtime_ns for p in second} == mtimes
    with pytest.raises(ValueError, match="delete the folder"):
        generate_synthetic_panda(again, n_images=12, size=512, seed=8)


def test_missing_image_is_regenerated(raw_set, tmp_path):
    root = generate_synthetic_panda(tmp_path / "partial", n_images=12, size=512, seed=7)
    victim = sorted((root / "train_images").glob("*.tiff"))[3]
    victim.unlink()
    (root / "train_images" / f".{victim.name}.x1y2.tmp").write_bytes(b"half")
    generate_synthetic_panda(root, n_images=12, size=512, seed=7)
    assert victim.read_bytes() == (raw_set / "train_images" / victim.name).read_bytes()
    assert not list((root / "train_images").glob(".*.tmp"))


def test_seed_changes_the_set():
    first = synthetic_cases(30, seed=0)
    second = synthetic_cases(30, seed=1)
    assert [c.image_id for c in first] != [c.image_id for c in second]
    assert sorted(c.primary for c in first) == sorted(c.primary for c in second)


def test_tumour_is_small_local_and_dark():
    """Tumour: a few percent of the tissue at demo size, darker than benign tissue (which holds
    mimics as dark as tumour since the mimics of issue 13; before, tumour was the only dark)."""
    fractions = []
    for index, (primary, secondary) in enumerate([(3, 3), (3, 4), (4, 4), (4, 5), (5, 5)]):
        rng = np.random.default_rng([0, index])
        pixels, tissue, tumour = render_biopsy(rng, 768, 384, primary, secondary, True)
        assert pixels.shape == (384, 768, 3) and pixels.dtype == np.uint8
        assert tumour.any() and not (tumour & ~tissue).any()
        fractions.append(tumour.sum() / tissue.sum())
        benign = pixels[tissue & ~tumour].astype(float).mean(0)
        cancer = pixels[tumour].astype(float).mean(0)
        assert cancer.sum() < benign.sum() - 100  # darker
        assert cancer[2] > cancer[1]  # blue-purple
        assert 0.02 < tissue.mean() < 0.7  # background left to trim
    assert max(fractions) < 0.2 and np.median(fractions) < 0.12
    rng = np.random.default_rng([0, 99])
    _, _, none = render_biopsy(rng, 768, 384, 0, 0, True)
    assert not none.any()


def test_patterns_look_different():
    """Per pattern, the tumour's lumen (near-white) share and darkness differ."""
    stats = {}
    for pattern in (3, 4, 5):
        pixels, _, tumour = render_biopsy(
            np.random.default_rng(5), 768, 384, pattern, pattern, True
        )
        values = pixels[tumour].astype(float)
        stats[pattern] = ((values.min(1) > 200).mean(), values.mean())
    assert stats[5][0] < 0.01 < stats[4][0]  # pattern 5: no lumina
    assert stats[5][1] < stats[3][1]  # pattern 5: darkest


def test_label_masks_in_pandas_layout(raw_set):
    """train_label_masks/<id>_mask.tiff: the slide's pyramid, Radboud values in the red channel,
    tumour (>= 3) exactly in the cancers."""
    from repro.data.masks import label_mask_path, read_label_mask

    table = pd.read_csv(raw_set / "train.csv", dtype={"image_id": str})
    for image_id, score in zip(table["image_id"], table["gleason_score"], strict=True):
        path = label_mask_path(raw_set, image_id)
        slide = open_slide(raw_set / "train_images" / f"{image_id}.tiff")
        mask = open_slide(path)
        assert [(lv.width, lv.height) for lv in mask.levels] == [
            (lv.width, lv.height) for lv in slide.levels
        ]
        rgb = pyvips.Image.new_from_file(str(path)).numpy()
        assert rgb.shape[2] == 3 and not rgb[..., 1:].any()  # label in red, like PANDA
        labels = read_label_mask(path)
        values = set(np.unique(labels).tolist())
        assert values <= {0, 1, 2, 3, 4, 5} and {0, 1, 2} <= values
        label, primary = parse_gleason(score)
        assert (labels >= 3).any() == bool(label)
        if label:
            assert primary in values
        smallest = read_label_mask(path, level=-1)
        assert set(np.unique(smallest).tolist()) <= values  # nearest neighbour: no blends


def test_mimics_match_tumour_in_colour_not_in_architecture():
    """A mimic is the tumour's texture with its blocks shuffled: the same colours (exactly),
    a different arrangement; negatives carry mimics, labelled stroma."""
    from repro.data.synthetic import MIMIC_BLOCK, _shuffle_blocks, render_case

    pixels, labels = render_case(np.random.default_rng(3), 768, 384, 0, 0)
    dark = (labels == 1) & (pixels.astype(int).sum(axis=2) < 450)
    assert dark.sum() > 500 and not (labels >= 3).any()

    pixels, labels = render_case(np.random.default_rng(4), 768, 384, 3, 3)
    tumour = labels == 3
    image = pixels.astype(np.float32)
    mimic = image.copy()
    _shuffle_blocks(np.random.default_rng(0), mimic, tumour, MIMIC_BLOCK)
    assert (mimic[~tumour] == image[~tumour]).all()
    before, after = image[tumour].reshape(-1, 3), mimic[tumour].reshape(-1, 3)
    assert (np.sort(before, axis=0) == np.sort(after, axis=0)).all()  # same colours
    assert np.abs(after - before).mean() > 20  # moved

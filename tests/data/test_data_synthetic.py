"""repro.data.synthetic: the PANDA-format synthetic set."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import pyvips
from scipy import ndimage

from repro.data.masks import read_label_mask
from repro.data.prepare import parse_gleason
from repro.data.slides import open_slide
from repro.data.synthetic import (
    CONTEXT_FOCUS,
    CONTEXT_GAP,
    _context_regions,
    _rearrange_as_mimic,
    generate_synthetic_panda,
    render_biopsy,
    render_case,
    synthetic_cases,
)
from repro.layout import PandaLayout


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
    raw = PandaLayout(root)
    victim = sorted(raw.images.glob("*.tiff"))[3]
    victim.unlink()
    (raw.images / f".{victim.name}.x1y2.tmp").write_bytes(b"half")
    mask = sorted(raw.label_masks.glob("*.tiff"))[5]
    mask.unlink()
    generate_synthetic_panda(root, n_images=12, size=512, seed=7)
    assert victim.read_bytes() == (raw_set / "train_images" / victim.name).read_bytes()
    assert mask.read_bytes() == (raw_set / "train_label_masks" / mask.name).read_bytes()
    assert not list(raw.images.glob(".*.tmp"))


def test_seed_changes_the_set():
    first = synthetic_cases(30, seed=0)
    second = synthetic_cases(30, seed=1)
    assert [c.image_id for c in first] != [c.image_id for c in second]
    assert sorted(c.primary for c in first) == sorted(c.primary for c in second)


def test_tumour_is_small_local_and_dark():
    """Tumour: a few percent of the tissue at demo size, much darker than benign tissue."""
    fractions = []
    for index, (primary, secondary) in enumerate([(3, 3), (3, 4), (4, 4), (4, 5), (5, 5)]):
        rng = np.random.default_rng([0, index])
        pixels, tissue, tumour = render_biopsy(rng, 768, 384, primary, secondary, True)
        assert pixels.shape == (384, 768, 3) and pixels.dtype == np.uint8
        assert tumour.any() and not (tumour & ~tissue).any()
        fractions.append(tumour.sum() / tissue.sum())
        benign = pixels[tissue & ~tumour].astype(float).mean(0)
        cancer = pixels[tumour].astype(float).mean(0)
        assert cancer.sum() < benign.sum() - 150  # clearly darker
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
    tumour (>= 3) exactly in the cancers, nearest neighbour on every page."""
    raw = PandaLayout(raw_set)
    table = pd.read_csv(raw.labels, dtype={"image_id": str})
    for image_id, score in zip(table["image_id"], table["gleason_score"], strict=True):
        slide, mask = open_slide(raw.image(image_id)), open_slide(raw.label_mask(image_id))
        sizes = [(lv.width, lv.height) for lv in slide.levels]
        assert [(lv.width, lv.height) for lv in mask.levels] == sizes
        assert sizes == [(512, 256), (128, 64), (32, 16)]  # PANDA: 1, 1/4, 1/16
        rgb = pyvips.Image.new_from_file(str(raw.label_mask(image_id))).numpy()
        assert rgb.shape[2] == 3 and not rgb[..., 1:].any()  # label in red, like PANDA
        labels = read_label_mask(raw.label_mask(image_id))
        values = set(np.unique(labels).tolist())
        assert values <= {0, 1, 2, 3, 4, 5} and {0, 1, 2} <= values
        label, primary = parse_gleason(score)
        assert (labels >= 3).any() == bool(label)
        assert not label or primary in values
        assert set(np.unique(read_label_mask(raw.label_mask(image_id), level=-1))) <= values


def test_a_set_from_before_the_tasks_is_plain(raw_set, tmp_path):
    root = generate_synthetic_panda(tmp_path / "old", n_images=12, size=512, seed=7)
    info = root / "synthetic.json"
    info.write_text(json.dumps({"n_images": 12, "size": 512, "seed": 7, "version": 1}))
    generate_synthetic_panda(root, n_images=12, size=512, seed=7, task="plain")
    with pytest.raises(ValueError, match="delete the folder"):
        generate_synthetic_panda(root, n_images=12, size=512, seed=7, task="local")
    with pytest.raises(ValueError, match="task must be one of"):
        generate_synthetic_panda(tmp_path / "x", n_images=12, size=512, seed=7, task="global")


def test_mimics_match_tumour_in_colour_not_in_architecture():
    """Local task: a mimic is the tumour's own pixels rearranged (the same colours exactly),
    with its light pixels along its border and none beside a dark one, where tumour lines its
    lumina, inside the region, with dark nuclei; negatives carry mimics, labelled stroma."""
    pixels, labels = render_case(np.random.default_rng(3), 768, 384, 0, 0, "local")
    dark = (labels == 1) & (pixels.astype(int).sum(axis=2) < 450)
    assert dark.sum() > 500 and not (labels >= 3).any()

    def light_beside_dark(image: np.ndarray, region: np.ndarray) -> int:
        lightness = image.mean(axis=2)
        near_dark = ndimage.binary_dilation(lightness < 0.35, iterations=2)
        return int((region & (lightness > 0.8) & near_dark).sum())

    for pattern, seed in ((3, 4), (4, 5), (5, 6)):
        pixels, labels = render_case(np.random.default_rng(seed), 768, 384, pattern, pattern, "local")
        tumour = labels == pattern
        image = pixels.astype(np.float32) / 255  # as drawn: RGB in [0, 1]
        mimic = image.copy()
        _rearrange_as_mimic(np.random.default_rng(0), mimic, tumour)
        assert (mimic[~tumour] == image[~tumour]).all()
        before, after = image[tumour].reshape(-1, 3), mimic[tumour].reshape(-1, 3)
        assert (np.sort(before, axis=0) == np.sort(after, axis=0)).all()  # same colours
        assert np.abs(after - before).mean() > 0.08  # moved
        inner = ndimage.binary_erosion(tumour, iterations=3)  # away from the region's border
        assert light_beside_dark(image, inner) > 20, pattern  # tumour: lumina lined by nuclei
        assert light_beside_dark(mimic, inner) == 0, pattern
        depth = ndimage.distance_transform_edt(tumour)
        lumen_depths = [depth[tumour & (im.mean(axis=2) > 0.8)] for im in (image, mimic)]
        assert (lumen_depths[0] > 3).sum() > 20, pattern  # tumour: lumina inside the region
        assert lumen_depths[1].size == lumen_depths[0].size and (lumen_depths[1] <= 3).all()


def test_context_foci_apart_or_fused_inside_a_whole_fragment():
    """Context task: benign, two foci at least CONTEXT_GAP x the height apart; cancer, one focus
    about twice as long and of about the same area, labelled with its pattern; the fragment lies
    whole inside the image (no tissue on its border)."""
    height, width = 192, 384
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    areas, lengths = {False: [], True: []}, {False: [], True: []}
    for index in range(12):
        cancer = bool(index % 2)
        pattern = 4 if cancer else 0
        rng = np.random.default_rng([9, index])
        _, labels = render_case(rng, width, height, pattern, pattern, "context")
        tissue = labels > 0
        assert not (tissue[[0, -1]].any() or tissue[:, [0, -1]].any())
        assert (labels >= 3).any() == cancer
        regions = _context_regions(rng, xx, yy, tissue, cancer)
        assert len(regions) == (1 if cancer else 2)
        if not cancer:
            gap = ndimage.distance_transform_edt(~regions[0])[regions[1]].min()
            assert gap >= 0.7 * CONTEXT_GAP * height  # noisy edges take a little
        for region in regions:
            columns = np.nonzero(region.any(axis=0))[0]
            lengths[cancer].append(columns.max() - columns.min())
        areas[cancer].append(sum(region.sum() for region in regions))
    assert np.mean(areas[True]) == pytest.approx(np.mean(areas[False]), rel=0.25)
    assert np.mean(lengths[True]) > 1.6 * np.mean(lengths[False])
    assert np.mean(lengths[False]) == pytest.approx(CONTEXT_FOCUS * height, rel=0.2)

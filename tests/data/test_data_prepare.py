"""repro.data.prepare: labels, trimming, padding/cropping, the manifest, failures and resuming."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pyvips

from repro.data.prepare import (
    OK,
    PrepareSettings,
    _prepare_one,
    _run_tasks,
    _Task,
    parse_gleason,
    prepare_dataset,
    prepare_image,
    read_labels,
)
from repro.data.synthetic import generate_synthetic_panda, write_slide
from repro.layout import PreparedLayout

SIZE = 256
DOWN = 8


@pytest.fixture
def prepare_params(make_params):
    """``prepare_params(raw, prepared, workers=0, **data)``: PANDA-format slides in ``raw``
    prepared at 256 px into ``prepared``, masks at 1/8."""

    def make(raw: Path, prepared: Path, workers: int = 0, **data):
        return make_params(
            prepared.parent,
            run={"num_workers": workers},
            data={
                "source": "panda",
                "panda_dir": str(raw),
                "prepared_dir": str(prepared),
                "input_size": SIZE,
                "tissue_downsample": DOWN,
                **data,
            },
        )

    return make


def _settings(input_size: int = SIZE) -> PrepareSettings:
    return PrepareSettings(0.96, input_size, 0.07, 1, DOWN, None)


# ----------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    ("score", "expected"),
    [("negative", (0, 0)), ("0+0", (0, 0)), (" 3+4 ", (1, 3)), ("4+3", (1, 4)), ("5+5", (1, 5))],
)
def test_parse_gleason(score, expected):
    assert parse_gleason(score) == expected


@pytest.mark.parametrize("score", ["3+0", "2+3", "x", "", None, "4+6"])
def test_parse_gleason_rejects(score):
    with pytest.raises(ValueError, match="unknown gleason_score"):
        parse_gleason(score)


def test_read_labels_filters_provider_and_reports_bad_rows(tmp_path, caplog):
    csv = tmp_path / "train.csv"
    pd.DataFrame(
        {
            "image_id": ["a", "b", "c", "d", "e", "f"],
            "data_provider": ["radboud", "radboud", "karolinska", "radboud", "radboud", "Radboud"],
            "isup_grade": [0, 3, 0, 2, 0, 5],
            "gleason_score": ["negative", "4+3", "0+0", "weird", "3+3", "5+5"],
        }
    ).to_csv(csv, index=False)
    with caplog.at_level(logging.WARNING):
        labels = read_labels(csv, "radboud")
    assert list(labels["image_id"]) == ["a", "b", "d", "e", "f"]
    by_id = labels.set_index("image_id")
    assert (by_id.loc["a", "label"], by_id.loc["a", "primary_pattern"]) == (0, 0)
    assert (by_id.loc["b", "label"], by_id.loc["b", "primary_pattern"]) == (1, 4)
    assert by_id.loc["d", "status"] == "unknown gleason_score 'weird'"
    assert by_id.loc["e", "status"].startswith("inconsistent labels")
    assert by_id.loc["f", "status"] == OK
    assert "weird" in caplog.text
    assert len(read_labels(csv, "all")) == 6
    with pytest.raises(ValueError, match="no rows of data_provider"):
        read_labels(csv, "nobody")


# ----------------------------------------------------------------------------- one image


def _rectangle_slide(path: Path, rows: slice, cols: slice, shape=(512, 1024)) -> None:
    array = np.full((*shape, 3), 246, np.uint8)  # off-white glass
    array[rows, cols] = (225, 140, 185)
    write_slide(array, path, 0.48)


def _tissue_box(image: np.ndarray) -> tuple[int, int, int, int]:
    tissue = (image.astype(int).max(2) - image.astype(int).min(2)) > 40
    rows, cols = np.flatnonzero(tissue.any(1)), np.flatnonzero(tissue.any(0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def test_trim_and_pad_centres_the_tissue(tmp_path):
    source = tmp_path / "slide.tiff"
    _rectangle_slide(source, slice(100, 300), slice(200, 700))  # 100 x 250 px at 0.96
    out = prepare_image(source, tmp_path / "out.tiff", tmp_path / "out.png", _settings())
    image = pyvips.Image.new_from_file(str(tmp_path / "out.tiff"))
    assert (image.width, image.height, image.bands) == (SIZE, SIZE, 3)
    assert image.xres == pytest.approx(1000 / 0.96, rel=1e-3)
    pixels = image.numpy()
    top, bottom, left, right = _tissue_box(pixels)
    assert abs((top + bottom) / 2 - SIZE / 2) <= DOWN
    assert abs((left + right) / 2 - SIZE / 2) <= DOWN
    assert bottom - top == pytest.approx(100, abs=2) and right - left == pytest.approx(250, abs=2)
    assert (pixels[:8] == 255).all()  # padding is white
    assert out["fits"] and out["tissue_kept"] == 1.0
    assert (out["scaled_width"], out["scaled_height"]) == (512, 256)
    assert out["trim_width"] <= 256 and out["trim_height"] < 120
    # The mask lines up with the image.
    mask = pyvips.Image.new_from_file(str(tmp_path / "out.png")).numpy() > 127
    assert mask.shape == (SIZE // DOWN, SIZE // DOWN)
    mask_rows, mask_cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    assert (
        abs(mask_rows[0] * DOWN - top) <= DOWN and abs((mask_rows[-1] + 1) * DOWN - bottom) <= DOWN
    )
    assert abs(mask_cols[0] * DOWN - left) <= DOWN
    assert out["tissue_fraction"] == pytest.approx(mask.mean())


def test_too_large_tissue_is_centre_cropped(tmp_path):
    source = tmp_path / "big.tiff"
    _rectangle_slide(source, slice(100, 300), slice(100, 900))
    pixels_source = pyvips.Image.new_from_file(str(source)).numpy()
    pixels_source[100:300, 100:500] = (150, 60, 160)  # left half darker, to see which part stays
    write_slide(pixels_source, source, 0.48)
    out = prepare_image(source, tmp_path / "out.tiff", tmp_path / "out.png", _settings(128))
    pixels = pyvips.Image.new_from_file(str(tmp_path / "out.tiff")).numpy()
    assert pixels.shape == (128, 128, 3)
    assert not out["fits"] and 0.2 < out["tissue_kept"] < 0.6
    assert out["offset_x"] < 0
    # Centre crop: the middle of the tissue (the dark/light boundary) is near the middle.
    dark = pixels[64, :, 1] < 100
    boundary = np.flatnonzero(np.diff(dark.astype(int)))[0]
    assert abs(boundary - 64) <= DOWN


def test_blank_slide_is_a_no_tissue_failure(tmp_path):
    source = tmp_path / "blank.tiff"
    write_slide(np.full((256, 512, 3), 245, np.uint8), source, 0.48)
    task = _Task("blank", str(source), str(tmp_path), _settings())
    prepared = PreparedLayout(tmp_path)
    for folder in (prepared.images, prepared.masks, prepared.records):
        folder.mkdir()
    assert "no tissue found" in _prepare_one(task)["status"]
    assert not prepared.image("blank").exists()


# ----------------------------------------------------------------------------- the dataset


@pytest.fixture
def raw_with_problems(tmp_path):
    """A small raw set plus one missing, one truncated, one non-image file and an unknown grade."""
    raw = generate_synthetic_panda(tmp_path / "raw", n_images=6, size=512, seed=3)
    table = pd.read_csv(raw / "train.csv", dtype={"image_id": str})
    good = raw / "train_images" / f"{table['image_id'][0]}.tiff"
    (raw / "train_images" / "truncated.tiff").write_bytes(good.read_bytes()[:5000])
    (raw / "train_images" / "text.tiff").write_text("not an image")
    (raw / "train_images" / "ungraded.tiff").write_bytes(good.read_bytes())
    extra = pd.DataFrame(
        {
            "image_id": ["missing", "truncated", "text", "ungraded"],
            "data_provider": "radboud",
            "isup_grade": [1, 2, 0, 9],
            "gleason_score": ["3+3", "3+4", "negative", "6+6"],
        }
    )
    pd.concat([table, extra]).to_csv(raw / "train.csv", index=False)
    return raw, list(table["image_id"])


def test_failures_are_recorded_and_the_run_goes_on(raw_with_problems, tmp_path, prepare_params):
    raw, good_ids = raw_with_problems
    params = prepare_params(raw, tmp_path / "prepared")
    manifest = prepare_dataset(params, progress=False)
    status = manifest.set_index("image_id")["status"]
    assert (status[good_ids] == OK).all()
    assert status["missing"].startswith("missing image")
    assert "truncated.tiff" in status["truncated"] and "truncated" in status["truncated"]
    assert "text.tiff" in status["text"] and "not an image" in status["text"]
    assert status["ungraded"] == "unknown gleason_score '6+6'"
    written = pd.read_csv(params.prepared.manifest, dtype={"image_id": str})
    assert list(written["image_id"]) == list(manifest["image_id"])
    ok = written.loc[written["status"] == OK]
    assert (ok["width"] == SIZE).all() and (ok["height"] == SIZE).all()
    assert set(ok["label"]) <= {0, 1} and set(ok["primary_pattern"]) <= {0, 3, 4, 5}
    assert (ok["mask_downsample"] == DOWN).all()
    assert ok["tissue_fraction"].between(0.01, 0.9).all()
    for row in ok.itertuples():
        assert (tmp_path / "prepared" / row.path).exists()
        assert (tmp_path / "prepared" / row.mask_path).exists()
    assert not list((tmp_path / "prepared").rglob(".*.tmp"))


def test_rerun_skips_finished_and_redoes_partial(raw_with_problems, tmp_path, prepare_params):
    raw, good_ids = raw_with_problems
    prepared = tmp_path / "prepared"
    params = prepare_params(raw, prepared)
    prepare_dataset(params, progress=False)
    images = {image_id: params.prepared.image(image_id) for image_id in good_ids}
    mtimes = {image_id: path.stat().st_mtime_ns for image_id, path in images.items()}

    manifest = prepare_dataset(params, progress=False)  # nothing to do
    assert {i: p.stat().st_mtime_ns for i, p in images.items()} == mtimes
    assert (manifest.set_index("image_id").loc[good_ids, "status"] == OK).all()

    # Simulate an interrupted run: one image's record missing and a stale temporary file, one
    # image whose TIFF was truncated after the record was written.
    params.prepared.record(good_ids[1]).unlink()
    (params.prepared.images / f".{good_ids[1]}.tiff.x1y2.tmp").write_bytes(b"half written")
    damaged = images[good_ids[2]]
    damaged.write_bytes(damaged.read_bytes()[:3000])
    manifest = prepare_dataset(params, progress=False)
    assert (manifest.set_index("image_id").loc[good_ids, "status"] == OK).all()
    redone = {i for i, p in images.items() if p.stat().st_mtime_ns != mtimes[i]}
    assert redone == {good_ids[1], good_ids[2]}
    assert not list(prepared.rglob(".*.tmp"))

    # Changing a preparation setting redoes every image.
    other = prepare_params(raw, prepared, tissue_saturation=0.08)
    prepare_dataset(other, progress=False)
    assert all(p.stat().st_mtime_ns != mtimes[i] for i, p in images.items())


def _crash_once(task: _Task) -> dict:
    """Worker that dies (like a killed process) the first time it sees a marked image."""
    marker = Path(task.prepared_dir) / f"crash-{task.image_id}"
    if marker.exists():
        marker.unlink()
        os._exit(1)
    return _prepare_one(task)


def test_dead_worker_is_survived_in_parallel(raw_with_problems, tmp_path, caplog):
    raw, good_ids = raw_with_problems
    prepared = tmp_path / "prepared"
    layout = PreparedLayout(prepared)
    for folder in (layout.images, layout.masks, layout.records):
        folder.mkdir(parents=True)
    (prepared / f"crash-{good_ids[0]}").write_text("")
    tasks = [
        _Task(i, str(raw / "train_images" / f"{i}.tiff"), str(prepared), _settings())
        for i in good_ids
    ]
    results = {}
    with caplog.at_level(logging.WARNING):
        _run_tasks(tasks, 2, results.__setitem__, progress=False, function=_crash_once)
    assert "worker died" in caplog.text
    assert set(results) == set(good_ids)
    assert all(result["status"] == OK for result in results.values())
    record = json.loads(layout.record(good_ids[0]).read_text())
    assert record["row"]["status"] == OK


def test_parallel_prepare_matches_serial(raw_with_problems, tmp_path, prepare_params):
    raw, _ = raw_with_problems
    serial = prepare_dataset(prepare_params(raw, tmp_path / "serial"), progress=False)
    parallel = prepare_dataset(
        prepare_params(raw, tmp_path / "parallel", workers=2), progress=False
    )
    pd.testing.assert_frame_equal(serial, parallel)


def test_synthetic_source_generates_the_raw_set(tmp_path, make_params):
    params = make_params(
        tmp_path,
        run={"seed": 1},
        data={"input_size": 192, "synthetic_images": 10, "synthetic_size": 384},
    )
    manifest = prepare_dataset(params, progress=False)
    assert len(manifest) == 10 and (manifest["status"] == OK).all()
    assert (tmp_path / "raw" / "train.csv").exists()
    assert set(manifest["primary_pattern"]) == {0, 3, 4, 5}

"""A dataset of your own, from a CSV, through the real notebooks 01-07 on smoke-sized settings.

The test writes 24 slides: generic tiled TIFFs (read with pyvips) and SVS-like Aperio files with
a stripped thumbnail and a label page (read with OpenSlide), in two folders, most of them with a
``patient_id`` shared by two or three slides. After the run no patient may be in two splits.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import pyvips
import yaml

from repro.config import PROJECT_ROOT
from repro.data.synthetic import render_biopsy
from repro.data.tiff import join_pages
from repro.layout import PreparedLayout, RunLayout
from repro.pipeline.runner import run_pipeline

MPP = 0.48
APERIO = "Aperio Image Library v12.0.15"
TILE = {"tile": True, "tile_width": 128, "tile_height": 128, "compression": "jpeg", "Q": 90}


def _with_description(image: pyvips.Image, text: str) -> pyvips.Image:
    image = image.copy()
    image.set_type(pyvips.GValue.gstr_type, "image-description", text)
    return image


def write_generic_tiff(image: pyvips.Image, path) -> None:
    """A tiled pyramidal TIFF with resolution tags, as many scanners' converters write."""
    image.tiffsave(str(path), pyramid=True, xres=1000 / MPP, yres=1000 / MPP, **TILE)


def write_svs_like(image: pyvips.Image, path) -> None:
    """An Aperio-style SVS: tiled level 0, a stripped thumbnail, a tiled 1/4 level and a label
    page, the MPP in the description (the resolution tags say nothing)."""
    width, height = image.width, image.height
    head = f"{APERIO}\n{width}x{height} [0,0 {width}x{height}] (128x128) JPEG/RGB Q=90"
    quarter = image.shrink(4, 4)
    thumbnail = image.resize(0.125)
    label = pyvips.Image.black(120, 100, bands=3).copy(interpretation="srgb") + 200
    pages = [
        (_with_description(image, f"{head}|AppMag = 20|MPP = {MPP}"), TILE),
        (_with_description(thumbnail, f"{head} -> {thumbnail.width}x{thumbnail.height}"), {}),
        (_with_description(quarter, f"{head} -> {quarter.width}x{quarter.height}"), TILE),
        (_with_description(label.cast("uchar"), f"{APERIO}\nlabel 120x100"), {}),
    ]
    files = []
    for index, (page, options) in enumerate(pages):
        name = path.with_name(f"{path.stem}.page{index}.tif")
        page.tiffsave(str(name), **options)
        files.append(name)
    join_pages(files, path, subfile_types=[0, 0, 0, 1])
    for name in files:
        name.unlink()


@pytest.fixture
def csv_dataset(tmp_path):
    """24 slides, 14 patients; returns the CSV path."""
    rng = np.random.default_rng(12)
    patients = [f"P{i:02d}" for i in range(6) for _ in range(2)]  # six patients, two slides
    patients += [f"Q{i}" for i in range(2) for _ in range(3)]  # two patients, three slides
    patients += [""] * 6  # six slides without a patient id (one patient each)
    labels = [int(i % 2 == 1) for i in range(6) for _ in range(2)]
    labels += [0, 0, 0, 1, 1, 1]  # the three-slide patients
    labels += [0, 1, 0, 1, 0, 1]  # the single slides
    rows = []
    for index, (patient, label) in enumerate(zip(patients, labels, strict=True)):
        pattern = (3, 4, 5)[index % 3] if label else 0
        pixels = render_biopsy(rng, 384, 192, pattern)
        image = pyvips.Image.new_from_array(pixels, interpretation="srgb").resize(
            2, kernel="linear"
        )
        folder = tmp_path / ("scanner_a" if index % 2 else "scanner_b")
        folder.mkdir(exist_ok=True)
        if index % 2:
            path = folder / f"slide{index:02d}.svs"
            write_svs_like(image, path)
        else:
            path = folder / f"slide{index:02d}.tiff"
            write_generic_tiff(image, path)
        slide = str(path) if index == 0 else str(path.relative_to(tmp_path))
        rows.append({"slide": slide, "label": label, "patient_id": patient})
    csv_path = tmp_path / "dataset.csv"
    pd.DataFrame(rows).to_csv(csv_path, index=False)
    return csv_path


@pytest.mark.slow
def test_csv_dataset_through_notebooks_01_to_07(csv_dataset, tmp_path):
    params_path = tmp_path / "csv-smoke.yaml"
    params_path.write_text(
        yaml.safe_dump(
            {
                "base": str(PROJECT_ROOT / "params" / "smoke.yaml"),
                "experiment": "csv-smoke",
                "data": {
                    "source": "csv",
                    "csv_path": str(csv_dataset),
                    "prepared_dir": str(tmp_path / "prepared"),
                },
                "evaluation": {"figures_dir": str(tmp_path / "figures")},
            }
        )
    )
    run_dir = run_pipeline(params_path, out_dir=tmp_path / "runs")

    layout = RunLayout(run_dir)
    prepared = PreparedLayout(tmp_path / "prepared")
    manifest = pd.read_csv(prepared.manifest, dtype={"patient_id": str})
    assert (manifest["status"] == "ok").all(), manifest.loc[manifest["status"] != "ok", "status"]
    svs = manifest["slide"].str.endswith(".svs")
    assert (manifest.loc[svs, "backend"] == "openslide").all()
    assert (manifest.loc[~svs, "backend"] == "pyvips").all()
    assert (manifest["orig_width"] == 768).all()
    assert np.allclose(manifest["orig_mpp"], MPP, rtol=1e-5)

    splits = pd.read_csv(layout.splits, dtype={"patient_id": str})
    assert len(splits) == 24
    assert splits.groupby("patient_id")["split"].nunique().max() == 1, "a patient in two splits"
    shared = splits["patient_id"].str.match(r"^[PQ]")
    assert splits.loc[shared, "patient_id"].nunique() == 8
    for split in ("tune", "test"):
        assert set(splits.loc[splits["split"] == split, "label"]) == {0, 1}

    for notebook in sorted((PROJECT_ROOT / "notebooks").glob("0[1-7]_*.ipynb")):
        assert (run_dir / notebook.name).exists(), notebook.name
    test_ids = set(splits.loc[splits["split"] == "test", "image_id"])
    for method in ("streaming", "mil"):
        predictions = pd.read_csv(layout.method(method).predictions("test"))
        assert set(predictions["image_id"]) == test_ids
    figures = {path.name for path in (tmp_path / "figures").iterdir()}
    assert "table1_csv-smoke.md" in figures
    assert any(name.startswith("table2") for name in figures), figures
    assert "Positive (no pattern)" in (tmp_path / "figures" / "table1_csv-smoke.md").read_text()

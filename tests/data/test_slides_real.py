"""Real vendor slides (tests/data/slides/, see its README): levels, mpp, pixels equal to
OpenSlide's, JPEG 2000 through OpenSlide, errors that name the file, and a folder of mixed files
through preparation."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pytest

from repro.config import Params, build_params
from repro.data.prepare import prepare_dataset
from repro.data.slides import SlideError, open_slide
from repro.data.synthetic import render_biopsy, write_slide
from repro.data.tiff import read_directories

SLIDES = Path(__file__).parent / "slides"
CMU = SLIDES / "cmu-1-small-region.svs"
TCGA = SLIDES / "tcga-cr-7395-01a-01-ts1.svs"
BROKEN = SLIDES / "broken.svs"


@pytest.fixture
def copies(tmp_path):
    """The three files, copied to a temporary folder (they are read-only in the repository)."""
    for path in (CMU, TCGA, BROKEN):
        shutil.copy(path, tmp_path / path.name)
        (tmp_path / path.name).chmod(0o644)
    return tmp_path


def _reference(path: Path, location: tuple[int, int], level: int, size: tuple[int, int]):
    with openslide.OpenSlide(str(path)) as reference:
        rgba = np.asarray(reference.read_region(location, level, size))
    assert (rgba[:, :, 3] == 255).all()
    return rgba[:, :, :3]


def test_cmu1_one_level_with_its_mpp_and_openslide_pixels(caplog):
    with caplog.at_level(logging.INFO, logger="repro.data.slides"):
        slide = open_slide(CMU)
    assert "OpenSlide backend (format aperio)" in caplog.text, "the choice is logged"
    assert slide.backend == "openslide"
    assert slide.mpp == pytest.approx(0.499) and slide.mpp_y == pytest.approx(0.499)
    assert [(lv.width, lv.height) for lv in slide.levels] == [(2220, 2967)]
    expected = _reference(CMU, (1000, 1500), 0, (640, 480))
    np.testing.assert_array_equal(slide.read_region(1000, 1500, 640, 480), expected)
    # Forced pyvips: the same single level (thumbnail, label and macro are not levels), the
    # same mpp (Aperio description) and the same pixels.
    forced = open_slide(CMU, backend="pyvips")
    assert forced.backend == "pyvips"
    assert (forced.mpp, forced.mpp_source) == (0.499, "aperio description")
    assert [(lv.width, lv.height) for lv in forced.levels] == [(2220, 2967)]
    np.testing.assert_array_equal(forced.read_region(1000, 1500, 640, 480), expected)
    assert len(read_directories(CMU)) == 4, "the file does hold thumbnail, label and macro pages"


def test_tcga_two_levels_needs_mpp_and_decodes_jpeg2000_with_openslide(copies):
    path = copies / TCGA.name
    with pytest.raises(SlideError, match=r"tcga-cr-7395-01a-01-ts1\.svs: .*data\.mpp_override"):
        open_slide(path)
    slide = open_slide(path, mpp_override=0.5)
    assert slide.backend == "openslide"
    assert [(lv.width, lv.height) for lv in slide.levels] == [(4443, 3567), (2221, 1783)]
    assert [lv.mpp for lv in slide.levels] == pytest.approx([0.5, 0.5 * 4443 / 2221])
    level0 = slide.read_level(0).numpy()
    assert level0.shape == (3567, 4443, 3)
    np.testing.assert_array_equal(level0, _reference(path, (0, 0), 0, (4443, 3567)))
    assert level0.std() > 10, "real tissue, not a blank page"
    np.testing.assert_array_equal(
        slide.read_region(2000, 1000, 300, 200, level=1),
        _reference(path, (2000, 1000), 1, (300, 200)),
    )
    slide.close()


def test_tcga_forced_through_pyvips_fails_at_open_naming_level_and_fix(copies):
    with pytest.raises(SlideError) as error:
        open_slide(copies / TCGA.name, mpp_override=0.5, backend="pyvips")
    message = str(error.value)
    assert message.startswith(str(copies / TCGA.name))
    assert "level 0" in message and "JPEG 2000" in message and "openslide" in message


def test_broken_file_names_the_file_and_the_supported_formats():
    with pytest.raises(SlideError, match=r"broken\.svs: not an image file .*supported: .*Aperio"):
        open_slide(BROKEN)
    with pytest.raises(SlideError, match=r"broken\.svs: not a slide OpenSlide reads"):
        open_slide(BROKEN, backend="openslide")


@pytest.mark.parametrize("backend", ["openslide", "pyvips"])
def test_later_read_failure_names_file_level_and_region(copies, backend):
    path = copies / CMU.name
    slide = open_slide(path, backend=backend)
    with path.open("r+b") as handle:  # the file is damaged after it was opened
        handle.truncate(path.stat().st_size // 3)
    with pytest.raises(SlideError) as error:
        slide.read_region(0, 2500, 200, 200)
    message = str(error.value)
    assert message.startswith(f"{path}: cannot read level 0 (2220x2967), region x=0, y=2500")
    assert f"with {backend}" in message


def _csv_params(copies: Path, experiment: str, **data: object) -> Params:
    """Params that prepare ``copies/dataset.csv`` to 1024 px in this process, plus ``data``."""
    csv = {"source": "csv", "csv_path": str(copies / "dataset.csv")}
    csv |= {"prepared_dir": str(copies / "prepared"), "input_size": 1024, "tissue_downsample": 8}
    return build_params({"experiment": experiment, "data": csv | data, "run": {"num_workers": 0}})


def test_preparing_a_folder_of_mixed_files(copies):
    """PANDA-layout TIFF, CMU-1, TCGA (mpp from the CSV) and broken.svs, listed in a CSV: every
    readable one is prepared, the failure is recorded in the manifest."""
    rng = np.random.default_rng(0)
    write_slide(render_biopsy(rng, 1024, 512, 3), copies / "panda.tiff", 0.48)
    pd.DataFrame(
        {
            "slide": ["panda.tiff", CMU.name, TCGA.name, BROKEN.name, "absent.svs"],
            "label": [1, 0, 0, 1, 0],
            "mpp": [None, None, 0.5, None, None],
        }
    ).to_csv(copies / "dataset.csv", index=False)
    params = _csv_params(copies, "mixed", tissue_min_object_px=1)
    manifest = prepare_dataset(params, progress=False).set_index("image_id")
    assert list(manifest.index) == ["panda", CMU.stem, TCGA.stem, "broken", "absent"]
    ok = manifest.loc[manifest["status"] == "ok"]
    assert list(ok.index) == ["panda", CMU.stem, TCGA.stem]
    assert list(ok["backend"]) == ["pyvips", "openslide", "openslide"]
    assert ok.loc[TCGA.stem, "orig_mpp"] == 0.5 and ok.loc[CMU.stem, "orig_mpp"] == 0.499
    assert (ok[["width", "height"]] == 1024).all().all()
    for image_id in ok.index:
        assert params.prepared.image(image_id).exists()
    assert "broken.svs: not an image file" in manifest.loc["broken", "status"]
    assert "missing image" in manifest.loc["absent", "status"]
    on_disk = pd.read_csv(params.prepared.manifest).set_index("image_id")
    assert list(on_disk["status"]) == list(manifest["status"])


def test_forcing_a_backend_through_the_params(copies):
    """data.slide_backend: pyvips reads CMU-1 and records why the JPEG 2000 slide fails."""
    pd.DataFrame({"slide": [CMU.name, TCGA.name], "label": [0, 1], "mpp": [None, 0.5]}).to_csv(
        copies / "dataset.csv", index=False
    )
    params = _csv_params(copies, "forced", slide_backend="pyvips")
    manifest = prepare_dataset(params, progress=False).set_index("image_id")
    assert manifest.loc[CMU.stem, "status"] == "ok"
    assert manifest.loc[CMU.stem, "backend"] == "pyvips"
    status = manifest.loc[TCGA.stem, "status"]
    assert status.startswith(str(copies / TCGA.name)) and "level 0" in status
    assert "JPEG 2000" in status and "data.slide_backend" in status


def test_large_levels_are_decoded_in_strips_to_a_temporary_file(copies, monkeypatch):
    from repro.data import openslide_backend

    monkeypatch.setattr(openslide_backend, "IN_MEMORY_PIXELS", 0)
    monkeypatch.setattr(openslide_backend, "STRIP_BYTES", 4 * 4443 * 500)  # 500-row strips
    slide = open_slide(copies / TCGA.name, mpp_override=0.5)
    level0 = slide.read_level(0)
    folder = slide._folders[0]
    assert (folder / "level0.raw").exists()
    np.testing.assert_array_equal(level0.numpy(), _reference(TCGA, (0, 0), 0, (4443, 3567)))
    slide.close()
    assert not folder.exists(), "the temporary level file is removed on close"

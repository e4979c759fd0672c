"""CSV datasets (repro.data.sources) and per-patient / given splits (repro.data.splits)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from repro.config import ParamsError, build_params, check_data_paths
from repro.data.sources import POSITIVE, read_csv_dataset
from repro.data.splits import assign_patient_splits, make_splits, table1, table1_markdown


def _write(tmp_path, rows: dict, name: str = "dataset.csv"):
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_paths_labels_and_optional_columns(tmp_path):
    (tmp_path / "a").mkdir()
    absolute = tmp_path / "elsewhere.svs"
    path = _write(
        tmp_path,
        {
            "slide": ["a/one.tiff", str(absolute), "b/one.svs", "two.ndpi"],
            "label": [0, 1, "1", "maybe"],
            "patient_id": ["p1", "p1", "", "p2"],
            "mpp": [0.25, None, None, 0.5],
        },
    )
    rows = read_csv_dataset(path)
    assert list(rows["slide"]) == [
        str(tmp_path / "a" / "one.tiff"),
        str(absolute),
        str(tmp_path / "b" / "one.svs"),
        str(tmp_path / "two.ndpi"),
    ]
    # Names shared by two slides become their relative paths.
    assert list(rows["image_id"]) == ["a__one", "elsewhere", "b__one", "two"]
    assert list(rows["label"]) == [0, 1, 1, -1]
    assert list(rows["primary_pattern"]) == [0, POSITIVE, POSITIVE, -1]
    assert list(rows["status"][:3]) == ["ok"] * 3
    assert rows["status"][3] == "label must be 0 or 1, got 'maybe'"
    assert rows["patient_id"].isna().tolist() == [False, False, True, False]
    assert rows["mpp"].tolist()[0] == 0.25 and np.isnan(rows["mpp"][1])
    assert rows["split"].isna().all()


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ({"path": ["x.svs"], "label": [0]}, r"missing columns \['slide'\]"),
        (
            {"slide": ["x.svs", "y.svs"], "label": [0, 1], "split": ["train", ""]},
            "line 3: no split",
        ),
        ({"slide": ["x.svs"], "label": [0], "split": ["validation"]}, "split must be one of"),
        ({"slide": ["x.svs"], "label": [0], "mpp": [-1]}, "line 2: mpp must be a positive"),
        ({"slide": ["x.svs", "x.svs"], "label": [0, 1]}, "listed twice"),
    ],
)
def test_bad_csv_names_the_file(tmp_path, rows, message):
    path = _write(tmp_path, rows)
    with pytest.raises(ValueError, match=message) as error:
        read_csv_dataset(path)
    assert str(path) in str(error.value)


def test_params_name_the_csv_key(tmp_path):
    with pytest.raises(ParamsError, match=r"data\.csv_path: must name"):
        build_params({"data": {"source": "csv"}})
    with pytest.raises(ParamsError, match=r"data\.slide_backend: must be one of"):
        build_params({"data": {"slide_backend": "bioformats"}})
    params = build_params({"data": {"source": "csv", "csv_path": str(tmp_path / "none.csv")}})
    with pytest.raises(ParamsError, match=r"data\.csv_path: .*none\.csv does not exist"):
        check_data_paths(params)


def _manifest(n_patients: int, slides_per_patient: int, with_patients: bool = True):
    rng = np.random.default_rng(3)
    records = []
    for patient in range(n_patients):
        label = int(rng.random() < 0.5)
        for slide in range(slides_per_patient):
            records.append(
                {
                    "image_id": f"p{patient:02d}_s{slide}",
                    "label": label,
                    "primary_pattern": POSITIVE if label else 0,
                    "status": "ok",
                    "patient_id": f"patient-{patient}" if with_patients else np.nan,
                }
            )
    return pd.DataFrame(records)


def test_patients_are_split_not_slides():
    params = build_params({"splits": {"tune_fraction": 0.2, "test_fraction": 0.2}})
    manifest = _manifest(20, 3)
    splits = make_splits(manifest, params, write=False)
    assert splits.groupby("patient_id")["split"].nunique().max() == 1
    per_patient = splits.drop_duplicates("patient_id")["split"].value_counts()
    assert per_patient["tune"] == 4 and per_patient["test"] == 4  # 20% of 20 patients each
    for split in ("tune", "test"):
        assert set(splits.loc[splits["split"] == split, "label"]) == {0, 1}, "stratified"
    train = splits.loc[splits["split"] == "train"]
    assert sorted(train["subset_rank"]) == list(range(len(train)))
    # A patient's stratum is its highest class: one cancer slide makes a cancer patient.
    patterns = np.array([0, POSITIVE, 0, 0, 0, 0])
    patients = np.array(["a", "a", "b", "b", "c", "c"])
    split = assign_patient_splits(patterns, patients, 0.3, 0.3, seed=0)
    assert split[0] == split[1] and split[2] == split[3] and split[4] == split[5]


def test_without_patient_ids_slides_are_split_as_before():
    params = build_params({})
    manifest = _manifest(30, 1, with_patients=False)
    splits = make_splits(manifest, params, write=False)
    assert "patient_id" not in splits.columns
    reference = make_splits(manifest.drop(columns="patient_id"), params, write=False)
    pd.testing.assert_frame_equal(splits, reference)


def test_a_given_split_is_used_and_checked():
    params = build_params({})
    manifest = _manifest(6, 2)
    manifest["split"] = ["train"] * 8 + ["tune"] * 2 + ["test"] * 2
    splits = make_splits(manifest, params, write=False)
    assert list(splits["split"]) == list(manifest.sort_values("image_id")["split"])
    manifest.loc[9, "split"] = "test"  # patient 4: one slide in tune, one in test
    with pytest.raises(ValueError, match=r"patient 'patient-4' in \['test', 'tune'\]"):
        make_splits(manifest, params, write=False)


def test_table1_counts_positives_without_a_pattern():
    params = build_params({})
    splits = make_splits(_manifest(30, 1), params, write=False)
    table = table1(splits, {"subset (10)": 10})
    assert list(table["total"]) == [
        int((splits["split"] == "train").sum()),
        int((splits["split"] == "tune").sum()),
        10,
        int((splits["split"] == "test").sum()),
    ]
    assert (table["negative"] + table["positive"] == table["total"]).all()
    assert table.loc[2, "negative"] == 5, "the subset is half negatives"
    assert "Positive (no pattern)" in table1_markdown(table)

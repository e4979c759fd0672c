"""repro.pipeline.cli: the ``synth`` command (``run`` and ``train`` are covered in
tests/test_pipeline.py and tests/training/)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from repro.data.masks import read_label_mask
from repro.layout import PandaLayout
from repro.pipeline.cli import main


def test_synth_writes_the_task_asked_for(tmp_path, capsys):
    out = tmp_path / "context"
    code = main(["synth", "--out", str(out), "--images", "4", "--size", "256", "--task", "context"])
    assert code == 0
    assert "context task, 4 biopsies" in capsys.readouterr().out
    assert json.loads((out / "synthetic.json").read_text())["task"] == "context"
    raw = PandaLayout(out)
    image_ids = pd.read_csv(raw.labels, dtype={"image_id": str})["image_id"]
    for image_id in image_ids:
        assert raw.image(image_id).exists()
        assert read_label_mask(raw.label_mask(image_id)).shape == (128, 256)


def test_synth_rejects_an_unknown_task(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["synth", "--out", str(tmp_path), "--images", "4", "--size", "256", "--task", "x"])
    assert "invalid choice: 'x'" in capsys.readouterr().err

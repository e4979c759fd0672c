"""benchmarks/learnability.py runs end to end and its probe finds a label that is in the
features: plain's tumour colour, at every depth, even on a handful of small biopsies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "learnability.py"


def test_probe_reads_plain_colour_and_writes_json(tmp_path):
    out = tmp_path / "learnability.json"
    command = [sys.executable, str(BENCHMARK), "--tasks", "plain", "--images", "30"]
    command += ["--width", "256", "--threads", "1", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "plain" in done.stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert row["images"] == 30 and row["positives"] == 20
    assert min(row[stage] for stage in ("layer1", "layer2", "layer3", "layer4")) > 0.9

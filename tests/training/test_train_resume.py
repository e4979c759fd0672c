"""A streaming run killed (SIGKILL) mid-epoch and restarted ends with the same weights."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repro.io.checkpoints import load_checkpoint
from repro.layout import MethodLayout

CHILD = Path(__file__).with_name("train_child.py")
ROOT = CHILD.parents[2]  # the repository


def _run(out, *extra):
    return subprocess.run(
        [sys.executable, str(CHILD), "schedule", str(out), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _assert_killed(result):
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]


def _final(out):
    return load_checkpoint(MethodLayout(Path(out)).final)["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    result = _run(out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# 12 images per epoch (6 positives + 6 oversampled negatives), 4 per step: 3 steps per epoch;
# stage 1 has steps 1-6, stage 2 steps 7-12. Kill points count from each restart.
@pytest.mark.parametrize(
    ("checkpoint_every", "kills"),
    [
        (1, [["--kill-at-step", "2"], ["--kill-in-save", "3"], ["--kill-at-step", "5"]]),
        (0, [["--kill-at-step", "5"]]),
    ],
    ids=["last.pt-every-step", "restart-epoch"],
)
def test_killed_and_restarted_run_equals_the_uninterrupted_one(
    reference, tmp_path, checkpoint_every, kills
):
    out = tmp_path / "killed"
    files, expected_files = MethodLayout(out), MethodLayout(reference)
    every = ["--checkpoint-every", str(checkpoint_every)]
    for kill in kills:
        _assert_killed(_run(out, *every, *kill))
        assert not files.final.exists()
    if checkpoint_every:
        assert files.last_checkpoint.exists()  # it did resume mid-epoch
    result = _run(out, *every)
    assert result.returncode == 0, result.stderr[-3000:]

    expected, got = _final(reference), _final(out)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), f"{name} differs after resume"
    for stage, epoch in [(1, 2), (2, 1), (2, 2)]:
        a = load_checkpoint(expected_files.checkpoint(stage, epoch))
        b = load_checkpoint(files.checkpoint(stage, epoch))
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), (stage, epoch)
    assert files.selection.read_text() == expected_files.selection.read_text()
    assert not list(files.checkpoints.glob(".*.tmp"))  # killed writes cleaned up

"""A streaming run killed (SIGKILL) mid-epoch and restarted ends with the same weights."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repro.checkpoints import load_checkpoint

CHILD = Path(__file__).with_name("train_child.py")
ROOT = CHILD.parent.parent


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
    return load_checkpoint(Path(out) / "final.pt")["model"]


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
    every = ["--checkpoint-every", str(checkpoint_every)]
    for kill in kills:
        _assert_killed(_run(out, *every, *kill))
        assert not (out / "final.pt").exists()
    if checkpoint_every:
        assert (out / "checkpoints" / "last.pt").exists()  # it did resume mid-epoch
    result = _run(out, *every)
    assert result.returncode == 0, result.stderr[-3000:]

    expected, got = _final(reference), _final(out)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), f"{name} differs after resume"
    for stage, epoch in [(1, 2), (2, 1), (2, 2)]:
        name = f"checkpoints/stage{stage}_epoch{epoch:03d}.pt"
        a, b = load_checkpoint(reference / name), load_checkpoint(out / name)
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name
    selection = (out / "selection.json").read_text()
    assert selection == (reference / "selection.json").read_text()
    assert not list((out / "checkpoints").glob(".*.tmp"))  # killed writes cleaned up

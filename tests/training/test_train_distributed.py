"""Two processes (torch.distributed.run, gloo, CPU) take the same step as one process."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_child import tiny_model

CHILD = Path(__file__).with_name("train_child.py")
ROOT = CHILD.parents[2]  # the repository


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_step(out, processes):
    launcher = [] if processes == 1 else [
        "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, *launcher, str(CHILD), "one-step", str(out), "--batch-size", "8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return torch.load(out, weights_only=True)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_process_step_equals_one_process_step(tmp_path):
    single = _one_step(tmp_path / "single.pt", 1)
    double = _one_step(tmp_path / "double.pt", 2)
    assert (single["world_size"], double["world_size"]) == (1, 2)
    # both saw the same 8 images (each rank 4, interleaved), one optimiser step
    assert single["metrics"]["train_images"] == double["metrics"]["train_images"] == 8
    initial = tiny_model(0, torch.float64).state_dict()
    changed = 0
    for name, value in single["model"].items():
        torch.testing.assert_close(double["model"][name], value, rtol=0, atol=1e-6, msg=name)
        changed += not torch.equal(value, initial[name])
    assert changed >= 40  # the step moved (nearly) every weight tensor of the network
    for key in ("train_loss", "train_accuracy"):
        assert double["metrics"][key] == pytest.approx(single["metrics"][key], abs=1e-9)
    for key in ("tune_loss", "tune_auc", "tune_accuracy"):  # tuning set split over the ranks
        assert double["tune"][key] == pytest.approx(single["tune"][key], abs=1e-9)

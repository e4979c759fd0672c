"""repro.io.checkpoints: atomic save/load, safe loading, non-finite checks (the window pick and
weight averaging are tests/training/test_selection.py)."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

from repro.exceptions import CheckpointError
from repro.io.atomic import remove_stale_temporaries
from repro.io.checkpoints import load_checkpoint, nonfinite_tensors, save_checkpoint
from repro.training.runtime import get_rng_state, set_rng_state


def test_save_then_load_round_trips_tensors_and_plain_values(tmp_path):
    state = {
        "model": {"w": torch.randn(3, 2), "n": torch.tensor(7)},
        "epoch": 4,
        "history": [{"stage": 1, "tune_loss": 0.5, "name": "x"}],
        "rng": get_rng_state(),
    }
    path = save_checkpoint(state, tmp_path / "sub" / "a.pt")
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["history"] == state["history"]
    assert loaded["epoch"] == 4
    assert [p.name for p in path.parent.iterdir()] == ["a.pt"]


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    save_checkpoint({"rng": get_rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0])
    np.testing.assert_array_equal(expected[1], got[1])
    assert expected[2] == got[2]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = save_checkpoint({"value": torch.tensor(1.0)}, tmp_path / "c.pt")

    def broken_save(obj, stream):
        stream.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"value": torch.tensor(2.0)}, path)
    assert load_checkpoint(path)["value"].item() == 1.0
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / ".c.pt.abc.tmp").write_bytes(b"partial")
    save_checkpoint({"x": 1}, tmp_path / "c.pt")
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".c.pt.abc.tmp"]
    assert os.listdir(tmp_path) == ["c.pt"]


def test_load_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": _Unsafe()}, path)
    with pytest.raises(CheckpointError, match="cannot load"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


class _Unsafe:
    pass


def test_nonfinite_tensors_names_the_bad_ones():
    state = {"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")]), "n": torch.tensor(3)}
    assert nonfinite_tensors(state) == ["b"]
    assert list(itertools.chain(nonfinite_tensors({"a": torch.ones(1)}))) == []

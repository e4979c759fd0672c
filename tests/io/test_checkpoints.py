"""repro.checkpoints: atomic save/load, moving-average window pick, weight averaging."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

from repro.atomic import remove_stale_temporaries
from repro.checkpoints import (
    CheckpointError,
    average_state_dicts,
    load_checkpoint,
    moving_average_window,
    moving_averages,
    nonfinite_tensors,
    save_checkpoint,
)
from repro.runtime import get_rng_state, set_rng_state


def _brute_force_window(losses, window):
    """Slow reference: every window's mean, lowest first, earliest on ties."""
    best = None
    for start in range(len(losses) - window + 1):
        values = [x if np.isfinite(x) else np.inf for x in losses[start : start + window]]
        mean = sum(values) / window
        if best is None or mean < best[0]:
            best = (mean, start)
    start = best[1]
    return start, start + window, start + (window - 1) // 2


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


@pytest.mark.parametrize("window", [1, 2, 3, 5])
def test_moving_average_window_matches_brute_force(window):
    rng = np.random.default_rng(window)
    for _ in range(50):
        losses = rng.random(rng.integers(window, 12)).round(1).tolist()
        assert moving_average_window(losses, window) == _brute_force_window(losses, window)


def test_moving_average_window_paper_example():
    # epochs 1..8; the lowest 5-epoch mean is epochs 3..7 (positions 2..6), middle epoch 5
    losses = [0.9, 0.7, 0.3, 0.35, 0.2, 0.4, 0.3, 0.8]
    start, end, middle = moving_average_window(losses, 5)
    assert (start, end, middle) == (2, 7, 4)
    assert moving_averages(losses, 5)[start] == pytest.approx(np.mean(losses[2:7]))


def test_moving_average_window_ties_go_to_the_earliest_and_even_windows_to_the_earlier_middle():
    assert moving_average_window([1.0, 1.0, 1.0, 1.0], 2) == (0, 2, 0)
    assert moving_average_window([3.0, 1.0, 1.0, 3.0, 1.0, 1.0], 2) == (1, 3, 1)


def test_moving_average_window_avoids_nonfinite_losses():
    losses = [0.1, float("nan"), 0.1, 0.5, 0.5, float("inf")]
    assert moving_average_window(losses, 2) == (2, 4, 2)
    assert moving_average_window([float("nan")], 1) == (0, 1, 0)


@pytest.mark.parametrize("window", [0, 4, -1, 1.5])
def test_moving_average_window_rejects_bad_windows(window):
    with pytest.raises(ValueError, match="window"):
        moving_average_window([1.0, 2.0, 3.0], window)


def test_average_state_dicts_from_paths_and_dicts(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    states = []
    for seed in range(3):
        torch.manual_seed(seed)
        for p in module.parameters():
            torch.nn.init.normal_(p)
        states.append({k: v.clone() for k, v in module.state_dict().items()})
    paths = [save_checkpoint({"model": s}, tmp_path / f"{i}.pt") for i, s in enumerate(states)]
    averaged = average_state_dicts(paths)
    from_dicts = average_state_dicts(states)
    for name, value in averaged.items():
        assert value.dtype == states[0][name].dtype
        assert torch.equal(value, from_dicts[name])
        if value.is_floating_point():
            expected = sum(s[name].double() for s in states) / 3
            torch.testing.assert_close(value, expected.float())
        else:
            assert torch.equal(value, states[0][name])
    module.load_state_dict(averaged)


def test_average_of_one_is_the_same_weights_and_half_precision_stays_half():
    state = {"w": torch.randn(4, dtype=torch.float16)}
    assert torch.equal(average_state_dicts([state])["w"], state["w"])
    twice = average_state_dicts([state, {"w": state["w"] + 2}])
    assert twice["w"].dtype == torch.float16


def test_average_state_dicts_rejects_mismatches():
    with pytest.raises(ValueError, match="at least one"):
        average_state_dicts([])
    with pytest.raises(ValueError, match="different keys"):
        average_state_dicts([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])
    with pytest.raises(ValueError, match="shapes differ"):
        average_state_dicts([{"a": torch.zeros(1)}, {"a": torch.zeros(2)}])
    with pytest.raises(ValueError, match="integer"):
        average_state_dicts([{"n": torch.tensor(1)}, {"n": torch.tensor(2)}])


def test_nonfinite_tensors_names_the_bad_ones():
    state = {"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")]), "n": torch.tensor(3)}
    assert nonfinite_tensors(state) == ["b"]
    assert list(itertools.chain(nonfinite_tensors({"a": torch.ones(1)}))) == []

"""repro.training.selection: the moving-average window pick and weight averaging (paper IV-A)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from repro.io.checkpoints import save_checkpoint
from repro.training.selection import average_state_dicts, moving_average_window, moving_averages


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

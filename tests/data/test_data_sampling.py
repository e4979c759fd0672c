"""repro.data.sampling.BalancedSampler: oversampling, seeding, replicas."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from repro.data.sampling import BalancedSampler

LABELS = [0] * 7 + [1] * 23  # negatives are the minority, as in the paper's training set


def test_epoch_is_balanced_with_minimal_repetition():
    sampler = BalancedSampler(LABELS, seed=0)
    indices = list(sampler)
    assert len(indices) == len(sampler) == 46
    labels = [LABELS[i] for i in indices]
    assert labels.count(0) == labels.count(1) == 23
    negatives = Counter(i for i in indices if LABELS[i] == 0)
    assert set(negatives) == set(range(7))  # every negative used
    assert set(negatives.values()) <= {3, 4}  # 23 / 7: three or four times each
    positives = Counter(i for i in indices if LABELS[i] == 1)
    assert set(positives.values()) == {1}  # the majority class once each


def test_positives_oversampled_when_they_are_the_minority():
    labels = [0] * 10 + [1] * 4
    indices = list(BalancedSampler(labels, seed=0))
    assert sum(labels[i] for i in indices) == 10 and len(indices) == 20


def test_seeded_per_epoch():
    first = BalancedSampler(LABELS, seed=5)
    second = BalancedSampler(LABELS, seed=5)
    assert list(first) == list(second)
    first.set_epoch(1)
    epoch1 = list(first)
    assert epoch1 != list(second)
    second.set_epoch(1)
    assert list(second) == epoch1
    assert list(BalancedSampler(LABELS, seed=6)) != list(BalancedSampler(LABELS, seed=5))


@pytest.mark.parametrize("replicas", [2, 3, 4])
def test_replicas_split_the_epoch_without_overlap(replicas):
    samplers = [
        BalancedSampler(LABELS, seed=1, num_replicas=replicas, rank=r) for r in range(replicas)
    ]
    for sampler in samplers:
        sampler.set_epoch(3)
    shares = [list(sampler) for sampler in samplers]
    assert len({len(share) for share in shares}) == 1  # equal shares
    assert all(len(share) == len(samplers[0]) for share in shares)
    full = samplers[0].epoch_indices()
    total = len(shares[0]) * replicas
    padded = np.concatenate([full, full[: total - len(full)]])
    # Positions are disjoint and together they are the whole (padded) epoch list.
    for rank, share in enumerate(shares):
        assert share == list(padded[rank::replicas])
    assert sorted(itertools.chain(*shares)) == sorted(padded.tolist())
    assert total - len(full) < replicas


def test_single_class_and_no_oversampling():
    assert sorted(BalancedSampler([1, 1, 1], seed=0)) == [0, 1, 2]
    plain = list(BalancedSampler(LABELS, seed=0, oversample=False))
    assert sorted(plain) == list(range(30))


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        BalancedSampler(LABELS, seed=0, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="empty"):
        BalancedSampler([], seed=0)

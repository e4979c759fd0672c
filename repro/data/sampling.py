"""Samplers and loaders shared by streaming training and MIL.

:class:`BalancedSampler`: random oversampling of the minority class (paper IV-A: "we randomly
oversampled negative cases to counter the imbalance"). :func:`persistent_loader` with a
:class:`KeySampler`: one set of worker processes for a whole run, told before each pass which
items to read.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch


class BalancedSampler(torch.utils.data.Sampler[int]):
    """Each epoch, a seeded shuffle in which the minority class is oversampled to the size of the
    majority class (the paper's negatives; whichever class is smaller).

    Every minority item appears ``floor`` or ``ceil`` of (majority / minority) times per epoch
    (whole copies plus a random subset), so oversampling adds no more randomness than needed.
    With ``num_replicas > 1`` the epoch's list is padded (by repeating its start) to a multiple of
    ``num_replicas`` and rank ``r`` takes positions ``r, r + num_replicas, ...``: the ranks get
    disjoint, equal shares of the same epoch list (an oversampled image may of course appear in
    several shares). With one class only, the epoch is a plain shuffle.

    Args:
        labels: 0/1 label per dataset index (values > 0.5 count as positive).
        seed: with the epoch (``set_epoch``), determines the order; equal on every rank.
        num_replicas, rank: distributed training (``torch.distributed`` world size and rank).
        oversample: False gives a plain seeded shuffle (no balancing).
    """

    def __init__(
        self,
        labels: Sequence[float] | np.ndarray,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        oversample: bool = True,
    ) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, {num_replicas=}")
        labels = np.asarray(labels, dtype=float).ravel()
        if labels.size == 0:
            raise ValueError("labels is empty")
        self.positives = np.flatnonzero(labels > 0.5)
        self.negatives = np.flatnonzero(labels <= 0.5)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.oversample = oversample
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def epoch_size(self) -> int:
        """Length of one epoch's list over all ranks (before padding)."""
        n_pos, n_neg = len(self.positives), len(self.negatives)
        if not self.oversample or n_pos == 0 or n_neg == 0:
            return n_pos + n_neg
        return 2 * max(n_pos, n_neg)

    def __len__(self) -> int:
        return math.ceil(self.epoch_size / self.num_replicas)

    def epoch_indices(self) -> np.ndarray:
        """The whole epoch's list (all ranks), before padding and splitting."""
        rng = np.random.default_rng([self.seed, self.epoch])
        groups = [self.positives, self.negatives]
        if self.oversample and all(len(g) for g in groups):
            target = max(len(g) for g in groups)
            groups = [_repeat_to(g, target, rng) for g in groups]
        indices = np.concatenate(groups)
        return indices[rng.permutation(len(indices))]

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices()
        total = len(self) * self.num_replicas
        if total > len(indices):
            indices = np.concatenate([indices, indices[: total - len(indices)]])
        return iter(int(i) for i in indices[self.rank : total : self.num_replicas])


class KeySampler(torch.utils.data.Sampler):
    """Yields ``keys`` as they are when a pass starts: set them before each ``iter(loader)``.

    As a DataLoader's ``sampler`` the keys are item keys; as its ``batch_sampler``, batches of keys.
    """

    def __init__(self) -> None:
        self.keys: list[Any] = []

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self.keys))

    def __len__(self) -> int:
        return len(self.keys)


def persistent_loader(
    dataset: torch.utils.data.Dataset, *, num_workers: int, pin_memory: bool, **options: Any
) -> torch.utils.data.DataLoader:
    """A DataLoader whose ``num_workers`` worker processes are started once and serve every pass.

    Workers are spawned (pyvips and fork do not mix, see :mod:`repro.data.datasets`); ``options``
    (the sampler or batch sampler, ``batch_size``, ``generator``) go to the DataLoader.
    """
    return torch.utils.data.DataLoader(
        dataset,
        num_workers=num_workers,
        multiprocessing_context="spawn" if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        **options,
    )


def _repeat_to(indices: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``indices`` repeated to ``size`` items: whole copies, then a random subset."""
    copies, extra = divmod(size, len(indices))
    return np.concatenate([np.tile(indices, copies), rng.choice(indices, extra, replace=False)])

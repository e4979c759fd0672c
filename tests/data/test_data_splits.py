"""repro.data.splits: stratified seeded split, the nested Table I subsets, Table I."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest

from repro.config import build_params
from repro.data.splits import (
    PAPER_TABLE1,
    assign_splits,
    load_split,
    make_splits,
    save_table1,
    subset_ranks,
    table1,
    table1_markdown,
    table1_subsets,
)


def _manifest(counts: dict[int, int], failed: int = 0, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    patterns = np.concatenate([np.full(n, p) for p, n in counts.items()])
    patterns = patterns[rng.permutation(len(patterns))]
    frame = pd.DataFrame(
        {
            "image_id": [f"img{i:05d}" for i in range(len(patterns))],
            "label": (patterns > 0).astype(int),
            "primary_pattern": patterns,
            "isup_grade": np.where(patterns > 0, 2, 0),
            "gleason_score": [f"{p}+{p}" if p else "negative" for p in patterns],
            "status": "ok",
        }
    )
    frame.loc[: failed - 1, "status"] = "missing image"
    return frame


@pytest.fixture
def split_params(make_params, tmp_path):
    """``split_params(**splits)``: seed 3, runs under ``tmp_path``, these split settings."""
    return lambda **splits: make_params(
        experiment="t", run={"out_dir": str(tmp_path), "seed": 3}, splits=splits
    )


PANDA_LIKE = {0: 900, 3: 1800, 4: 2600, 5: 444}  # 5744 images, like the paper's total


def test_paper_proportions_give_the_paper_counts():
    patterns = np.concatenate([np.full(n, p) for p, n in PANDA_LIKE.items()])
    split = assign_splits(patterns, 497 / 5744, 535 / 5744, seed=0)
    assert Counter(split) == {"train": 4712, "tune": 497, "test": 535}


def test_split_is_stratified_disjoint_covering_and_seeded(tmp_path, split_params):
    manifest = _manifest({0: 300, 3: 200, 4: 250, 5: 50}, failed=7)
    params = split_params(tune_fraction=0.1, test_fraction=0.15)
    splits = make_splits(manifest, params)
    ok_ids = set(manifest.loc[manifest["status"] == "ok", "image_id"])
    assert set(splits["image_id"]) == ok_ids and splits["image_id"].is_unique  # covering, disjoint
    assert params.layout.splits.exists()
    overall = splits["primary_pattern"].value_counts(normalize=True)
    for name, fraction in (("tune", 0.1), ("test", 0.15)):
        part = splits.loc[splits["split"] == name]
        assert len(part) == round(len(splits) * fraction)
        shares = part["primary_pattern"].value_counts(normalize=True)
        for pattern in (0, 3, 4, 5):
            assert shares[pattern] == pytest.approx(overall[pattern], abs=0.02)
    again = make_splits(manifest.sample(frac=1, random_state=1), params, write=False)
    pd.testing.assert_frame_equal(splits, again)  # input order does not matter
    other = make_splits(manifest, _other_seed(tmp_path), write=False)
    assert not other["split"].equals(splits["split"])


def _other_seed(tmp_path):
    return build_params(
        {
            "experiment": "t",
            "run": {"out_dir": str(tmp_path), "seed": 4},
            "splits": {"tune_fraction": 0.1, "test_fraction": 0.15},
        }
    )


def test_small_sets_get_every_class_in_tune_and_test():
    patterns = np.array([0] * 8 + [3] * 7 + [4] * 6 + [5] * 3)
    split = assign_splits(patterns, 497 / 5744, 535 / 5744, seed=0)
    for name in ("tune", "test"):
        assert set(patterns[split == name]) == {0, 3, 4, 5}
    assert set(patterns[split == "train"]) == {0, 3, 4, 5}


def test_subsets_follow_table1_and_are_nested():
    patterns = np.concatenate(
        [np.full(n, p) for p, n in {0: 760, 3: 1500, 4: 2100, 5: 352}.items()]
    )
    ranks = subset_ranks(patterns, seed=0)
    assert sorted(ranks) == list(range(len(patterns)))
    for size in (250, 500):
        chosen = Counter(patterns[ranks < size])
        assert sum(chosen.values()) == size
        assert chosen[0] == size // 2  # half negatives
        positives = [chosen[p] for p in (3, 4, 5)]
        assert max(positives) - min(positives) <= 1  # equal per pattern
    assert Counter(patterns[ranks < 250]) == {0: 125, 3: 42, 4: 42, 5: 41}
    # Nested: every prefix is balanced, so every smaller subset lies inside every larger one.
    order = np.argsort(ranks)
    for k in range(1, 400):
        counts = Counter(patterns[order[:k]])
        assert counts[0] == -(-k // 2)
        assert max(counts[p] for p in (3, 4, 5)) - min(counts[p] for p in (3, 4, 5)) <= 1
    assert np.array_equal(subset_ranks(patterns, seed=0), ranks)  # stable
    assert not np.array_equal(subset_ranks(patterns, seed=1), ranks)


def test_exhausted_pattern_is_shared_by_the_others():
    patterns = np.array([0] * 20 + [3] * 10 + [4] * 10 + [5] * 2)
    ranks = subset_ranks(patterns, seed=0)
    chosen = Counter(patterns[ranks < 20])
    assert chosen == {0: 10, 3: 4, 4: 4, 5: 2}
    chosen = Counter(patterns[ranks < 36])  # negatives keep their half while they last
    assert chosen[0] == 18 and chosen[5] == 2 and abs(chosen[3] - chosen[4]) <= 1
    everything = Counter(patterns[ranks < len(patterns)])
    assert everything == Counter(patterns)


def test_load_split_applies_subset_size(tmp_path, split_params):
    manifest = _manifest({0: 60, 3: 40, 4: 40, 5: 20})
    params = split_params(tune_fraction=0.1, test_fraction=0.1)
    splits = make_splits(manifest, params)
    train = load_split(params, "train")
    assert len(train) == (splits["split"] == "train").sum()
    assert list(train["subset_rank"]) == sorted(train["subset_rank"])
    small = load_split(split_params(tune_fraction=0.1, test_fraction=0.1, subset_size=30), "train")
    assert len(small) == 30 and (small["label"] == 0).sum() == 15
    tiny = load_split(split_params(tune_fraction=0.1, test_fraction=0.1, subset_size=12), "train")
    assert set(tiny["image_id"]) < set(small["image_id"])
    tune = load_split(params, "tune")
    assert (tune["subset_rank"] == -1).all() and len(tune) == (splits["split"] == "tune").sum()
    with pytest.raises(ValueError, match="subset_size"):
        load_split(split_params(tune_fraction=0.1, test_fraction=0.1, subset_size=10**6), "train")
    with pytest.raises(ValueError, match="split must be"):
        load_split(params, "validation")


def test_table1(tmp_path, split_params):
    manifest = _manifest({0: 60, 3: 40, 4: 40, 5: 20})
    params = split_params(tune_fraction=0.1, test_fraction=0.1, subset_size=20)
    splits = make_splits(manifest, params)
    table = table1(splits, table1_subsets(params))
    assert list(table["dataset"]) == ["Training set", "Tuning set", "subset (20)", "Test set"]
    row = table.set_index("dataset").loc["subset (20)"]
    assert (row["total"], row["negative"], row["negative_pct"]) == (20, 10, 50.0)
    train = table.set_index("dataset").loc["Training set"]
    counts = train[["negative", "pattern_3", "pattern_4", "pattern_5"]]
    assert counts.sum() == train["total"] == (splits["split"] == "train").sum()
    text = table1_markdown(table, "title")
    assert "| subset (20) | 20 | 50% (10) |" in text
    assert "| Training set | 4712 | 16% | 32% | 45% | 7% |" in table1_markdown(PAPER_TABLE1)
    paths = save_table1(
        table, build_params({"experiment": "t", "evaluation": {"figures_dir": str(tmp_path)}})
    )
    assert paths["csv"].name == "table1_t.csv" and paths["md"].read_text().startswith("**Table I")
    panda = build_params({"experiment": "p"})
    assert table1_subsets(panda) == {"10% set": 500, "5% set": 250}

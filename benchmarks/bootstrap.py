"""Time of the vectorised bootstrap CI (paper IV-C: 10,000 resamples of the 535 test biopsies),
against a plain loop over :func:`sklearn.metrics.roc_auc_score` on a fraction of the resamples.

Example::

    python benchmarks/bootstrap.py --n 535 --n-bootstrap 10000
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from repro.evaluation.metrics import auc_with_ci, bootstrap_indices, paired_bootstrap_test


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=535, help="test-set size (paper: 535)")
    parser.add_argument("--n-bootstrap", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop", type=int, default=500, help="resamples timed in a plain loop")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    y_true = (rng.random(args.n) < 0.53).astype(int)  # the paper's test set: 53% cancer
    y_score = 2.5 * y_true + rng.normal(size=args.n)
    other = y_score + rng.normal(size=args.n)

    def best_of(function) -> float:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        return min(times)

    ci = best_of(lambda: auc_with_ci(y_true, y_score, args.n_bootstrap, seed=0))
    paired = best_of(lambda: paired_bootstrap_test(y_true, y_score, other, args.n_bootstrap))
    indices = bootstrap_indices(y_true, args.loop, seed=0)
    start = time.perf_counter()
    for row in indices:
        roc_auc_score(y_true[row], y_score[row])
    loop = (time.perf_counter() - start) / args.loop * args.n_bootstrap
    print(f"auc_with_ci, {args.n_bootstrap} x {args.n}: {ci:.3f} s (best of {args.repeats})")
    print(f"paired_bootstrap_test, {args.n_bootstrap} x {args.n}: {paired:.3f} s")
    print(f"plain roc_auc_score loop, extrapolated from {args.loop}: {loop:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measuring helpers the benchmark scripts share.

`python benchmarks/<name>.py` puts this folder first on `sys.path`, so the scripts import
this module as `common`; tests (run from the repository root) import `benchmarks.common`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def steady_commit_rate(commits_dir: Path, field: str, warm_up: int = 2) -> float | None:
    """Rate of a resumable job once its actors are up, from its commit markers (JSON files
    named `unit-*.json` carrying a count `field`, e.g. ingest's `audio_seconds` or the
    index build's `clips`): the count of the units committed after the first `warm_up`
    (one per actor), divided by the time from commit `warm_up` to the last. None with too
    few commits. Benchmarks report it beside the end-to-end rate, which includes starting
    the actors and loading their models."""
    commits = sorted(
        (marker.stat().st_mtime, float(json.loads(marker.read_text())[field]))
        for marker in Path(commits_dir).rglob("unit-*.json")
    )
    if len(commits) <= warm_up or commits[-1][0] <= commits[warm_up - 1][0]:
        return None
    done = sum(count for _, count in commits[warm_up:])
    return round(done / (commits[-1][0] - commits[warm_up - 1][0]), 2)


def paired_bootstrap_ci(
    arm: np.ndarray, reference: np.ndarray, n_boot: int = 10_000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Mean of `arm - reference` and its percentile bootstrap CI, paired by seed and query.

    Both arrays are [seeds, queries]: one run per seed, one metric value per test query,
    cell (s, q) of both arms measured on the same seed number and the same query. Each
    bootstrap draw resamples the seeds and, independently, the queries with replacement
    (so the interval covers both the training run's and the test set's variation), takes
    the same cells of both arms and averages their differences: draw b takes seed rows
    `seeds[b]` and query columns `queries[b]`, both drawn up front from
    `numpy.random.default_rng(seed)` in that order. Seeded: the same inputs give the same
    interval.
    """
    arm, reference = np.asarray(arm, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if arm.ndim != 2 or arm.shape != reference.shape:
        raise ValueError(
            f"arm and reference must be [seeds, queries] of one shape, got {arm.shape} and "
            f"{reference.shape}"
        )
    if arm.size == 0:
        raise ValueError("arm and reference hold no (seed, query) cell")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    diff = arm - reference
    n_seeds, n_queries = diff.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, n_seeds, (n_boot, n_seeds))
    queries = rng.integers(0, n_queries, (n_boot, n_queries))
    means = np.empty(n_boot)
    for start in range(0, n_boot, 500):
        rows = slice(start, start + 500)
        means[rows] = diff[seeds[rows, :, None], queries[rows, None, :]].mean(axis=(1, 2))
    low, high = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return {"diff": float(diff.mean()), "low": float(low), "high": float(high)}

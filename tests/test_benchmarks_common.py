"""The measuring helpers the benchmark scripts share (`benchmarks/common.py`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from benchmarks.common import paired_bootstrap_ci, steady_commit_rate


def _marker(folder: Path, unit: int, clips: int, mtime: float) -> None:
    path = folder / f"unit-{unit:06d}.json"
    path.write_text(json.dumps({"unit": unit, "clips": clips}))
    os.utime(path, (mtime, mtime))


def test_steady_rate_skips_the_warm_up_commits(tmp_path: Path) -> None:
    """Commits at t = 100, 104 (one per actor, after start-up), then 106, 108, 110 with
    3, 5, 4 clips: (3 + 5 + 4) / (110 - 104) = 2.0 clips/s. The first two units' clips
    and the time before the second commit are start-up, not steady state."""
    commits = tmp_path / "_commits" / "corpus"
    commits.mkdir(parents=True)
    for unit, (clips, mtime) in enumerate([(50, 100), (7, 104), (3, 106), (5, 108), (4, 110)]):
        _marker(commits, unit, clips, mtime)
    assert steady_commit_rate(tmp_path, "clips") == 2.0
    assert steady_commit_rate(tmp_path, "clips", warm_up=1) == round(19 / 10, 2)


def test_steady_rate_needs_commits_after_the_warm_up(tmp_path: Path) -> None:
    _marker(tmp_path, 0, 4, 100)
    _marker(tmp_path, 1, 4, 101)
    assert steady_commit_rate(tmp_path, "clips") is None


def test_paired_bootstrap_matches_the_hand_computed_distribution() -> None:
    """d[s, q] = 2s + q over 2 seeds x 2 queries. A draw's mean is the seed draw's mean of
    2s (0, 1, 2 with p 1/4, 1/2, 1/4) plus the query draw's mean of q (0, 0.5, 1, same p),
    so the bootstrap mean takes 0, 0.5, ..., 3 with p (1, 2, 3, 4, 3, 2, 1) / 16; its CDF
    is 1/16, 3/16, 6/16, 10/16, 13/16, 15/16, 1. Quantiles: 2.5% and 97.5% are 0 and 3, 10%
    and 90% are 0.5 and 2.5, 25% and 75% are 1 and 2. The reference differs per cell, so
    only the pairing makes it cancel."""
    reference = np.array([[5.0, -1.0], [0.5, 7.0]])
    arm = reference + np.array([[0.0, 1.0], [2.0, 3.0]])
    for level, (low, high) in {0.95: (0.0, 3.0), 0.8: (0.5, 2.5), 0.5: (1.0, 2.0)}.items():
        result = paired_bootstrap_ci(arm, reference, n_boot=20_000, seed=3, level=level)
        assert result == {"diff": 1.5, "low": low, "high": high}


def test_paired_bootstrap_equals_a_plain_loop_over_its_draws() -> None:
    """The vectorised draws equal one loop per draw over the same generator's indices."""
    gen = np.random.default_rng(0)
    reference = gen.random((5, 37))
    arm = reference + gen.normal(0.02, 0.1, (5, 37))
    n_boot, seed = 1_234, 11
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, 5, (n_boot, 5))
    queries = rng.integers(0, 37, (n_boot, 37))
    means = []
    for b in range(n_boot):
        total = 0.0
        for s in seeds[b]:
            for q in queries[b]:
                total += arm[s, q] - reference[s, q]
        means.append(total / (5 * 37))
    result = paired_bootstrap_ci(arm, reference, n_boot=n_boot, seed=seed)
    assert result["diff"] == pytest.approx(float((arm - reference).mean()))
    assert result["low"] == pytest.approx(float(np.quantile(means, 0.025)), abs=1e-12)
    assert result["high"] == pytest.approx(float(np.quantile(means, 0.975)), abs=1e-12)
    assert result == paired_bootstrap_ci(arm, reference, n_boot=n_boot, seed=seed)


def test_paired_bootstrap_refuses_unpaired_inputs() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(3, 2\)"):
        paired_bootstrap_ci(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap_ci(np.zeros((2, 3)), np.zeros((2, 3)), level=1.0)

"""The measuring helpers the benchmark scripts share (`benchmarks/common.py`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from benchmarks.common import steady_commit_rate


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

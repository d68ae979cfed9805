"""Measuring helpers the benchmark scripts share.

`python benchmarks/<name>.py` puts this folder first on `sys.path`, so the scripts import
this module as `common`; tests (run from the repository root) import `benchmarks.common`.
"""

from __future__ import annotations

import json
from pathlib import Path


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

"""When an ingest counts as failed, and what its failures have in common.

A bad file never stops an ingest (it becomes a row of the errors table), but a run in
which every clip failed, or more than `ingest.max_failed_share` of them, is a wrong
setting (an `audio_dir` that does not exist, credentials for another bucket), not a few
bad files: the job then exits non-zero and names its commonest errors, grouped by stage
and exception type, each with one example input.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import pyarrow.parquet as pq

from gpa_ray import storage
from gpa_ray.config import StorageConfig

MAX_ERROR_FILES = 64
"""Error tables read for the report: enough to see a pattern, bounded at any corpus size."""


def commonest_errors(
    error_files: Sequence[str], storage_cfg: StorageConfig | None = None, top: int = 3
) -> list[dict[str, Any]]:
    """The `top` commonest (stage, exception type) pairs in the first `MAX_ERROR_FILES`
    error tables: count, an example message and the input it came from."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    examples: dict[tuple[str, str], dict[str, str]] = {}
    for uri in error_files[:MAX_ERROR_FILES]:
        fs, path = storage.resolve(uri, storage_cfg)
        table = pq.read_table(path, filesystem=fs, columns=["stage", "error", "source_uri"])
        for row in table.to_pylist():
            key = (row["stage"], row["error"].split(":", 1)[0])
            counts[key] += 1
            examples.setdefault(key, {"error": row["error"], "source_uri": row["source_uri"]})
    return [
        {"stage": stage, "type": kind, "count": n, **examples[(stage, kind)]}
        for (stage, kind), n in counts.most_common(top)
    ]


def failure_message(ok: int, failed: int, max_failed_share: float) -> str | None:
    """Why the run failed as a whole, or None: every clip failed, or more than
    `max_failed_share` of them."""
    total = ok + failed
    if failed == 0:
        return None
    if ok == 0:
        return f"every one of the {failed} clips failed"
    if failed / total > max_failed_share:
        return (
            f"{failed} of {total} clips failed ({failed / total:.0%}), more than "
            f"ingest.max_failed_share={max_failed_share:g}"
        )
    return None


def report_text(message: str, errors: Sequence[dict[str, Any]]) -> str:
    """The lines a failed job prints: the verdict, then each common error with an example."""
    lines = [f"ingest failed: {message}; commonest errors (from up to {MAX_ERROR_FILES} units):"]
    for e in errors:
        lines.append(f"  {e['count']} x {e['stage']}: {e['error']}")
        lines.append(f"      e.g. {e['source_uri'] or '(no file named)'}")
    return "\n".join(lines)

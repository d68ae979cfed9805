"""Ingest a corpus: manifest -> EnCodec codes (+ FLAC audio) -> parquet shards + errors.

    python jobs/ingest.py [--config PRESET] corpus.kind=esc50 corpus.root=PATH_OR_S3 \
        ingest.output=PATH_OR_S3 [key=value ...]

Runs on the Ray named by `ray.address` / `RAY_ADDRESS` (else an embedded local Ray).
Re-running with the same `ingest.output` resumes: committed work units are skipped.
Failed clips are rows of `<output>/errors/` and counted in the summary; the exit code is
1 when every clip failed, or more than `ingest.max_failed_share` of them (the commonest
errors, with an example input each, go to stderr), else 0.
"""

from __future__ import annotations

import json
import sys

from gpa_ray.data.failure_report import report_text
from gpa_ray.data.ingest import run_ingest
from gpa_ray.jobs_cli import init_ray, parse_job_args


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(argv, "Encode a corpus into EnCodec-code parquet shards on Ray Data.")
    init_ray(cfg)
    summary = run_ingest(cfg)
    print(json.dumps(summary, indent=2))
    if summary["failure"]:
        print(report_text(summary["failure"], summary["commonest_errors"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

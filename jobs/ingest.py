"""Ingest a corpus: manifest -> EnCodec codes (+ FLAC audio) -> parquet shards + errors.

    python jobs/ingest.py [--config PRESET] corpus.kind=esc50 corpus.root=PATH_OR_S3 \
        ingest.output=PATH_OR_S3 [key=value ...]

Runs on the Ray named by `ray.address` / `RAY_ADDRESS` (else an embedded local Ray).
Re-running with the same `ingest.output` resumes: committed work units are skipped.
Exit code 0 even when some clips failed: they are in `<output>/errors/` and the summary.
"""

from __future__ import annotations

import json
import sys

from gpa_ray.data.ingest import run_ingest
from gpa_ray.jobs_cli import init_ray, parse_job_args


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(argv, "Encode a corpus into EnCodec-code parquet shards on Ray Data.")
    init_ray(cfg)
    summary = run_ingest(cfg)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

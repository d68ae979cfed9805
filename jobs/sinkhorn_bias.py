"""Sinkhorn text biases (GPA eq 10) of a GPA checkpoint over the full test pool.

    python jobs/sinkhorn_bias.py [--config PRESET] sinkhorn.checkpoint=CKPT_OR_RUN \
        sinkhorn.queries=INGEST_OUTPUT sinkhorn.output=PATH_OR_S3 [key=value ...]

Training clips (`sinkhorn.queries_split`) are the queries, the captions of
`sinkhorn.texts_split` the texts; rows of R' are spread over `sinkhorn.num_actors` Ray
actors and never materialised whole. Writes `bias.parquet` (`text_id`, `bias`, ...),
`bias.json` and `config.yaml` under `sinkhorn.output`.
"""

from __future__ import annotations

import json
import sys

from gpa_ray.bias_job import run_bias_job
from gpa_ray.jobs_cli import init_ray, parse_job_args


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(argv, "Compute Sinkhorn text biases for audio-to-text retrieval.")
    init_ray(cfg)
    summary = run_bias_job(cfg)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

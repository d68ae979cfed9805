"""Build a retrieval index: clip shards -> GPA embeddings (+ text bias) -> an index version.

    python jobs/build_index.py [--config PRESET] index.checkpoint=CKPT \
        [index.input=INGEST] index.output=PATH_OR_S3 [index.bias=BIAS] [key=value ...]

`index.input` is an ingest output (or a folder of its clip shards) and defaults to
`<ingest.output>/clips`; `index.bias` names a Sinkhorn bias job output, which covers one
split's captions (index that split: `index.splits=[test]`). Re-running the same command
resumes the same version (committed units are skipped); the finished version becomes the
index's LATEST.
"""

from __future__ import annotations

import json
import sys

from gpa_ray.index.build import run_build_index
from gpa_ray.jobs_cli import init_ray, parse_job_args


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(argv, "Embed clip shards with a GPA checkpoint into an index version.")
    init_ray(cfg)
    summary = run_build_index(cfg)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

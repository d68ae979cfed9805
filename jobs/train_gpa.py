"""Train GPA (or the DP baseline, `gpa.scorer=none`) on Ray Train.

    python jobs/train_gpa.py [--config PRESET] train.data=INGEST_OUTPUT \
        train.storage_path=PATH_OR_S3 train.name=RUN [key=value ...]

Reads `<train.data>/clips/<corpus>/{train,val}/` from ingest (FLAC `audio`, or `codes`
for an AudioFormer tower); evaluates R@1/5/10, mAP@10 and MRR in both directions on the
validation split every epoch; writes checkpoints, `metrics.jsonl`, `metrics.png`,
`config.yaml` and `summary.json` (best and latest checkpoint) under
`<train.storage_path>/<train.name>/`. Running it again with the same run resumes from the
latest checkpoint (raise `train.epochs` to train further).
"""

from __future__ import annotations

import json
import sys

from gpa_ray.jobs_cli import init_ray, parse_job_args
from gpa_ray.train.gpa_loop import metrics_table, train_gpa


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(argv, "Train GPA (global + prototype alignment) on Ray Train.")
    init_ray(cfg)
    result = train_gpa(cfg)
    print(json.dumps(result.summary(), indent=2, default=str))
    print(metrics_table(result.metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pre-train AudioFormer: masked-LM (25% of the codes) of one RoFormer per EnCodec codebook.

    python jobs/pretrain_audioformer.py [--config PRESET] train.data=INGEST_OUTPUT \
        train.storage_path=PATH_OR_S3 train.name=RUN [key=value ...]

Reads `<train.data>/clips/<corpus>/{train,val}/` from ingest; trains on Ray Train
(`train.num_workers` workers); evaluates masked-token accuracy on the validation split each
epoch; writes checkpoints, `metrics.jsonl`, `metrics.png` and `config.yaml` under
`<train.storage_path>/<train.name>/`. Running it again with the same run resumes from the
latest checkpoint (raise `train.epochs` to train further).
"""

from __future__ import annotations

import json
import sys

from gpa_ray.jobs_cli import init_ray, parse_job_args
from gpa_ray.train.audioformer_loops import MLMLoop
from gpa_ray.train.trainer import fit


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(argv, "Masked-LM pre-training of AudioFormer on Ray Train.")
    init_ray(cfg)
    result = fit(MLMLoop(cfg))
    print(json.dumps(result.summary(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

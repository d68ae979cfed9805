"""Fine-tune AudioFormer for tagging: FT1 (classifier) or FT2 (classifier + MPC).

    python jobs/finetune_audioformer.py [--config PRESET] train.data=INGEST_OUTPUT \
        train.init_from=PRETRAIN_RUN_OR_CHECKPOINT train.finetune_stage=ft1|ft2 \
        train.storage_path=PATH_OR_S3 train.name=RUN [key=value ...]

The label vocabulary comes from the training split; single-label data (every clip has one
label, e.g. ESC-50) is scored by accuracy and mAP, multi-label data by mAP. Loss:
`audioformer.classification_loss` (lsep for multi-label sets, ce for single-label ones).
`train.init_from` is the pre-training run (its latest checkpoint) or one checkpoint URI;
an FT1 run or checkpoint continues that classifier with its labels (the second FT1 phase
of AudioSet-2M, see the `audioset_audioformer` preset).
"""

from __future__ import annotations

import json
import sys

from gpa_ray.data.loaders import scan_labels
from gpa_ray.jobs_cli import init_ray, parse_job_args
from gpa_ray.train.audioformer_loops import finetune_loop, finetuning_labels
from gpa_ray.train.trainer import data_uri, fit


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(argv, "AudioFormer fine-tuning (FT1/FT2) on Ray Train.")
    init_ray(cfg)
    scanned = scan_labels(data_uri(cfg), cfg.train.train_split, cfg.train.corpus, cfg.storage)
    result = fit(finetune_loop(cfg, finetuning_labels(cfg, scanned)))
    print(json.dumps(result.summary(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

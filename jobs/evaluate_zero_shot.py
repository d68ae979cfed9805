"""Zero-shot classification of a GPA checkpoint: ESC-50 accuracy per fold, multi-label mAP.

    python jobs/evaluate_zero_shot.py [--config PRESET] zero_shot.checkpoint=CKPT_OR_RUN \
        zero_shot.root=ESC50_DIR [zero_shot.templates='["this is a sound of {label}"]'] \
        [zero_shot.dataset=labels_csv zero_shot.labels_csv=CSV zero_shot.class_names=CSV] \
        [zero_shot.output=PATH_OR_S3]

Labels become prompts through `zero_shot.templates`; each clip is scored against every
label (the GPA score R, averaged over templates) in this process with the Python API (no
Ray). ESC-50: top-1 accuracy per fold of `zero_shot.folds`, their mean and the pooled
accuracy, and the one-hot mAP; `labels_csv` (AudioSet-style, several labels a clip): mAP.
Writes `summary.json` and `predictions.jsonl` under `zero_shot.output`.
"""

from __future__ import annotations

import sys

from gpa_ray.jobs_cli import parse_job_args
from gpa_ray.zero_shot import run_zero_shot, summary_lines


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(argv, "Zero-shot classification: ESC-50 per-fold accuracy, mAP.")
    summary = run_zero_shot(cfg)
    print("\n".join(summary_lines(summary)))
    print(f"wrote {cfg.zero_shot.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

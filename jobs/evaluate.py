"""Full-pool retrieval evaluation of a GPA checkpoint: T2A and A2T (with each rescoring).

    python jobs/evaluate.py [--config PRESET] eval.checkpoint=CKPT_OR_RUN \
        eval.data=INGEST_OUTPUT eval.bias=BIAS_OUTPUT eval.output=PATH_OR_S3 [key=value ...]

A2T is reported without rescoring, with the Sinkhorn text bias and QB-Norm (both from the
output of `jobs/sinkhorn_bias.py`) and with DSL (labelled: it leaks test queries), as
`eval.methods` says. Writes `metrics.json`, `metrics.md`, `recall.png` and `config.yaml`.
"""

from __future__ import annotations

import sys

from gpa_ray.evaluation import markdown_table, run_evaluation
from gpa_ray.jobs_cli import init_ray, parse_job_args


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(argv, "Evaluate text-to-audio and audio-to-text retrieval.")
    init_ray(cfg)
    summary = run_evaluation(cfg)
    print(f"{summary['pool']['clips']} clips x {summary['pool']['captions']} captions")
    print(markdown_table(summary["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

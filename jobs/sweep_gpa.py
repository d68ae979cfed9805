"""Sweep GPA settings with Ray Tune over Ray Train, with ASHA early stopping.

    python jobs/sweep_gpa.py [--config PRESET] train.data=INGEST_OUTPUT \\
        train.storage_path=PATH_OR_S3 sweep.name=SWEEP sweep.lr=[1e-4,3e-4] \\
        sweep.scorer=[lass,mean] [sweep.temperature=[...] sweep.n_prototypes=[...] \\
        sweep.sinkhorn_epsilon=[...]] [key=value ...]

Each trial is a GPA training run (`jobs/train_gpa.py` with the trial's settings) under
`<storage>/<sweep.name>/runs/<trial>/`; ASHA stops trials that fall behind on the sweep
metric (`sweep.metric`, else the run's checkpoint metric). Prints and writes
`<storage>/<sweep.name>/summary.json`: every trial and the best trial's run folder and
checkpoint (feed it to `sinkhorn_bias.py` / `evaluate.py` / `build_index.py`).
"""

from __future__ import annotations

import json
import sys

from gpa_ray.jobs_cli import init_ray, parse_job_args
from gpa_ray.sweep.runner import run_sweep


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(argv, "Sweep GPA settings with Ray Tune (ASHA) over Ray Train.")
    init_ray(cfg)
    summary = run_sweep(cfg)
    print(json.dumps(summary, indent=2, default=str))
    if summary["best_trial"] is None:
        print("no trial reported the sweep metric", file=sys.stderr)
        return 1
    print(f"best trial {summary['best_trial']}: {summary['best_run']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The main job: the whole system on the embedded default, end to end.

    python jobs/quickstart.py [--config quickstart] [--no-serve] [key=value ...]

Generates the offline synthetic corpus (or uses `corpus.kind`/`corpus.root` if given),
ingests it, pre-trains AudioFormer, trains GPA, computes the Sinkhorn text bias, evaluates
(A2T R@k before/after the bias), builds the index and starts the Ray Serve retriever, then
runs example queries in both directions and keeps the app up until Ctrl-C. Everything is
written under `quickstart.output`.
"""

from __future__ import annotations

import signal
import sys
import time

from gpa_ray.jobs_cli import init_ray, parse_job_args
from gpa_ray.quickstart import run_quickstart


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    serve_app = "--no-serve" not in args
    args = [a for a in args if a != "--no-serve"]
    if not any(a == "--config" or a.startswith("--config=") for a in args):
        args = ["--config", "quickstart", *args]
    cfg = parse_job_args(
        args,
        "Run every gpa_ray stage on one machine, end to end "
        "(--no-serve: stop after the report instead of serving until Ctrl-C).",
    )
    init_ray(cfg)
    summary = run_quickstart(cfg, serve_app=serve_app)
    print("\n".join(summary["report"]))
    if serve_app:
        print(f"\nsearch page: {summary['url']}/  (Ctrl-C to stop)")
        # Ray Train installs its own SIGINT handler during training; give Ctrl-C back.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

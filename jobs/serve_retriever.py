"""Serve the retriever on Ray Serve: HTTP API + search page over an index version.

    python jobs/serve_retriever.py [--config PRESET] serve.index_uri=PATH_OR_S3 \
        [serve.host=0.0.0.0] [serve.port=8000] [key=value ...]

Open http://HOST:PORT/ for the search page and /docs for the API. The app serves the
index's LATEST version and follows it (`serve.reload_interval_s`). For a cluster
deployment with autoscaling use `serve deploy gpa_ray/serve/serve_config.yaml` instead.
"""

from __future__ import annotations

import sys
import time

from gpa_ray.jobs_cli import init_ray, parse_job_args
from gpa_ray.serve.app import start_retriever


def main(argv: list[str] | None = None, block: bool = True) -> int:
    cfg = parse_job_args(argv, "Serve text-to-audio and audio-to-text search on Ray Serve.")
    init_ray(cfg)
    url = start_retriever(cfg)
    print(f"retriever up at {url}/ (API docs at {url}/docs)", flush=True)
    try:
        while block:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

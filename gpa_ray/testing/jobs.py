"""The job scripts as functions: tests call a job's `main(argv)` in the test process."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

JOBS_DIR = Path(__file__).resolve().parents[2] / "jobs"
"""The repository's `jobs/` folder (`python jobs/<name>.py` scripts)."""


def job_main(name: str) -> Callable[[list[str] | None], int]:
    """`main` of `jobs/<name>.py`: jobs are scripts, not a package, so tests load them by path."""
    path = JOBS_DIR / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"gpa_ray_job_{name}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no job script at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main

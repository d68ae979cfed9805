"""The job scripts as functions: tests call a job's `main(argv)` in the test process."""

from __future__ import annotations

from gpa_ray.jobs_cli import JOBS_DIR, job_main

__all__ = ["JOBS_DIR", "job_main"]

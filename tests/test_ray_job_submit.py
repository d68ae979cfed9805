"""`ray job submit` end to end, the way a user runs jobs on a cluster.

A real Ray head node (`ray start --head`, loopback only, its own ports and temp dir,
stopped by PID afterwards) takes two jobs through the `ray job submit` CLI with the
repository as `--working-dir`: ingest of 8 real ESC-50 clips, then AudioFormer
pre-training on them with the debug preset. The CLI blocks until each job ends; the
Jobs REST API must then say SUCCEEDED, and the pre-training run must have left a
complete checkpoint in the storage path it was given.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from gpa_ray import checkpoints, storage
from gpa_ray.testing.cluster import LocalRayCluster, local_ray_cluster

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 900


def submit(cluster: LocalRayCluster, submission_id: str, job: str, *args: str) -> str:
    """Run `ray job submit ... -- <python> jobs/<job>.py <args>`; return the CLI's output.

    The entrypoint names this interpreter by absolute path: `python` on the cluster's
    PATH need not be the project's environment.
    """
    command = [
        cluster.ray_cli,
        "job",
        "submit",
        "--address",
        cluster.dashboard_url,
        "--submission-id",
        submission_id,
        "--working-dir",
        str(REPO),
        "--",
        sys.executable,
        f"jobs/{job}.py",
        *args,
    ]
    started = time.perf_counter()
    done = subprocess.run(
        command,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
        check=False,
    )
    output = done.stdout + done.stderr
    print(f"{job}: ray job submit took {time.perf_counter() - started:.0f} s")
    assert done.returncode == 0, f"ray job submit of {job} exited {done.returncode}:\n{output}"
    return output


def job_status(cluster: LocalRayCluster, submission_id: str) -> str:
    """The job's status from the Jobs REST API (what `ray job status` reads)."""
    url = f"{cluster.dashboard_url}/api/jobs/{submission_id}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)["status"]


def uploaded_working_dirs(cluster: LocalRayCluster) -> list[Path]:
    """The working-dir packages the node unpacked for its jobs (beside them: lock files)."""
    unpacked = Path(cluster.temp_dir).glob("session_*/runtime_resources/working_dir_files/*")
    return sorted(p for p in unpacked if p.is_dir())


def test_pretrain_audioformer_via_ray_job_submit(shared_data: Path, tmp_path: Path) -> None:
    ingest_out = str(tmp_path / "ingest")
    runs = str(tmp_path / "runs")
    with local_ray_cluster(num_cpus=2) as cluster:
        submit(
            cluster,
            "ingest-esc50",
            "ingest",
            "--config",
            "debug",
            "corpus.kind=esc50",
            f"corpus.root={shared_data / 'esc50'}",
            "corpus.limit=8",
            f"ingest.output={ingest_out}",
            "ingest.max_seconds=1.0",
            "ingest.store_audio=false",
            "ingest.rows_per_commit=4",
        )
        assert job_status(cluster, "ingest-esc50") == "SUCCEEDED"
        assert storage.list_files(storage.join(ingest_out, "clips"), ".parquet")

        output = submit(
            cluster,
            "pretrain-debug",
            "pretrain_audioformer",
            "--config",
            "debug",
            f"train.data={ingest_out}",
            f"train.storage_path={runs}",
            "train.name=submitted",
            "train.epochs=1",
            "audioformer.codebooks=[0]",
        )
        assert job_status(cluster, "pretrain-debug") == "SUCCEEDED"
        assert re.search(r"Job 'pretrain-debug' succeeded", output), output

        # The repository went up without what .gitignore excludes: no venv, no file of
        # outputs/ (Ray keeps an empty top-level directory of an ignored name).
        packages = uploaded_working_dirs(cluster)
        assert packages, "no working_dir package on the node"
        for package in packages:
            assert (package / "jobs" / "pretrain_audioformer.py").is_file()
            assert not (package / ".venv").exists()
            assert not [p for p in (package / "outputs").rglob("*") if p.is_file()]
            size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
            assert size < 50 * 1024 * 1024, f"working dir package of {size} bytes"

    run = storage.join(runs, "submitted")
    latest = checkpoints.latest_checkpoint(run)
    assert latest is not None, f"no checkpoint under {run}"
    for name in (
        checkpoints.MODEL_FILE,
        checkpoints.OPTIMIZER_FILE,
        checkpoints.STATE_FILE,
        checkpoints.CONFIG_FILE,
    ):
        assert storage.exists(storage.join(latest, name)), name
    state = checkpoints.read_state(latest)
    assert state["task"] == "mlm" and state["epoch"] == 1 and state["step"] > 0
    assert [r["epoch"] for r in state["history"]] == [1]
    weights = checkpoints.load_model_state(latest)
    assert {k.split(".")[1] for k in weights} == {"c0"}
    assert checkpoints.read_config(latest).train.name == "submitted"

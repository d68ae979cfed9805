"""Compaction of committed work units into target-sized clip shards: the shard plan, shard
sizes and row groups of a real ingest, and a driver SIGKILLed inside compaction (while
shards are written, then while units are cleaned up) whose reruns end with exactly the
clips of an undisturbed run: no duplicate, no gap."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from gpa_ray.config_loading import load_config
from gpa_ray.data.compaction import KILL_HOOK, plan_shards
from gpa_ray.data.corpora import iter_manifest
from gpa_ray.testing.cluster import descendant_pids
from gpa_ray.testing.jobs import job_main

REPO = Path(__file__).resolve().parents[2]
MB = 1024 * 1024
TARGET_MB = 2


def _covered(shards: list[list[list[int]]]) -> list[tuple[int, int]]:
    return [(u, r) for shard in shards for u, start, stop in shard for r in range(start, stop)]


def test_plan_shards_covers_every_row_once_near_the_target() -> None:
    rng = np.random.default_rng(0)
    target = 2 * MB
    for trial in range(200):
        n_units = int(rng.integers(1, 40))
        units = []
        for u in range(n_units):
            ok = int(rng.integers(0, 12))
            per_row = float(rng.choice([20e3, 150e3, 400e3, 1.5e6]))
            units.append({"unit": u, "ok": ok, "bytes": ok * per_row * rng.uniform(0.8, 1.2)})
        shards = plan_shards(units, target)
        expected = [(u["unit"], r) for u in units for r in range(u["ok"])]
        assert _covered(shards) == expected, trial  # every row once, in unit order
        sizes = [
            sum((stop - start) * units[u]["bytes"] / units[u]["ok"] for u, start, stop in shard)
            for shard in shards
        ]
        per_row_max = max((u["bytes"] / u["ok"] for u in units if u["ok"]), default=0.0)
        for size in sizes[:-1]:
            assert target - per_row_max / 2 <= size <= target + per_row_max / 2, trial
        if len(sizes) > 1:
            assert sizes[-1] >= target / 2 or sizes[-2] + sizes[-1] > 1.5 * target
    # A unit bigger than the target is cut across shards; rows bigger than it stand alone.
    assert plan_shards([{"unit": 0, "ok": 10, "bytes": 5 * target}], target) == [
        [[0, 0, 2]],
        [[0, 2, 4]],
        [[0, 4, 6]],
        [[0, 6, 8]],
        [[0, 8, 10]],
    ]
    assert plan_shards([{"unit": 3, "ok": 2, "bytes": 6 * target}], target) == [
        [[3, 0, 1]],
        [[3, 1, 2]],
    ]
    assert plan_shards([{"unit": 0, "ok": 0, "bytes": 0}], target) == []


def _args(shared_data: Path, out: Path) -> list[str]:
    """76 real ESC-50 clips (5 s, FLAC at 32 kHz, ~160 kB each, no codes): 11 in `val`,
    1 in `test`, 64 in `train` (~10 MB: five 2 MB shards), in units of 3 clips."""
    return [
        "corpus.kind=esc50",
        f"corpus.root={shared_data / 'esc50'}",
        "corpus.limit=76",
        "corpus.esc50_train_folds=[4]",
        "corpus.esc50_val_folds=[2]",
        "corpus.esc50_test_folds=[3,5]",
        f"ingest.output={out}",
        "ingest.codes=false",
        "ingest.rows_per_commit=3",
        f"ingest.target_shard_mb={TARGET_MB}",
        "ingest.row_group_mb=0.5",
        "ingest.encode_pool.cpus_per_actor=1",
    ]


def _shards(out: Path) -> dict[str, list[Path]]:
    clips = out / "clips" / "esc50"
    return {d.name: sorted(d.glob("*.parquet")) for d in sorted(clips.iterdir())}


@pytest.fixture(scope="module")
def undisturbed(ray_session: None, shared_data: Path, tmp_path_factory: Any) -> Path:
    out = tmp_path_factory.mktemp("undisturbed") / "out"
    assert job_main("ingest")(_args(shared_data, out)) == 0
    return out


def test_shards_are_near_the_target_with_streaming_row_groups(
    undisturbed: Path, shared_data: Path
) -> None:
    shards = _shards(undisturbed)
    assert [len(files) for files in shards.values()] == [1, 5, 1]  # test, train, val
    for files in shards.values():
        for shard in files[:-1]:
            assert 0.5 * TARGET_MB * MB <= shard.stat().st_size <= 1.5 * TARGET_MB * MB, shard
    for shard in shards["train"][:-1]:
        meta = pq.ParquetFile(shard).metadata
        assert meta.num_row_groups >= 3  # ~0.5 MB row groups in a ~2 MB shard
        groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
        assert all(g.total_byte_size <= 0.75 * MB for g in groups)
    # Exactly the manifest's clips, each once, in unit order within a split.
    cfg = load_config(overrides=_args(shared_data, undisturbed))
    manifest = list(iter_manifest(cfg.corpus))
    ids = [i for files in shards.values() for f in files for i in _ids(f)]
    assert sorted(ids) == sorted(r["clip_id"] for r in manifest) and len(set(ids)) == 76
    train = [r["clip_id"] for r in manifest if r["split"] == "train"]
    assert [i for f in shards["train"] for i in _ids(f)] == train
    assert not (undisturbed / "units" / "esc50").exists()  # staged unit files are deleted
    summary = json.loads((undisturbed / "summary.json").read_text())
    assert summary["compaction"]["shards"] == 7 and summary["compaction"]["rows"] == 76


def _ids(shard: Path) -> list[str]:
    return pq.read_table(shard, columns=["clip_id"]).column(0).to_pylist()


def _killed_at(point: str, args: list[str], log: Path) -> None:
    """Run `jobs/ingest.py` as its own process (own embedded Ray) with the kill hook set,
    check that it died of SIGKILL, then make sure every process it started is gone."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        {KILL_HOOK: point},
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    command = [sys.executable, str(REPO / "jobs" / "ingest.py"), *args]
    seen: set[int] = set()
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [*command, "ray.address=local", "ray.num_cpus=2"],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 300
            while proc.poll() is None:
                assert time.monotonic() < deadline, "the job did not reach the kill point"
                seen.update(descendant_pids(proc.pid))
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in seen):
                time.sleep(0.5)
            for pid in seen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]


def _shard_markers(out: Path) -> list[Path]:
    return sorted((out / "_compaction" / "esc50").glob("*/shard-*.json"))


def test_sigkill_inside_compaction_then_rerun_equals_undisturbed(
    undisturbed: Path, shared_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = _args(shared_data, out)
    # 1. Killed after the second shard of this run is committed (others may be mid-write).
    _killed_at("compact:2", args, tmp_path / "compact.log")
    assert 2 <= len(_shard_markers(out)) < 7
    assert not (out / "summary.json").exists()
    n_units = len(list((out / "_commits" / "esc50").glob("unit-*.json")))
    assert n_units == len(list((out / "units" / "esc50").rglob("part-*.parquet"))) == 26
    for shard in (out / "clips").rglob("*.parquet"):
        pq.read_table(shard)  # only whole files are visible (a killed write is a hidden temp)
    # 2. The rerun writes only the missing shards, then is killed after cleaning one split.
    _killed_at("cleanup:1", args, tmp_path / "cleanup.log")
    assert len(_shard_markers(out)) == 7
    assert sorted(p.name for p in (out / "units" / "esc50").iterdir()) == ["test", "train"]
    log = (tmp_path / "cleanup.log").read_text()
    assert "resuming: 26 of 26 units already committed" in log
    # 3. The last rerun finishes the cleanup.
    assert job_main("ingest")(args) == 0
    assert not (out / "units" / "esc50").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clips_ok"] == 76 and summary["this_run"]["units_committed"] == 0
    assert summary["compaction"]["shards_this_run"] == 0
    got, want = _shards(out), _shards(undisturbed)
    assert {s: [f.name for f in fs] for s, fs in got.items()} == {
        s: [f.name for f in fs] for s, fs in want.items()
    }
    for split, files in want.items():
        for ours, theirs in zip(got[split], files, strict=True):
            a, b = pq.read_table(ours), pq.read_table(theirs)
            assert a.column("clip_id").to_pylist() == b.column("clip_id").to_pylist()
            assert a.column("audio").to_pylist() == b.column("audio").to_pylist()

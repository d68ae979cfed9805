"""Compaction streams: a shard task's peak memory does not grow with the shard it writes.

    python benchmarks/compaction_memory.py [--shard-mb 64,256] [--out benchmarks/results]

For each shard size, units of 16 clips x 64 kB of incompressible "audio" (1 MB per unit)
are staged in a local ingest
layout and `compaction.write_shard` (the body of a compaction task, run here without Ray)
writes them as one shard in 8 MB row groups, in a fresh process per size. Figures: the
process's peak RSS growth over its RSS before the shard, and pyarrow's pool peak. A
streaming writer holds about a row group plus a unit whatever the shard size; a writer
that built the shard in memory would grow by the shard. Local output (on S3 the shard
is uploaded in one piece, so it is held once). Written to `<out>/compaction_memory.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
UNIT_CLIPS, CLIP_BYTES, ROW_GROUP_MB = 16, 64 * 1024, 8


def child(shard_mb: int, work: str) -> dict[str, Any]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gpa_ray.config_loading import load_config
    from gpa_ray.data import schema
    from gpa_ray.data.compaction import write_shard
    from gpa_ray.data.work_units import Layout

    cfg = load_config(overrides=[f"ingest.output={work}"])
    layout = Layout(work, "bench")
    rng = np.random.default_rng(0)
    n_units = shard_mb * 1024 * 1024 // (UNIT_CLIPS * CLIP_BYTES)
    for unit in range(n_units):
        rows = [
            {
                "clip_id": f"bench/{unit}/{i}",
                "corpus": "bench",
                "split": "train",
                "source_uri": "",
                "start_s": 0.0,
                "duration_s": 10.0,
                "captions": [],
                "labels": [],
                "n_samples": 320000,
                "sample_rate": 32000,
                "codes": None,
                "audio": rng.bytes(CLIP_BYTES),
                "audio_sample_rate": 32000,
            }
            for i in range(UNIT_CLIPS)
        ]
        uri = layout.unit_file("train", unit)
        os.makedirs(os.path.dirname(uri), exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema.CLIP_SCHEMA), uri)
    slices = [[unit, 0, UNIT_CLIPS] for unit in range(n_units)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pool_before = pa.default_memory_pool().max_memory()
    marker = write_shard(
        dataclasses.asdict(cfg), "bench", "train", 0, slices, ROW_GROUP_MB * 1024 * 1024
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "shard_mb": round(marker["bytes"] / 2**20, 1),
        "units": n_units,
        "row_groups": marker["row_groups"],
        "rss_before_mb": round(before, 1),
        "peak_rss_growth_mb": round(peak - before, 1),
        "arrow_pool_peak_mb": round(
            max(pool_before, pa.default_memory_pool().max_memory()) / 2**20, 1
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shard-mb", default="64,256")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--child", nargs=2, metavar=("SHARD_MB", "WORK"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1])))
        return
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    runs = []
    for size in (int(s) for s in args.shard_mb.split(",")):
        with tempfile.TemporaryDirectory(prefix="compaction-memory-") as work:
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(size), work],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
    summary = {
        "row_group_mb": ROW_GROUP_MB,
        "unit_mb": UNIT_CLIPS * CLIP_BYTES / 2**20,
        "runs": runs,
        "growth_ratio_largest_over_smallest": round(
            runs[-1]["peak_rss_growth_mb"] / runs[0]["peak_rss_growth_mb"], 2
        ),
        "shard_ratio": round(runs[-1]["shard_mb"] / runs[0]["shard_mb"], 2),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compaction_memory.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))


if __name__ == "__main__":
    main()

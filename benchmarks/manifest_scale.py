"""Planning an AudioSet-size ingest: manifest + unit plan time and driver memory vs rows.

    python benchmarks/manifest_scale.py [--sizes 100000,500000,1000000,2000000]
                                        [--out benchmarks/results]

For each size an AudioSet-style index with the published structure is generated
(`gpa_ray.data.synthetic_audioset`: the three segment CSVs with their 3 `#` header lines,
`class_labels_indices.csv`, AudioSet-2M's split shares, a few repeated segments) and
`work_units.build_manifest` is run on it in a fresh process (so its peak RSS is its own),
with the AudioSet preset's unit size (`rows_per_commit` 64, 16 units per manifest file),
writing the manifest parquet and `_manifest.json` to a local folder. Two readers feed the
same streaming planner:

- `arrow`: what ingest runs, the segment CSVs read by pyarrow's streaming CSV reader into
  Arrow tables (`gpa_ray.data.audioset_index`);
- `rows`: the simple path as the baseline, `corpora.read_audioset`'s one dict per segment,
  batched into tables.

No audio is on disk: planning never looks audio up. Whether a clip's file exists is
checked lazily at ingest's `locate` stage, by the actor encoding its unit (a missing file
is an error row there), so planning costs the same with 2M files present or none.

Figures per size and reader: wall time of `build_manifest`, peak RSS of its process (the
driver's share of an ingest before any actor starts), and per-row cost, with the growth
ratios from the smallest to the largest size. Written to `<out>/manifest_scale.json`.
Times are noisy on a shared 2-core machine (other work competes); the `rows`/`arrow`
ratio is measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def child(reader: str, root: str, output: str) -> dict[str, Any]:
    """Run `build_manifest` once in this process; report its time and this process's peak
    RSS (the whole process: interpreter, pyarrow and the planner)."""
    import logging

    from gpa_ray.config_loading import load_config
    from gpa_ray.data.corpora import iter_manifest
    from gpa_ray.data.work_units import Layout, build_manifest, tables_of_rows

    logging.disable(logging.WARNING)  # one warning per repeated segment
    cfg = load_config(
        "audioset_audioformer", overrides=[f"corpus.root={root}", f"ingest.output={output}"]
    )
    started = time.perf_counter()
    tables = tables_of_rows(iter_manifest(cfg.corpus)) if reader == "rows" else None
    plan = build_manifest(cfg, Layout(output, "audioset"), tables)
    wall = time.perf_counter() - started
    return {
        "reader": reader,
        "rows": plan["n_rows"],
        "units": len(plan["units"]),
        "rows_per_unit": plan["rows_per_unit"],
        "wall_s": round(wall, 2),
        "us_per_row": round(wall / plan["n_rows"] * 1e6, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def measure(reader: str, root: Path, output: Path) -> dict[str, Any]:
    """`child` in a fresh interpreter, so each figure's peak RSS is its own."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, __file__, "--child", reader, str(root), str(output)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def growth(runs: list[dict[str, Any]], key: str) -> float:
    return round(runs[-1][key] / runs[0][key], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,500000,1000000,2000000")
    parser.add_argument("--readers", default="arrow,rows")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--child", nargs=3, metavar=("READER", "ROOT", "OUTPUT"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    from gpa_ray.data.synthetic_audioset import write_audioset_index

    sizes = [int(s) for s in args.sizes.split(",")]
    readers = args.readers.split(",")
    results: dict[str, list[dict[str, Any]]] = {r: [] for r in readers}
    with tempfile.TemporaryDirectory(prefix="manifest-scale-") as work:
        for size in sizes:
            root = Path(work) / f"audioset-{size}"
            write_audioset_index(root, size, seed=0, duplicates=10)
            csv_mb = sum(f.stat().st_size for f in root.glob("*.csv")) / 2**20
            for reader in readers:
                run = measure(reader, root, Path(work) / f"out-{size}-{reader}")
                run.update(size=size, csv_mb=round(csv_mb, 1), load_avg=os.getloadavg()[0])
                results[reader].append(run)
                print(json.dumps(run), flush=True)
            for out in Path(work).glob(f"out-{size}-*"):
                subprocess.run(["rm", "-rf", str(out)], check=True)
            subprocess.run(["rm", "-rf", str(root)], check=True)
    summary: dict[str, Any] = {"sizes": sizes, "runs": results, "growth": {}}
    for reader, runs in results.items():
        summary["growth"][reader] = {
            "rows": growth(runs, "rows"),
            "wall": growth(runs, "wall_s"),
            "peak_rss": growth(runs, "peak_rss_mb"),
        }
    if "arrow" in results and "rows" in results:
        summary["rows_over_arrow_wall"] = [
            round(r["wall_s"] / a["wall_s"], 2)
            for a, r in zip(results["arrow"], results["rows"], strict=True)
        ]
    largest = results[readers[0]][-1]
    summary["largest"] = {
        "reader": readers[0],
        "rows": largest["rows"],
        "wall_s": largest["wall_s"],
        "peak_rss_mb": largest["peak_rss_mb"],
        "within_5_min_and_3_gb": largest["wall_s"] <= 300 and largest["peak_rss_mb"] <= 3072,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest_scale.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary["growth"]), json.dumps(summary["largest"]))


if __name__ == "__main__":
    main()

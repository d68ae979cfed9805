"""Ingest throughput and memory: a plain single-process loop vs the Ray Data pipeline.

    python benchmarks/ingest.py [--clips 16] [--repeat 10] [--out benchmarks/results]

The same real clips (ESC-50 from the shared test data, 5 s each) go through

(a) a plain loop in this process on one torch thread: read, decode, resample, EnCodec
    encode and FLAC encode, i.e. `ClipEncoder.process`, the very code the actors run;
(b) the Ray Data pipeline (`run_ingest`) on an embedded local Ray with 2 CPUs and two
    encoder actors at 0.5 CPU each, writing shards to a temporary folder;

then (b) again on the set repeated `--repeat` times, to see whether memory stays flat as
the corpus grows, and

(c) the machine's own ceiling for two workers: two plain loops at once in two processes,
    each on every other clip of the large set, no Ray. Their combined rate over (a) is
    what two cores give this work at best (below 2x when the cores share caches, memory
    bandwidth or a physical core); (b)'s ratio is read against it.

(a) runs before and after the first (b) and its mean rate is the baseline of every ratio:
a plain loop's cost per clip does not depend on how many clips follow, and bracketing (b)
evens out other work on a shared machine.

Figures per run:
- `audio_seconds_per_s`: audio-seconds per wall-second end to end (for (b) including the
  manifest and starting the actors; `ray.init` is timed separately);
- `steady_audio_seconds_per_s` for (b): the rate once both actors are up, from the commit
  markers' times: audio of the units committed after the first two, divided by the time
  from the second commit to the last;
- `audio_seconds_per_cpu_s`: audio-seconds per CPU-second of the driver plus the Ray
  worker processes, which shows the pipeline's overhead independently of machine load;
- peak RSS sampled from /proc every 0.2 s: driver, Ray worker processes (`ray::*`,
  including idle pooled workers) and their sum, plus the number of worker processes.
Linux only (reads /proc). Results are printed and written as JSON to `<out>/ingest.json`
with the load average at each step, since other work may compete for the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from common import steady_commit_rate

from gpa_ray.config import Config
from gpa_ray.config_loading import load_config
from gpa_ray.data.corpora import iter_manifest
from gpa_ray.data.ingest import ClipEncoder, run_ingest
from gpa_ray.jobs_cli import init_ray
from gpa_ray.testing.cluster import descendant_pids
from gpa_ray.testing.data import shared_data_dir
from gpa_ray.testing.services import loopback_ray_env

MB = 1024 * 1024
TICKS = os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """A memory field of /proc/<pid>/status in bytes: VmRSS (now) or VmHWM (peak); 0 for a
    process that has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def _is_worker(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::")
    except OSError:
        return False


def _load() -> float:
    return round(os.getloadavg()[0], 2)


class Sampler:
    """Samples RSS and CPU time of the driver and the Ray workers in a background thread."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.driver = self.workers = self.total = self.n_workers = 0
        self.own_cpu_s = 0.0
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = os.getpid()
        pids = [p for p in descendant_pids(me) if _is_worker(p)]
        for pid in pids:
            cpu = _cpu_seconds(pid)
            self._cpu_start.setdefault(pid, cpu)
            self._cpu_last[pid] = max(self._cpu_last.get(pid, 0.0), cpu)
        driver = rss_bytes(me)
        workers = sum(rss_bytes(p) for p in pids)
        self.driver = max(self.driver, driver)
        if workers > self.workers:
            self.workers, self.n_workers = workers, len(pids)
        self.total = max(self.total, driver + workers)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            # The sampler runs in the driver process: keep its own CPU out of the figures.
            self.own_cpu_s = time.thread_time()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Sampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def worker_cpu_s(self) -> float:
        return sum(self._cpu_last[p] - self._cpu_start[p] for p in self._cpu_last)

    def as_dict(self) -> dict[str, float]:
        return {
            "driver_peak_rss_mb": round(self.driver / MB, 1),
            "workers_peak_rss_mb": round(self.workers / MB, 1),
            "worker_processes_at_peak": self.n_workers,
            "driver_plus_workers_peak_rss_mb": round(self.total / MB, 1),
        }


def make_corpus(root: Path, clips: int, repeat: int) -> None:
    """A folder corpus listing the first `clips` ESC-50 files `repeat` times (symlinks)."""
    esc = shared_data_dir() / "esc50"
    cfg = load_config(overrides=["corpus.kind=esc50", f"corpus.root={esc}"])
    rows = list(iter_manifest(cfg.corpus))[:clips]
    (root / "audio").mkdir(parents=True)
    lines = ["file_name,caption,labels"]
    for r in range(repeat):
        for row in rows:
            name = f"r{r:02d}_{Path(row['source_uri']).name}"
            (root / "audio" / name).symlink_to(row["source_uri"])
            lines.append(f"{name},{row['captions'][0]},{row['labels'][0]}")
    (root / "captions.csv").write_text("\n".join(lines) + "\n")


def plain_loop(cfg: Config, part: int = 0, parts: int = 1) -> dict[str, Any]:
    """(a): every clip (or every `parts`-th from `part`) through `ClipEncoder` in this
    process, one torch thread."""
    torch.set_num_threads(1)
    load = _load()
    encoder = ClipEncoder(cfg)
    cpu0, started, began = time.process_time(), time.perf_counter(), time.time()
    audio_s, n = 0.0, 0
    for index, row in enumerate(iter_manifest(cfg.corpus, cfg.storage)):
        if index % parts != part:
            continue
        audio_s += encoder.process(row, encoder.fetch(row))["duration_s"]
        n += 1
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu0
    return {
        "began_unix_s": began,
        "ended_unix_s": time.time(),
        "clips": n,
        "audio_seconds": audio_s,
        "wall_s": round(wall, 2),
        "audio_seconds_per_s": round(audio_s / wall, 2),
        "audio_seconds_per_cpu_s": round(audio_s / cpu, 2),
        "driver_peak_rss_mb": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB, 1
        ),
        "load_average_1min_at_start": load,
    }


def ray_pipeline(cfg: Config, sampler_class: type[Sampler] = Sampler) -> dict[str, Any]:
    """(b): `run_ingest` on the running Ray, sampling memory and CPU time (with
    `sampler_class`, a `Sampler` or a subclass that records more)."""
    load = _load()
    driver_cpu0 = time.process_time()
    with sampler_class() as sampler:
        summary = run_ingest(cfg)
    assert summary["clips_failed"] == 0, summary
    audio_s = summary["this_run"]["audio_seconds"]
    cpu = time.process_time() - driver_cpu0 - sampler.own_cpu_s + sampler.worker_cpu_s()
    return {
        "clips": summary["clips_ok"],
        "audio_seconds": audio_s,
        "wall_s": round(summary["wall_time_s"], 2),
        "audio_seconds_per_s": round(summary["audio_seconds_per_second"], 2),
        "steady_audio_seconds_per_s": steady_commit_rate(
            Path(cfg.ingest.output) / "_commits", "audio_seconds"
        ),
        "audio_seconds_per_cpu_s": round(audio_s / cpu, 2),
        "cpu_s": round(cpu, 2),
        **sampler.as_dict(),
        "load_average_1min_at_start": load,
    }


def parallel_plain_loops(corpus_root: Path, processes: int) -> dict[str, Any]:
    """(c): `processes` plain loops at once, each in its own process on its share of the
    clips. The combined rate counts from the first loop's start to the last one's end
    (interpreter start and imports excluded)."""
    load = _load()
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--plain-part", f"{i}/{processes}", str(corpus_root)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    runs = []
    for child in children:
        out, _ = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"plain loop child exited with {child.returncode}")
        runs.append(json.loads(out.strip().splitlines()[-1]))
    wall = max(r["ended_unix_s"] for r in runs) - min(r["began_unix_s"] for r in runs)
    audio_s = sum(r["audio_seconds"] for r in runs)
    return {
        "processes": processes,
        "clips": sum(r["clips"] for r in runs),
        "audio_seconds": audio_s,
        "wall_s": round(wall, 2),
        "audio_seconds_per_s": round(audio_s / wall, 2),
        "per_process_audio_seconds_per_s": [r["audio_seconds_per_s"] for r in runs],
        "load_average_1min_at_start": load,
    }


def _corpus_cfg(root: Path) -> Config:
    return load_config(overrides=["corpus.kind=folder", f"corpus.root={root}"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=16, help="distinct ESC-50 clips")
    parser.add_argument("--repeat", type=int, default=10, help="size factor of the second run")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--plain-part", help=argparse.SUPPRESS)
    parser.add_argument("corpus", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain_part:
        part, parts = (int(v) for v in args.plain_part.split("/"))
        print(json.dumps(plain_loop(_corpus_cfg(Path(args.corpus)), part, parts)), flush=True)
        return 0

    work = Path(tempfile.mkdtemp(prefix="gpa_ray_bench_ingest_"))

    def cfg(corpus: str) -> Config:
        return load_config(
            overrides=[
                "corpus.kind=folder",
                f"corpus.root={work / corpus}",
                f"ingest.output={work / ('out_' + corpus)}",
                "ingest.encode_pool.actors=2",
                "ingest.encode_pool.cpus_per_actor=0.5",
                "ingest.rows_per_commit=4",
                "ray.address=local",
                "ray.num_cpus=2",
                "ray.object_store_memory_mb=512",
            ]
        )

    try:
        make_corpus(work / "small", args.clips, 1)
        make_corpus(work / "large", args.clips, args.repeat)
        plain = [plain_loop(cfg("small"))]
        print(f"(a) plain loop: {plain[0]}", flush=True)
        loopback_ray_env()
        t0 = time.perf_counter()
        init_ray(cfg("small"))
        ray_init_s = round(time.perf_counter() - t0, 2)
        small = ray_pipeline(cfg("small"))
        print(f"(b) ray pipeline x1: {small}", flush=True)
        plain.append(plain_loop(cfg("small")))
        print(f"(a) plain loop again: {plain[1]}", flush=True)
        large = ray_pipeline(cfg("large"))
        print(f"(b) ray pipeline x{args.repeat}: {large}", flush=True)
        ceiling = parallel_plain_loops(work / "large", 2)
        print(f"(c) two plain loops at once: {ceiling}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = sum(p["audio_seconds_per_s"] for p in plain) / len(plain)
    result = {
        "clips": args.clips,
        "clip_seconds": 5.0,
        "repeat": args.repeat,
        "cpu_count": os.cpu_count(),
        "load_average_1min_at_end": _load(),
        "ray_init_s": ray_init_s,
        "plain_loop": plain,
        "ray_pipeline_x1": small,
        f"ray_pipeline_x{args.repeat}": large,
        "plain_audio_seconds_per_s_mean": round(base, 2),
        "ratio_x1": round(small["audio_seconds_per_s"] / base, 2),
        f"ratio_x{args.repeat}": round(large["audio_seconds_per_s"] / base, 2),
        f"ratio_steady_x{args.repeat}": (
            round(large["steady_audio_seconds_per_s"] / base, 2)
            if large["steady_audio_seconds_per_s"]
            else None
        ),
        "two_plain_loops": ceiling,
        "ratio_two_plain_loops": round(ceiling["audio_seconds_per_s"] / base, 2),
        f"workers_peak_rss_growth_x{args.repeat}": round(
            large["workers_peak_rss_mb"] / max(small["workers_peak_rss_mb"], 1e-9), 2
        ),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

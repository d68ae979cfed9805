"""Serve load test: the retriever on Ray Serve vs the same work in process, and the index
build on Ray Data vs a plain loop.

    python benchmarks/serve_load.py [--clips 100000] [--requests 2000] \
        [--concurrency 1,4,8] [--malformed 0.1] [--build-clips 192] [--build-unit 16] \
        [--set serve.text_batch_wait_s=0 ...] [--out benchmarks/results]

1. A GPA model of the `debug` preset (the real pretrained MiniLM text tower, CNN14
   width 8, embed_dim 32, K = 3) is saved as a checkpoint, and an index of `--clips`
   synthetic clips (random unit global embeddings and prototypes, float16, one caption
   each) is written with the index format.
2. In process: text encode + two-stage search (`TextQueryEncoder` + `SearchService`, the
   classes the deployments wrap) for a few hundred queries, one at a time: p50/p99; and
   the search alone (the configured `index.ann`, default IVF). Measured before Serve
   starts and again after the load levels with its replicas idle.
3. Ray Serve: the app on an embedded local Ray (2 CPUs), HTTP on 127.0.0.1. A second
   process (this script with `--client`) sends `--requests` requests per concurrency
   level with aiohttp; a `--malformed` share is bad (empty or 10k-char query, k = 0,
   broken JSON, wrong content type) and must get a 4xx. Reported per level: p50/p95/p99
   latency of the valid requests, throughput, status counts, the text encoder's batch
   sizes during the level, and the replicas' own compute times (from `/v1/stats`). With
   one shard the ingress replica encodes a text query and searches itself (no handle
   call). At concurrency 1 the client's p50 is broken down: the compute (encode +
   search), the rest of the ingress's time (the batch wait, FastAPI), and the proxy +
   HTTP hop.
4. Index build: `--build-clips` real ESC-50 clips (2 s) ingested in units of
   `--build-unit` clips, then embedded by `run_build_index` (Ray Data, 2 actors at 0.5
   CPU) and by a plain loop in this process calling the very per-unit code the actors
   run (`IndexEmbedder.run_unit`): clips/s end to end (Ray: starting its actors and
   loading the model in each; the loop: its one model load), and at steady state (Ray:
   from the commit markers once both actors committed a unit,
   `common.steady_commit_rate`; the loop: after its model load).

The Serve/in-process ratios are p50 at concurrency 1 over each in-process p50, and, more
robust on a shared machine, a paired run that alternates one in-process query and one
HTTP query (the same queries, the same moments). Results are
printed and written to `<out>/serve_load.json` with the machine's load average (other
work on a shared machine competes for the same cores).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from common import steady_commit_rate

SOUNDS = [
    ("dog", "barks"), ("cat", "meows"), ("bird", "chirps"), ("rain", "falls"),
    ("wind", "blows"), ("door", "knocks"), ("bell", "rings"), ("engine", "runs"),
    ("man", "speaks"), ("woman", "sings"), ("child", "laughs"), ("water", "flows"),
    ("car", "passes"), ("siren", "wails"), ("clock", "ticks"),
]  # fmt: skip


def queries(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        (a, b), (c, d) = rng.sample(SOUNDS, 2)
        out.append(f"a {a} {b} while a {c} {d}")
    return out


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan")}
    ordered = sorted(values)

    def at(q: float) -> float:
        return 1e3 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50_ms": at(0.50), "p95_ms": at(0.95), "p99_ms": at(0.99)}


# --------------------------------------------------------------------------- client


MALFORMED = (
    ("empty query", {"json": {"query": "", "k": 10}}),
    ("k = 0", {"json": {"query": "a dog barks", "k": 0}}),
    ("broken JSON", {"data": b'{"query": "a dog', "headers": {"Content-Type": "application/json"}}),
    ("text/plain", {"data": b'{"query": "a dog"}', "headers": {"Content-Type": "text/plain"}}),
    ("10k characters", {"json": {"query": "a" * 10_000, "k": 10}}),
)


async def run_client(url: str, concurrency: int, n: int, malformed: float, seed: int) -> dict:
    import aiohttp

    texts = queries(n, seed)
    every = round(1 / malformed) if malformed > 0 else 0
    plan: list[tuple[bool, dict[str, Any]]] = []
    for i in range(n):
        if every and i % every == every - 1:
            plan.append((True, MALFORMED[(i // every) % len(MALFORMED)][1]))
        else:
            plan.append((False, {"json": {"query": texts[i], "k": 10}}))
    latencies: list[float] = []
    took: list[float] = []
    statuses: Counter[str] = Counter()
    wrong: Counter[str] = Counter()
    next_index = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while next_index < n:
            bad, kwargs = plan[next_index]
            next_index += 1
            started = time.perf_counter()
            async with session.post(f"{url}/v1/search/text", **kwargs) as response:
                body = await response.read()
                status = response.status
            elapsed = time.perf_counter() - started
            statuses[str(status)] += 1
            if bad and not 400 <= status < 500:
                wrong["malformed not 4xx"] += 1
            if not bad:
                if status == 200:
                    latencies.append(elapsed)
                    took.append(json.loads(body)["took_ms"] / 1e3)
                else:
                    wrong["valid not 200"] += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": n,
        "malformed_sent": sum(1 for bad, _ in plan if bad),
        "status_counts": dict(sorted(statuses.items())),
        "errors_5xx": sum(v for k, v in statuses.items() if k.startswith("5")),
        "unexpected": dict(wrong),
        "wall_s": wall,
        "throughput_rps": n / wall,
        **percentiles(latencies),
        "ingress_p50_ms": percentiles(took)["p50_ms"],
    }


# --------------------------------------------------------------------------- driver


def build_checkpoint_and_index(work: Path, n_clips: int) -> tuple[str, str]:
    from gpa_ray.checkpoints import save_gpa
    from gpa_ray.config_loading import load_config
    from gpa_ray.index import store
    from gpa_ray.models.factory import build_gpa
    from gpa_ray.testing.synthetic import random_unit_embeddings, synthetic_index_clips

    cfg = load_config("debug")
    torch.manual_seed(0)
    model = build_gpa(cfg)
    checkpoint = str(work / "checkpoint")
    save_gpa(model, cfg, checkpoint)
    e, p = cfg.gpa.embed_dim, cfg.gpa.n_prototypes + 1
    index_root = str(work / "index")
    store.write_version(
        index_root,
        "v-synthetic",
        synthetic_index_clips(n_clips, captions=1, corpus="synthetic"),
        random_unit_embeddings(n_clips, e, p, seed=1),
        random_unit_embeddings(n_clips, e, p, seed=2),
        checkpoint=checkpoint,
        dtype="float16",
    )
    return checkpoint, index_root


def in_process(cfg: Any, checkpoint: str, n: int) -> dict[str, Any]:
    from gpa_ray.serve.retriever import SearchService, TextQueryEncoder, load_model

    loaded = load_model(cfg, checkpoint)
    encoder = TextQueryEncoder(loaded.model)
    service = SearchService(cfg, loaded)
    texts = queries(n + 20, seed=99)
    for text in texts[:20]:
        service.search_text(encoder.encode([text])[0], 10)
    full, encode_only = [], []
    for text in texts[20:]:
        started = time.perf_counter()
        emb = encoder.encode([text])[0]
        encoded = time.perf_counter()
        service.search_text(emb, 10)
        done = time.perf_counter()
        full.append(done - started)
        encode_only.append(encoded - started)
    embeddings = [encoder.encode([t])[0] for t in texts[:200]]
    times = []
    for emb in embeddings:
        t0 = time.perf_counter()
        service.search_text(emb, 10)
        times.append(time.perf_counter() - t0)
    return {
        "queries": n,
        **percentiles(full),
        "encode_p50_ms": percentiles(encode_only)["p50_ms"],
        "mean_ms": 1e3 * statistics.fmean(full),
        "sequential_qps": n / sum(full),
        "search_only": {"ann": service.health()["ann"], **percentiles(times)},
    }


def serve_levels(url: str, levels: list[int], n: int, malformed: float) -> list[dict[str, Any]]:
    """Warm-up and stats through the project's client; the load itself from a separate
    aiohttp process (`--client`), which keeps `level` requests in flight at once."""
    from gpa_ray.client import RetrieverClient

    client = RetrieverClient(url, timeout_s=60)
    for text in queries(20, seed=7):  # warm every deployment
        client.search_text(text, k=10)
    out = []
    for level in levels:
        before = Counter(client.stats()["text"])
        result = subprocess.run(
            [
                sys.executable,
                __file__,
                "--client",
                url,
                "--concurrency",
                str(level),
                "--requests",
                str(n),
                "--malformed",
                str(malformed),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        stats = client.stats()
        after = Counter(stats["text"])
        batches = {k: v for k, v in sorted((after - before).items(), key=lambda kv: int(kv[0]))}
        sizes = [int(k) for k, v in batches.items() for _ in range(v)]
        level_result = json.loads(result.stdout)
        level_result["text_batches"] = batches
        level_result["mean_batch_size"] = statistics.fmean(sizes) if sizes else 0.0
        # Replica compute over the last 1000 calls: this level's when it sent >= 1000.
        level_result["compute_ms"] = stats["compute_ms"]
        out.append(level_result)
        print(json.dumps(level_result), flush=True)
    return out


def paired(cfg: Any, checkpoint: str, url: str, n: int) -> dict[str, Any]:
    """In-process and HTTP (concurrency 1) for the same queries, alternating, so that both
    see the same machine load; the ratio of their p50s and the median per-query ratio."""
    import requests

    from gpa_ray.serve.retriever import SearchService, TextQueryEncoder, load_model

    loaded = load_model(cfg, checkpoint)
    encoder = TextQueryEncoder(loaded.model)
    service = SearchService(cfg, loaded)
    local, served, ratios = [], [], []
    with requests.Session() as session:
        for text in queries(n, seed=5):
            started = time.perf_counter()
            service.search_text(encoder.encode([text])[0], 10)
            middle = time.perf_counter()
            response = session.post(f"{url}/v1/search/text", json={"query": text, "k": 10})
            done = time.perf_counter()
            response.raise_for_status()
            local.append(middle - started)
            served.append(done - middle)
            ratios.append((done - middle) / (middle - started))
    return {
        "queries": n,
        "in_process_p50_ms": percentiles(local)["p50_ms"],
        "serve_p50_ms": percentiles(served)["p50_ms"],
        "p50_ratio": percentiles(served)["p50_ms"] / percentiles(local)["p50_ms"],
        "median_per_query_ratio": statistics.median(ratios),
    }


def build_throughput(work: Path, checkpoint: str, n_clips: int, unit_clips: int) -> dict[str, Any]:
    from gpa_ray.config_loading import load_config
    from gpa_ray.data.ingest import run_ingest
    from gpa_ray.index.build import IndexEmbedder, plan_build, run_build_index
    from gpa_ray.testing.data import shared_data_dir

    ingest = work / "ingest"
    run_ingest(
        load_config(
            "debug",
            [
                "corpus.kind=esc50",
                f"corpus.root={shared_data_dir() / 'esc50'}",
                f"corpus.limit={n_clips}",
                f"ingest.output={ingest}",
                "ingest.max_seconds=2.0",
                f"ingest.rows_per_commit={unit_clips}",
            ],
        )
    )

    def cfg_for(name: str) -> Any:
        return load_config(
            "debug",
            [
                f"index.input={ingest / 'clips'}",
                f"index.checkpoint={checkpoint}",
                f"index.output={work / name}",
                "index.embed_pool.actors=2",
                "index.embed_pool.cpus_per_actor=0.5",
            ],
        )

    started = time.perf_counter()
    summary = run_build_index(cfg_for("built-ray"))
    ray_wall = time.perf_counter() - started
    steady = steady_commit_rate(work / "built-ray", "clips")
    cfg = cfg_for("built-loop")
    started = time.perf_counter()
    torch.set_num_threads(1)
    plan = plan_build(cfg)
    embedder = IndexEmbedder(dataclasses.asdict(cfg), plan.layout.version, plan.files)
    loaded = time.perf_counter()
    clips = sum(embedder.run_unit(u)["clips"] for u in range(len(plan.files)))
    loop_wall = time.perf_counter() - started
    loop_rate = clips / (time.perf_counter() - loaded)
    return {
        "clips": summary["clips"],
        "units": len(plan.files),
        "ray_data": {
            "wall_s": ray_wall,
            "clips_per_s": summary["clips"] / ray_wall,
            "steady_clips_per_s": steady,
        },
        "plain_loop": {
            "wall_s": loop_wall,
            "clips_per_s": clips / loop_wall,
            "clips_per_s_after_model_load": loop_rate,
        },
        "ray_over_loop_speed": (summary["clips"] / ray_wall) / (clips / loop_wall),
        "ray_steady_over_loop_after_load": None if steady is None else steady / loop_rate,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=2000, help="requests per level")
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--malformed", type=float, default=0.1)
    parser.add_argument("--in-process-queries", type=int, default=300)
    parser.add_argument("--build-clips", type=int, default=192, help="0 skips the build part")
    parser.add_argument("--build-unit", type=int, default=16, help="clips per index work unit")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--set", action="append", default=[], help="a dotted config override (repeatable)"
    )
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        result = asyncio.run(
            run_client(args.client, int(args.concurrency), args.requests, args.malformed, 1)
        )
        print(json.dumps(result))
        return 0

    from gpa_ray.config_loading import load_config
    from gpa_ray.testing.services import free_loopback_ports, loopback_ray_env

    loopback_ray_env()
    torch.set_num_threads(1)
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        checkpoint, index_root = build_checkpoint_and_index(work, args.clips)
        print(
            f"checkpoint + {args.clips}-clip index written in {time.perf_counter() - started:.1f} s"
        )
        cfg = load_config(
            "debug",
            [
                f"serve.index_uri={index_root}",
                f"serve.port={free_loopback_ports(1)[0]}",
                "serve.reload_interval_s=0",
                "serve.cpus_per_replica=0.25",
                "ray.num_cpus=2",
                *args.set,
            ],
        )
        local = in_process(cfg, checkpoint, args.in_process_queries)
        print("in process:", json.dumps(local), flush=True)
        from gpa_ray.jobs_cli import init_ray
        from gpa_ray.serve.app import start_retriever

        init_ray(cfg)
        url = start_retriever(cfg)
        served = serve_levels(url, levels, args.requests, args.malformed)
        alternating = paired(cfg, checkpoint, url, args.in_process_queries)
        print("paired:", json.dumps(alternating), flush=True)
        # Again with the Serve replicas up but idle: the same machine state as the levels.
        local_after = in_process(cfg, checkpoint, args.in_process_queries)
        print("in process, Serve idle:", json.dumps(local_after), flush=True)
        build = (
            build_throughput(work, checkpoint, args.build_clips, args.build_unit)
            if args.build_clips
            else None
        )
        from ray import serve

        serve.shutdown()
    c1 = next((s for s in served if s["concurrency"] == 1), served[0])
    compute = c1["compute_ms"]
    # One shard: the ingress encodes the text and searches itself (no handle call).
    work_ms = compute["searcher"]["p50_ms"]
    results = {
        "clips_indexed": args.clips,
        "model": "debug preset (MiniLM-L6 text tower, CNN14 width 8, embed_dim 32, K = 3)",
        "index": {"dtype": "float16", "ann": cfg.index.ann, "shortlist": cfg.index.shortlist},
        "serve": {
            "text_batch_size": cfg.serve.text_batch_size,
            "text_batch_wait_s": cfg.serve.text_batch_wait_s,
            "levels": served,
        },
        "in_process": local,
        "in_process_serve_idle": local_after,
        "serve_over_in_process_p50_c1": c1["p50_ms"] / local["p50_ms"],
        "serve_over_in_process_serve_idle_p50_c1": c1["p50_ms"] / local_after["p50_ms"],
        "paired_concurrency_1": alternating,
        "breakdown_p50_ms_c1": {
            "client": c1["p50_ms"],
            "ingress_took": c1["ingress_p50_ms"],
            "compute_encode_and_search": compute["searcher"]["p50_ms"],
            "ingress_besides_compute": c1["ingress_p50_ms"] - work_ms,
            "proxy_and_http": c1["p50_ms"] - c1["ingress_p50_ms"],
        },
        "total_5xx": sum(s["errors_5xx"] for s in served),
        "index_build": build,
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(results, indent=2))
    keys = (
        "serve_over_in_process_p50_c1",
        "serve_over_in_process_serve_idle_p50_c1",
        "total_5xx",
        "breakdown_p50_ms_c1",
    )
    print(json.dumps({**{k: results[k] for k in keys}, "paired": alternating}))
    print(f"wrote {out / 'serve_load.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Serve at index scale: the retriever on Ray Serve over the versions `index_scale.py`
wrote (N clips + N captions, IVF, 1 and 4 shards), against the same searches in process.

    python benchmarks/index_scale.py --sizes 1000000        # writes the versions first
    python benchmarks/serve_scale.py --n 1000000 [--queries 500] [--work ...] [--out ...]

Per shard count S:
1. A GPA checkpoint of embed_dim 256 and K + 1 = 4 (tiny towers, seeded) is saved, and a
   servable version is made of the benchmark's version: the same search files (linked,
   not copied) under a manifest naming that checkpoint and its weights digest.
2. Ray Serve starts the retriever on it (embedded local Ray, 2 CPUs, replicas at 0.25
   CPU). Timed: `serve.run` until every replica is ready (Ray actors, imports, model
   load, mapping the shards: one replica start per deployment, in parallel), and the
   searchers' own map time (`load_s` of `/healthz`). No replica trains an ANN: the
   versions hold trained faiss indexes and mapping them reads no vectors.
3. `--queries` T2A and A2T vector searches (`POST /v1/search/vector`, the benchmark's
   query embeddings, k = 10) one at a time: p50/p99 through Serve, and the same queries
   in process (`SearchService` over the same version and checkpoint) before Serve starts.
   Results must be the in-process ones.
4. Each searcher replica's RSS (VmRSS, and its anonymous part from /proc/<pid>/smaps)
   after the queries: what a replica of N / S items costs.

Written to `<out>/serve_scale.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

E, K1 = 256, 4


def servable_version(source: Path, root: Path, checkpoint: str, digest: str) -> Path:
    """A version folder linking `source`'s files, its manifest naming `checkpoint`."""
    from gpa_ray.index import store

    version = root / f"{source.name}-served"
    version.mkdir(parents=True, exist_ok=True)
    for name in ("clips", "texts", "search"):
        link = version / name
        if not link.exists():
            link.symlink_to((source / name).resolve())
    manifest = store.IndexManifest.from_json((source / "manifest.json").read_bytes())
    manifest = dataclasses.replace(
        manifest, version=version.name, checkpoint=checkpoint, checkpoint_digest=digest
    )
    (version / "manifest.json").write_bytes(manifest.to_json())
    return version


def save_checkpoint(root: Path) -> tuple[str, str]:
    from gpa_ray.checkpoints import weights_digest
    from gpa_ray.testing.models import (
        save_tiny_text_model,
        tiny_gpa_checkpoint,
        tiny_gpa_config,
        tiny_gpa_run_config,
    )

    text_model = save_tiny_text_model(root / "text_model")
    cfg = tiny_gpa_run_config(text_model)
    cfg = dataclasses.replace(cfg, gpa=tiny_gpa_config(embed_dim=E, n_prototypes=K1 - 1))
    checkpoint = str(root / "checkpoint")
    tiny_gpa_checkpoint(checkpoint, cfg)
    return checkpoint, weights_digest(checkpoint)


def _percentiles(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def _queries(q: Any, key: str, n: int) -> list[Any]:
    import torch

    from gpa_ray.models.gpa import Embeddings

    return [
        Embeddings(
            torch.from_numpy(q[f"{key}_global"][b : b + 1]),
            torch.from_numpy(q[f"{key}_prototypes"][b : b + 1]),
        )
        for b in range(n)
    ]


def in_process(cfg: Any, checkpoint: str, q: Any, n: int) -> dict[str, Any]:
    import torch

    from gpa_ray.serve.retriever import SearchService, load_model

    torch.set_num_threads(cfg.serve.torch_threads)  # what a replica runs with
    service = SearchService(cfg, load_model(cfg, checkpoint))
    out: dict[str, Any] = {"load_s": service.load_s}
    for name, key, search in (
        ("t2a", "text", service.search_text),
        ("a2t", "audio", lambda e, k: service.search_audio(e, k, use_bias=False)),
    ):
        times, found = [], []
        for query in _queries(q, key, n):
            started = time.perf_counter()
            result = search(query, 10)
            times.append(1e3 * (time.perf_counter() - started))
            found.append([r.get("clip_id", r.get("text_id")) for r in result["results"]])
        out[name] = {**_percentiles(times), "top10": found}
    return out


def through_serve(url: str, q: Any, n: int) -> dict[str, Any]:
    import requests

    out: dict[str, Any] = {}
    with requests.Session() as session:
        for name, key, target in (("t2a", "text", "clips"), ("a2t", "audio", "texts")):
            times, found = [], []
            for b in range(n):
                body = {
                    "global": q[f"{key}_global"][b].tolist(),
                    "prototypes": q[f"{key}_prototypes"][b].tolist(),
                    "target": target,
                    "k": 10,
                    "bias": False,
                }
                started = time.perf_counter()
                response = session.post(f"{url}/v1/search/vector", json=body, timeout=60)
                times.append(1e3 * (time.perf_counter() - started))
                response.raise_for_status()
                found.append(
                    [r.get("clip_id", r.get("text_id")) for r in response.json()["results"]]
                )
            out[name] = {**_percentiles(times), "top10": found}
    return out


def _timings(run: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {k: {m: v for m, v in run[k].items() if m != "top10"} for k in ("t2a", "a2t")}


def replica_memory() -> dict[str, dict[str, float]]:
    """VmRSS and anonymous resident MB of every Serve replica process on this machine, by
    deployment (Ray titles a replica's process `ray::ServeReplica:<app>:<deployment>`)."""
    out = {}
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode()
            if "ServeReplica:" not in title:
                continue
            status = (proc / "status").read_text()
            rollup = (proc / "smaps_rollup").read_text()
        except (OSError, IndexError):
            continue
        name = title.split(":")[-1].strip()
        rss = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS"))
        anon = next(int(x.split()[1]) for x in rollup.splitlines() if x.startswith("Anonymous:"))
        out[name] = {"rss_mb": rss / 1024, "anonymous_mb": anon / 1024}
    return out


def run_shards(version: Path, checkpoint: str, q: Any, n_queries: int, port: int) -> dict[str, Any]:
    from ray import serve

    from gpa_ray.config_loading import load_config
    from gpa_ray.jobs_cli import init_ray
    from gpa_ray.serve.app import retriever_app

    cfg = load_config(
        None,
        [
            f"serve.index_uri={version}",
            f"serve.port={port}",
            "serve.host=127.0.0.1",
            "serve.reload_interval_s=0",
            "serve.cpus_per_replica=0.25",
            "ray.num_cpus=2",
        ],
    )
    local = in_process(cfg, checkpoint, q, n_queries)
    print(f"{version.name}: in process", {k: local[k] for k in ("load_s",)}, flush=True)
    init_ray(cfg)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    started = time.perf_counter()
    serve.run(retriever_app(cfg), name=cfg.serve.app_name, route_prefix="/")
    app_start_s = time.perf_counter() - started
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    import requests

    health = requests.get(f"{url}/healthz", timeout=60).json()
    served = through_serve(url, q, n_queries)
    memory = replica_memory()
    serve.shutdown()
    same = {
        name: float(
            np.mean(
                [a == b for a, b in zip(served[name]["top10"], local[name]["top10"], strict=True)]
            )
        )
        for name in ("t2a", "a2t")
    }
    return {
        "version": version.name,
        "shards": len(health["shards"]),
        "app_start_s": app_start_s,
        "searcher_load_s": health["load_s"],
        "in_process_load_s": local["load_s"],
        "in_process": _timings(local),
        "serve": _timings(served),
        "serve_over_in_process_p50": {
            k: served[k]["p50_ms"] / local[k]["p50_ms"] for k in ("t2a", "a2t")
        },
        "top10_equals_in_process_share": same,
        "replica_memory": memory,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--work", type=Path, default=Path("outputs/benchmarks/index_scale"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    from gpa_ray.testing.services import free_loopback_ports, loopback_ray_env

    loopback_ray_env()
    sized = args.work / f"n{args.n}"
    if not (sized / "ivf-s1" / "manifest.json").exists():
        sys.exit(f"no versions at {sized}: run benchmarks/index_scale.py --sizes {args.n}")
    q = np.load(sized / "queries.npz")
    n_queries = min(args.queries, len(q["text_global"]))
    checkpoint, digest = save_checkpoint(sized / "serve")
    runs = []
    for source in ("ivf-s1", "ivf-s4"):
        version = servable_version(sized / source, sized / "serve", checkpoint, digest)
        runs.append(run_shards(version, checkpoint, q, n_queries, free_loopback_ports(1)[0]))
        print(json.dumps(runs[-1]), flush=True)
    report = {
        "n_clips": args.n,
        "n_texts": args.n,
        "embed_dim": E,
        "prototypes": K1,
        "queries": n_queries,
        "runs": runs,
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_scale.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / 'serve_scale.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

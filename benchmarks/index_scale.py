"""Index scale: build and map indexes of N clips (and N captions) per ANN kind, and measure
what a searcher costs: resident memory per item against the README's formula, load time,
stage-1 recall@100 against exact search, end-to-end top-10 agreement with exhaustive full
GPA scoring, and in-process latency; then the cost curve over N (a PNG).

Data: synthetic embeddings with the structure of real ones, not uniform noise: N / 1000
cluster centres uniform on the unit sphere in E = 256 dimensions; a clip is its centre
plus Gaussian noise (cosine to its centre about 0.7), its caption is the clip plus noise
(cosine to the clip about 0.8), and each of the K + 1 = 4 prototypes of an item is the
item plus noise. Queries: 1000 captions (T2A) and 1000 clips (A2T) perturbed again.

The scorer is a GPA model of embed_dim 256 and K + 1 = 4 with LASS at its identity
initialisation (the tiny test towers; the towers do not take part: queries are vectors).

Every build and every searcher runs in its own process so that its peak RSS and its
per-file resident pages (from /proc/self/smaps) are its own.

    python benchmarks/index_scale.py                       # N = 100k and 1M (about 1 h here)
    python benchmarks/index_scale.py --sizes 20000 --queries 200   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

E, K1 = 256, 4
UNIT_ROWS = 50_000
SHORTLISTS = (100, 200, 400)
"""Shortlists at which the end-to-end top-10 is compared with exhaustive scoring."""
QUERY_NOISE = 0.5


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _noisy(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """x plus noise of total norm about `sigma` (x is unit): cosine about 1/sqrt(1+s^2)."""
    return _unit(x + rng.standard_normal(x.shape, np.float32) * (sigma / np.sqrt(x.shape[-1])))


def _prototypes(g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _noisy(np.repeat(g[:, None, :], K1, axis=1), 0.6, rng)


def generate(units_dir: Path, n: int, seed: int = 0) -> None:
    """Unit files of n clips (one caption each) in the index's unit layout, streaming."""
    import torch

    from gpa_ray.index import store
    from gpa_ray.models.gpa import Embeddings
    from gpa_ray.testing.synthetic import synthetic_index_clips

    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((max(1, n // 1000), E), np.float32))
    for unit, start in enumerate(range(0, n, UNIT_ROWS)):
        rows = min(UNIT_ROWS, n - start)
        cluster = rng.integers(0, len(centres), rows)
        clips_g = _noisy(centres[cluster], 1.0, rng)
        texts_g = _noisy(clips_g, 0.75, rng)
        clips = synthetic_index_clips(rows, captions=1, corpus="syn", start=start)
        for clip, c in zip(clips, cluster, strict=True):
            clip["labels"] = [f"c{c % 50}"]
        clip_emb = Embeddings(
            torch.from_numpy(clips_g), torch.from_numpy(_prototypes(clips_g, rng))
        )
        text_emb = Embeddings(
            torch.from_numpy(texts_g), torch.from_numpy(_prototypes(texts_g, rng))
        )
        layout = store.IndexLayout(str(units_dir), "units")
        store.write_table(
            layout.clips_file(unit), store.index_clips_table(clips, clip_emb, "float16", False)
        )
        texts = store.caption_rows(clips)
        store.write_table(
            layout.texts_file(unit), store.index_texts_table(texts, text_emb, "float16")
        )


def queries(units_dir: Path, n_queries: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Perturbed captions (text queries) and clips (audio queries), with prototypes."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    out = {}
    for side, name in (("texts", "text"), ("clips", "audio")):
        table = pq.read_table(sorted((units_dir / "units" / side).glob("*.parquet"))[0])
        g = table.column("global").combine_chunks()
        g = g.flatten().to_numpy(zero_copy_only=False).reshape(len(g), E).astype(np.float32)
        picked = _noisy(g[rng.choice(len(g), n_queries, replace=False)], QUERY_NOISE, rng)
        out[f"{name}_global"] = picked
        out[f"{name}_prototypes"] = _prototypes(picked, rng)
    return out


# --------------------------------------------------------------------------- subprocesses


def smaps() -> dict[str, int]:
    """Resident bytes of this process: anonymous, and per mapped index file kind."""
    out = {"anon": 0, "ann": 0, "meta": 0, "vectors": 0, "other_files": 0}
    current = "other_files"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if not head:
            continue
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            name = head[5] if len(head) > 5 else ""
            current = (
                "ann"
                if name.endswith(".faiss")
                else "meta"
                if name.endswith("_meta.arrow")
                else "vectors"
                if name.endswith(".npy")
                else "other_files"
                if name.startswith("/")
                else "anon"
            )
        elif head[0] == "Rss:":
            out[current] += int(head[1]) * 1024
    return out


def build_main(version_dir: str, kind: str, shards: int) -> dict[str, Any]:
    from gpa_ray.index import ann, shard_files, store

    layout = store.IndexLayout(*version_dir.rsplit("/", 1))
    clip_files = sorted(f"clips/{p.name}" for p in (Path(version_dir) / "clips").glob("*.parquet"))
    text_files = [f.replace("clips/", "texts/") for f in clip_files]
    settings = ann.AnnSettings(kind=kind)
    started = time.perf_counter()
    search = shard_files.write_shards(
        version_dir, clip_files, text_files, n_shards=shards, settings=settings
    )
    build_s = time.perf_counter() - started
    n = sum(search["clips"]["counts"])
    manifest = store.IndexManifest(
        version=layout.version,
        created_at=store.utc_now(),
        checkpoint="synthetic",
        embed_dim=E,
        n_prototypes=K1,
        dtype="float16",
        n_clips=n,
        n_texts=sum(search["texts"]["counts"]),
        clips_with_audio=0,
        clip_files=clip_files,
        text_files=text_files,
        search=search,
    )
    store.write_manifest(layout.root, manifest)
    # VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork + exec.
    return {"build_s": build_s, "build_peak_rss_bytes": _rss_bytes("VmHWM"), "search": search}


def probe_main(
    version_dir: str, queries_file: str, n_exhaustive: int, n_agree: int
) -> dict[str, Any]:
    """Map the version, search every query, report memory, time and what was found."""
    import torch

    from gpa_ray.index import ann, mapped
    from gpa_ray.index.search import IndexSearcher
    from gpa_ray.models.gpa import Embeddings
    from gpa_ray.testing.models import tiny_gpa_config, tiny_gpa_model

    torch.set_num_threads(1)
    model = tiny_gpa_model(tiny_gpa_config(embed_dim=E, n_prototypes=K1 - 1)).eval()
    q = np.load(queries_file)
    before = smaps()
    started = time.perf_counter()
    shards = mapped.open_version(version_dir)
    load_s = time.perf_counter() - started
    after_load = smaps()
    kind = shards[0].manifest.search["ann"]["kind"]
    settings = ann.AnnSettings(kind=kind)
    searcher = IndexSearcher(shards, model, settings, shortlist=100)
    out: dict[str, Any] = {"load_s": load_s, "rss_before": before, "rss_after_load": after_load}
    for name, side, key, method in (
        ("t2a", "clips", "text", searcher.text_to_audio),
        ("a2t", "texts", "audio", searcher.audio_to_text),
    ):
        global_, protos = q[f"{key}_global"], q[f"{key}_prototypes"]
        stage1 = []
        for s in shards:
            mapped_side = getattr(s, side)
            stage1.append(shortlists(mapped_side, global_, settings, 100))
        times, top10 = [], []
        for b in range(len(global_)):
            query = Embeddings(
                torch.from_numpy(global_[b : b + 1]), torch.from_numpy(protos[b : b + 1])
            )
            t0 = time.perf_counter()
            found = method(query, 10)[0]
            times.append(1e3 * (time.perf_counter() - t0))
            top10.append([r["clip_id" if side == "clips" else "text_id"] for r in found])
        out[name] = {
            "stage1_top100": [sum(parts, []) for parts in zip(*stage1, strict=True)],
            "top10": top10,
            "p50_ms": float(np.percentile(times, 50)),
            "p99_ms": float(np.percentile(times, 99)),
        }
    out["rss_after_queries"] = smaps()
    if n_exhaustive:
        out["exhaustive"] = exhaustive(shards, model, q, n_exhaustive)
    out["top10_by_shortlist"] = {
        name: {
            str(short): [
                [r["clip_id" if name == "t2a" else "text_id"] for r in found[0]]
                for found in (
                    method(
                        Embeddings(
                            torch.from_numpy(q[f"{key}_global"][b : b + 1]),
                            torch.from_numpy(q[f"{key}_prototypes"][b : b + 1]),
                        ),
                        10,
                        short,
                    )
                    for b in range(n_agree)
                )
            ]
            for short in SHORTLISTS
        }
        for name, key, method in (
            ("t2a", "text", searcher.text_to_audio),
            ("a2t", "audio", searcher.audio_to_text),
        )
    }
    return out


def shortlists(side: Any, queries: np.ndarray, settings: Any, n: int) -> list[list[str]]:
    """The ids stage 1 shortlists per query, as the searcher forms them: the ANN's best
    n (IVF-PQ: its best `refine` x n, re-scored exactly from the stored vectors)."""
    from gpa_ray.index import ann

    _, rows = side.ann.search(ann.pad(queries), settings.candidates(n))
    out = []
    for b, row in enumerate(rows):
        row = row[row >= 0]
        if settings.kind == "ivfpq":
            exact = np.asarray(side.global_[row], np.float32) @ queries[b]
            row = row[np.argsort(-exact, kind="stable")[:n]]
        out.append([side.ids[int(r)].as_py() for r in row])
    return out


def exhaustive(shards: list, model: Any, q: dict, n_queries: int) -> dict[str, list]:
    """Top-10 ids by the full GPA score over every item (tiles of the mapped vectors)."""
    import torch

    from gpa_ray.models.gpa import Embeddings

    out = {}
    for name, side, key in (("t2a", "clips", "text"), ("a2t", "texts", "audio")):
        query = Embeddings(
            torch.from_numpy(q[f"{key}_global"][:n_queries]),
            torch.from_numpy(q[f"{key}_prototypes"][:n_queries]),
        )
        best_scores = torch.full((n_queries, 0), -np.inf)
        best_ids: list[list[str]] = [[] for _ in range(n_queries)]
        for s in shards:
            mapped_side = getattr(s, side)
            for start in range(0, len(mapped_side), 32_768):
                rows = np.arange(start, min(start + 32_768, len(mapped_side)))
                items = mapped_side.embeddings(rows)
                with torch.no_grad():
                    if side == "clips":
                        score = model.score(items, query).T  # [query, item]
                    else:
                        score = model.score(query, items)
                ids = mapped_side.ids.slice(start, len(rows)).to_pylist()
                merged = torch.cat([best_scores, score], dim=1)
                top = torch.topk(merged, min(10, merged.shape[1]), dim=1)
                pool = [b + ids for b in best_ids]
                best_ids = [[pool[b][i] for i in top.indices[b].tolist()] for b in range(n_queries)]
                best_scores = top.values
        out[name] = best_ids
    return out


def _child(*args: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False
    )
    if result.returncode:
        raise RuntimeError(f"{args[0]} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def reload_main(first: str, second: str, queries_file: str) -> dict[str, Any]:
    """Serve `first`, move to `second` the way a searcher replica does (map the new one,
    swap, drop the old), searching before and after: the peak against one version."""
    import gc

    import torch

    from gpa_ray.index import ann, mapped
    from gpa_ray.index.search import IndexSearcher
    from gpa_ray.models.gpa import Embeddings
    from gpa_ray.testing.models import tiny_gpa_config, tiny_gpa_model

    torch.set_num_threads(1)
    model = tiny_gpa_model(tiny_gpa_config(embed_dim=E, n_prototypes=K1 - 1)).eval()
    q = np.load(queries_file)
    query = Embeddings(torch.from_numpy(q["text_global"]), torch.from_numpy(q["text_prototypes"]))

    def open_searcher(uri: str) -> IndexSearcher:
        shards = mapped.open_version(uri)
        kind = shards[0].manifest.search["ann"]["kind"]
        return IndexSearcher(shards, model, ann.AnnSettings(kind=kind), 100)

    def warm(searcher: IndexSearcher) -> None:
        for b in range(len(query)):
            searcher.text_to_audio(query[b : b + 1], 10)

    base = _rss_bytes("VmRSS")
    current = open_searcher(first)
    warm(current)
    one_version = _rss_bytes("VmRSS") - base
    _reset_peak()
    # What SearchService.reload does: map the new version, swap, release the old (its
    # pages are unmapped with it), then queries page in the new one.
    current = open_searcher(second)
    gc.collect()
    warm(current)
    peak = _rss_bytes("VmHWM") - base
    return {
        "one_version_bytes": one_version,
        "peak_during_reload_bytes": peak,
        "peak_over_one_version": peak / max(one_version, 1),
        "served": current.version,
    }


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


# --------------------------------------------------------------------------- driver


def formula_bytes(kind: str, build: dict[str, Any], version_dir: Path) -> dict[str, float]:
    """The README's resident bytes per item: ANN bytes + metadata bytes (per side)."""
    from gpa_ray.index import ann

    settings = ann.AnnSettings(kind=kind)
    out = {}
    for side in ("clips", "texts"):
        n = sum(build["search"][side]["counts"])
        meta = sum(p.stat().st_size for p in version_dir.glob(f"search/*/{side}_meta.arrow"))
        out[side] = ann.bytes_per_item(settings, build["search"][side]["stage1_dim"]) + meta / n
    return out


def run_size(root: Path, n: int, kinds: list[str], n_queries: int, n_exhaustive: int) -> dict:
    units = root / f"n{n}"
    if not (units / "units" / "clips").exists():
        started = time.perf_counter()
        generate(units, n)
        print(f"N={n}: generated in {time.perf_counter() - started:.0f} s", flush=True)
    qfile = units / "queries.npz"
    np.savez(qfile, **queries(units, n_queries))
    results: dict[str, Any] = {}
    for kind in kinds:
        for shards in (1, 4) if kind == "ivf" else (1,):
            version = units / f"{kind}-s{shards}"
            for side in ("clips", "texts"):
                link = version / side
                version.mkdir(exist_ok=True)
                if not link.exists():
                    link.symlink_to(units / "units" / side)
            build = _child("--build", str(version), kind, str(shards))
            probe = _child(
                "--probe",
                str(version),
                str(qfile),
                str(n_exhaustive if kind == "flat" else 0),
                str(n_exhaustive),
            )
            results[f"{kind}-s{shards}"] = {
                "build": build,
                "probe": probe,
                "formula": formula_bytes(kind, build, version),
            }
            print(
                f"N={n} {kind} S={shards}: build {build['build_s']:.0f} s, load "
                f"{probe['load_s'] * 1e3:.0f} ms, p50 {probe['t2a']['p50_ms']:.1f} ms",
                flush=True,
            )
    reload = _child("--reload", str(units / "ivf-s1"), str(units / "ivf-s4"), str(qfile))
    return summarise(n, results, reload)


def summarise(n: int, results: dict[str, Any], reload: dict[str, Any]) -> dict[str, Any]:
    exact = results["flat-s1"]["probe"]
    truth = exact["exhaustive"]
    rows = {}
    for name, r in results.items():
        probe, formula = r["probe"], r["formula"]
        before, after = probe["rss_before"], probe["rss_after_queries"]
        grown = sum(after[k] - before[k] for k in ("anon", "ann", "meta"))
        formula_total = formula["clips"] * n + formula["texts"] * n
        row = {
            "build_s": r["build"]["build_s"],
            "build_peak_rss_mb": r["build"]["build_peak_rss_bytes"] / 2**20,
            "load_s": probe["load_s"],
            "resident_formula_bytes_per_item": formula,
            "rss_growth_bytes_per_item": grown / (2 * n),
            "rss_growth_over_formula": grown / formula_total,
            "stage2_vector_pages_mb": (after["vectors"] - before["vectors"]) / 2**20,
        }
        for direction in ("t2a", "a2t"):
            got, ref = probe[direction], exact[direction]
            recall = [
                len(set(a) & set(b)) / max(len(b), 1)
                for a, b in zip(got["stage1_top100"], ref["stage1_top100"], strict=True)
            ]
            m = len(truth[direction])
            agree = [a == b for a, b in zip(got["top10"][:m], truth[direction], strict=True)]
            by_shortlist = {
                short: float(
                    np.mean([a == b for a, b in zip(found, truth[direction], strict=True)])
                )
                for short, found in probe["top10_by_shortlist"][direction].items()
            }
            row[direction] = {
                "stage1_recall_at_100": float(np.mean(recall)),
                "top10_equals_exhaustive_share": float(np.mean(agree)),
                "top10_equals_exhaustive_share_by_shortlist": by_shortlist,
                "p50_ms": got["p50_ms"],
                "p99_ms": got["p99_ms"],
            }
        rows[name] = row
    sharded = {
        direction: float(
            np.mean(
                [
                    a == b
                    for a, b in zip(
                        results["ivf-s1"]["probe"][direction]["top10"],
                        results["ivf-s4"]["probe"][direction]["top10"],
                        strict=True,
                    )
                ]
            )
        )
        for direction in ("t2a", "a2t")
    }
    return {
        "n_clips": n,
        "n_texts": n,
        "kinds": rows,
        "s4_top10_equals_s1_share": sharded,
        "reload": reload,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for kind in report["sizes"][0]["kinds"]:
        having = [s for s in report["sizes"] if kind in s["kinds"]]
        sizes = [s["n_clips"] for s in having]
        rows = [s["kinds"][kind] for s in having]
        axes[0].plot(sizes, [r["rss_growth_bytes_per_item"] for r in rows], "o-", label=kind)
        axes[1].plot(sizes, [1e3 * r["load_s"] for r in rows], "o-", label=kind)
        axes[2].plot(sizes, [r["t2a"]["p50_ms"] for r in rows], "o-", label=kind)
    titles = ("searcher RSS growth per item (B)", "load time (ms)", "T2A p50 in process (ms)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("N clips (= N captions)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("--build", "--probe", "--reload"):
        mode, *args = sys.argv[1:]
        if mode == "--build":
            print(json.dumps(build_main(args[0], args[1], int(args[2]))))
        elif mode == "--probe":
            print(json.dumps(probe_main(args[0], args[1], int(args[2]), int(args[3]))))
        else:
            print(json.dumps(reload_main(*args)))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--kinds", nargs="+", default=["flat", "ivf", "ivfpq"])
    parser.add_argument(
        "--large-kinds",
        nargs="+",
        default=["flat", "ivf"],
        help="kinds measured at N >= 1M (IVF-PQ training takes long on 2 cores)",
    )
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--exhaustive", type=int, default=100, help="queries scored exhaustively")
    parser.add_argument("--work", type=Path, default=Path("outputs/benchmarks/index_scale"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/index_scale.json"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "embed_dim": E,
        "prototypes": K1,
        "queries": args.queries,
        "exhaustive_queries": args.exhaustive,
        "sizes": [],
    }
    for n in args.sizes:
        kinds = args.large_kinds if n >= 1_000_000 else args.kinds
        report["sizes"].append(run_size(args.work, n, kinds, args.queries, args.exhaustive))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

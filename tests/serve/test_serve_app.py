"""The retriever on Ray Serve (one app for the module, HTTP on loopback), started by
`jobs/serve_retriever.py` over the index that the index job wrote to the test S3 server."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch

from gpa_ray import storage
from gpa_ray.config import Config
from gpa_ray.index import store
from gpa_ray.serve.retriever import SearchService, TextQueryEncoder, load_model
from gpa_ray.testing.jobs import job_main
from gpa_ray.testing.synthetic import random_unit_embeddings, synthetic_index_clips


def _replicas() -> set[str]:
    import ray

    names = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"] for a in names if "SERVE_REPLICA" in a["name"]}


@pytest.fixture(scope="module")
def serve_app(ray_session, serve_config) -> Iterator[tuple[str, Config]]:
    from ray import serve

    cfg = serve_config("serve.text_batch_wait_s=0.05", "serve.reload_interval_s=1")
    args = [
        f"{key}={value}"
        for key, value in (
            ("serve.index_uri", cfg.serve.index_uri),
            ("serve.host", cfg.serve.host),
            ("serve.port", cfg.serve.port),
            ("serve.max_upload_mb", 1),
            ("serve.max_audio_seconds", 30),
            ("serve.max_k", 50),
            ("serve.cpus_per_replica", 0.25),
            ("serve.reload_interval_s", 1),
            ("serve.text_batch_wait_s", 0.05),
            ("storage.endpoint_url", cfg.storage.endpoint_url),
            ("storage.region", cfg.storage.region),
            ("storage.access_key_id", cfg.storage.access_key_id),
            ("storage.secret_access_key", cfg.storage.secret_access_key),
        )
    ]
    assert job_main("serve_retriever")(args, block=False) == 0
    yield f"http://127.0.0.1:{cfg.serve.port}", cfg
    serve.shutdown()


@pytest.fixture(scope="module")
def in_process(serve_app, served_index) -> tuple[TextQueryEncoder, SearchService]:
    """The same search computed in this process, for comparison."""
    _, cfg = serve_app
    loaded = load_model(cfg, served_index["checkpoint"])
    return TextQueryEncoder(loaded.model), SearchService(cfg, loaded)


def test_text_query_equals_in_process_and_exhaustive_search(serve_app, in_process) -> None:
    url, _ = serve_app
    response = requests.post(f"{url}/v1/search/text", json={"query": "a dog barking", "k": 5})
    assert response.status_code == 200, response.text
    served = response.json()["results"]
    encoder, service = in_process
    query = encoder.encode(["a dog barking"])[0]
    local = service.search_text(query, 5)["results"]
    assert [r["clip_id"] for r in served] == [r["clip_id"] for r in local]
    for a, b in zip(served, local, strict=True):
        for key in ("score", "global_score", "prototype_score", "stage1_score"):
            assert a[key] == pytest.approx(b[key], abs=1e-5)
    # The shortlist (200) covers the pool, so stage 2 equals exhaustive full scoring.
    (searcher,) = service.searcher.shards
    clips = searcher.shard.clips
    with torch.no_grad():
        full = service.model.score_pool(clips.embeddings(np.arange(len(clips))), query)[:, 0]
    best = torch.sort(full, descending=True, stable=True)
    ids = clips.ids.to_pylist()
    assert [r["clip_id"] for r in served] == [ids[i] for i in best.indices[:5]]
    torch.testing.assert_close(
        torch.tensor([r["score"] for r in served]), best.values[:5], atol=1e-5, rtol=0
    )


def test_bad_input_never_gets_a_5xx_nor_kills_a_replica(
    serve_app, check_bad_requests, shared_data
) -> None:
    url, _ = serve_app
    before = _replicas()
    # One shard: the ingress encodes and searches itself; no TextEncoder, no Searcher.
    assert {n.split("#")[1] for n in before} == {"Ingress", "AudioEncoder"}
    check_bad_requests(url)
    assert _replicas() == before
    assert requests.post(f"{url}/v1/search/text", json={"query": "rain", "k": 2}).ok
    wav = (shared_data / "esc50" / "audio" / "4-102844-A-49.wav").read_bytes()
    audio = requests.post(
        f"{url}/v1/search/audio?k=3", data=wav, headers={"Content-Type": "audio/wav"}
    )
    assert audio.status_code == 200 and len(audio.json()["results"]) == 3
    assert requests.get(f"{url}/healthz").json()["status"] == "ok"


def test_audio_query_bias_on_serve(serve_app, served_index, audio_search_by_bias) -> None:
    url, _ = serve_app
    runs = audio_search_by_bias(url)
    assert set(runs["true"]) == set(served_index["bias"])
    for text_id, result in runs["true"].items():
        assert result["score"] - runs["false"][text_id]["score"] == pytest.approx(
            served_index["bias"][text_id], abs=1e-5
        )


def test_concurrent_queries_are_batched_and_equal_single_queries(serve_app) -> None:
    url, _ = serve_app
    queries = [f"a {w} can be heard" for w in ("dog", "cow", "rain", "clock", "door", "bird")] * 3

    def ask(query: str) -> list[tuple[str, float]]:
        response = requests.post(f"{url}/v1/search/text", json={"query": query, "k": 3}, timeout=60)
        assert response.status_code == 200, response.text
        return [(r["clip_id"], r["score"]) for r in response.json()["results"]]

    with ThreadPoolExecutor(len(queries)) as pool:
        together = list(pool.map(ask, queries))
    stats = requests.get(f"{url}/v1/stats").json()
    sizes = stats["text"]
    assert max(int(s) for s in sizes) > 1, sizes
    # Every batch and every search was timed, so Serve's own share of a latency shows.
    compute = stats["compute_ms"]
    # One shard: each batch of text queries is encoded and searched in one searcher call.
    assert compute["searcher"]["calls"] >= sum(sizes.values())
    assert 0 < compute["searcher"]["p50_ms"] < 60_000
    for query, batched in zip(queries[:6], together[:6], strict=True):
        alone = ask(query)
        assert [c for c, _ in alone] == [c for c, _ in batched]
        assert [s for _, s in alone] == pytest.approx([s for _, s in batched], abs=1e-5)


def test_page_and_clip_audio_on_serve(serve_app, served_index) -> None:
    url, _ = serve_app
    page = requests.get(url + "/")
    assert page.status_code == 200 and '<form id="text-form">' in page.text
    clip = served_index["clips"][0]
    record = requests.get(f"{url}/v1/clips/{clip['clip_id']}").json()
    assert requests.get(url + record["audio_url"]).content == clip["audio"]


def _wait_for_version(url: str, version: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = requests.get(f"{url}/healthz", timeout=30).json()
        if health["index_version"] == version or time.monotonic() > deadline:
            return health
        time.sleep(0.5)


def test_searcher_follows_latest_and_survives_a_broken_pointer(serve_app, served_index) -> None:
    url, _ = serve_app
    root, storage_cfg = served_index["index_uri"], served_index["storage"]
    first = requests.get(f"{url}/healthz").json()["index_version"]
    pointer = storage.read_bytes(store.latest_uri(root), storage_cfg)
    try:
        store.write_version(
            root,
            "v-polled",
            synthetic_index_clips(4),
            random_unit_embeddings(4, 16, 4, seed=3),
            random_unit_embeddings(8, 16, 4, seed=4),
            checkpoint=served_index["checkpoint"],
            storage_cfg=storage_cfg,
        )
        assert _wait_for_version(url, "v-polled")["clips"] == 4
        broken = json.dumps({"version": "v-missing"}).encode()
        storage.write_bytes(store.latest_uri(root), broken, storage_cfg)
        time.sleep(2.5)  # two version checks fail; the current version stays in service
        assert requests.get(f"{url}/healthz").json()["index_version"] == "v-polled"
        assert requests.post(f"{url}/v1/search/text", json={"query": "rain", "k": 2}).ok
    finally:
        storage.write_bytes(store.latest_uri(root), pointer, storage_cfg)
    assert _wait_for_version(url, first)["index_version"] == first


def test_a_chunked_40_mb_body_through_serve_gets_413_and_serving_goes_on(serve_app) -> None:
    url, _ = serve_app

    def chunks() -> Iterator[bytes]:  # sent with Transfer-Encoding: chunked, no length
        yield b'{"query": "'
        for _ in range(40):
            yield b"a" * (1 << 20)
        yield b'", "k": 1}'

    before = _replicas()
    response = requests.post(
        f"{url}/v1/search/text", data=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"
    assert requests.post(f"{url}/v1/search/text", json={"query": "rain", "k": 1}).ok
    assert _replicas() == before

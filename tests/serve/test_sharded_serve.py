"""A version of 4 shards on Ray Serve: four searcher deployments, the ingress embeds a
query once, fans out and merges; every answer equals one shard's in process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from gpa_ray.config_loading import load_config
from gpa_ray.serve.retriever import SearchService, TextQueryEncoder, load_model
from gpa_ray.testing.data import tiny_esc50_ingest
from gpa_ray.testing.jobs import job_main
from gpa_ray.testing.services import free_loopback_ports


def _build(ingest: Path, checkpoint: str, output: Path, shards: int) -> None:
    args = [
        f"index.input={ingest / 'clips'}",
        f"index.checkpoint={checkpoint}",
        f"index.output={output}",
        f"index.shards={shards}",
        "index.embed_pool.actors=1",
    ]
    assert job_main("build_index")(args) == 0


@pytest.fixture(scope="module")
def sharded(ray_session, served_index, tmp_path_factory) -> Iterator[tuple[str, SearchService]]:
    from ray import serve

    from gpa_ray.serve.app import start_retriever

    ingest = tmp_path_factory.getbasetemp() / "esc50-ingest-8"  # shared with tests/index
    tiny_esc50_ingest(str(ingest), n_clips=8)
    root = tmp_path_factory.mktemp("sharded")
    _build(ingest, served_index["checkpoint"], root / "one", shards=1)
    _build(ingest, served_index["checkpoint"], root / "four", shards=4)
    overrides = ["serve.host=127.0.0.1", "serve.cpus_per_replica=0.25", "serve.reload_interval_s=0"]
    one = load_config(overrides=[f"serve.index_uri={root / 'one'}", *overrides])
    reference = SearchService(one, load_model(one, served_index["checkpoint"]))
    port = free_loopback_ports(1)[0]
    four = load_config(
        overrides=[f"serve.index_uri={root / 'four'}", f"serve.port={port}", *overrides]
    )
    url = start_retriever(four)
    yield url, reference
    serve.shutdown()


def _ids(results: list[dict], key: str = "clip_id") -> list[str]:
    return [r[key] for r in results]


def test_four_shards_on_serve_answer_as_one_shard_in_process(sharded, served_index) -> None:
    url, reference = sharded
    health = requests.get(f"{url}/healthz").json()
    assert health["shards"] == [0, 1, 2, 3] and health["clips"] == 8
    encoder = TextQueryEncoder(reference.model)
    for query in ("a dog barking", "rain", "a clock ticking"):
        served = requests.post(f"{url}/v1/search/text", json={"query": query, "k": 5}).json()
        local = reference.search_text(encoder.encode([query])[0], 5)
        assert _ids(served["results"]) == _ids(local["results"])
        for a, b in zip(served["results"], local["results"], strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
    clip_id = served_index["clips"][2]["clip_id"]
    similar = requests.get(f"{url}/v1/similar/{clip_id}", params={"k": 4}).json()
    assert _ids(similar["results"]) == _ids(reference.similar(clip_id, 4)["results"])
    record = requests.get(f"{url}/v1/clips/{clip_id}").json()
    assert record["texts"] == reference.clip(clip_id)["texts"]
    emb = reference.searcher.clip_embedding(clip_id)
    body = {"global": emb.global_[0].tolist(), "prototypes": emb.prototypes[0].tolist()}
    by_vector = requests.post(f"{url}/v1/search/vector", json={**body, "target": "texts"}).json()
    expected = reference.search_audio(emb, 10)["results"]
    assert _ids(by_vector["results"], "text_id") == _ids(expected, "text_id")

"""Filters, batch text search, search by vector and "more like this", served over the
in-process backend: each answers as its single-query equivalent does, and a malformed
value gets a 4xx saying what is wrong."""

from __future__ import annotations

import requests

from gpa_ray.serve.routes import search, vectors


def _ids(body: dict, key: str = "clip_id") -> list[str]:
    return [r[key] for r in body["results"]]


def test_text_search_filters_hold_and_bad_filters_are_refused(serve_router, served_index) -> None:
    url = serve_router(search.router)
    clips = served_index["clips"]
    label = clips[0]["labels"][0]
    having = {c["clip_id"] for c in clips if label in c["labels"]}
    body = {"query": "a dog barking", "k": 5, "filter": {"labels": [label]}}
    found = requests.post(f"{url}/v1/search/text", json=body).json()
    assert found["results"] and set(_ids(found)) <= having
    assert len(found["results"]) == min(5, len(having))
    split = clips[0]["split"]
    body = {"query": "rain", "k": 8, "filter": {"split": [split], "max_duration_s": 60}}
    found = requests.post(f"{url}/v1/search/text", json=body).json()
    assert {r["split"] for r in found["results"]} == {split}
    for bad in ({"min_duration_s": 5, "max_duration_s": 1}, {"min_duration_s": -1}, {"lab": []}):
        answer = requests.post(f"{url}/v1/search/text", json={"query": "rain", "filter": bad})
        assert answer.status_code == 422, (bad, answer.text)
        assert answer.json()["error"]["code"] == "invalid_request"


def test_batch_search_equals_single_searches(serve_router) -> None:
    url = serve_router(search.router)
    queries = ["a dog barking", "rain on a roof", "a clock ticking"]
    batch = requests.post(f"{url}/v1/search/text/batch", json={"queries": queries, "k": 3})
    assert batch.status_code == 200, batch.text
    for query, answer in zip(queries, batch.json()["responses"], strict=True):
        alone = requests.post(f"{url}/v1/search/text", json={"query": query, "k": 3}).json()
        assert answer["query"] == query and _ids(answer) == _ids(alone)
    assert requests.post(f"{url}/v1/search/text/batch", json={"queries": []}).status_code == 422
    many = requests.post(f"{url}/v1/search/text/batch", json={"queries": ["x"] * 65})
    assert many.status_code == 422 and many.json()["error"]["code"] == "too_many_queries"
    blank = requests.post(f"{url}/v1/search/text/batch", json={"queries": ["ok", " "]})
    assert blank.status_code == 422 and blank.json()["error"]["code"] == "empty_query"


def test_vector_search_equals_the_embedding_query(serve_router, local_backend) -> None:
    url = serve_router(vectors.router)
    service = local_backend.service
    clip_id = next(iter(service.searcher.shards[0].shard.clips.ids.to_pylist()))
    emb = service.searcher.clip_embedding(clip_id)
    body = {
        "global": emb.global_[0].tolist(),
        "prototypes": emb.prototypes[0].tolist(),
        "target": "texts",
        "k": 4,
    }
    answer = requests.post(f"{url}/v1/search/vector", json=body)
    assert answer.status_code == 200, answer.text
    expected = service.search_audio(emb, 4)
    assert _ids(answer.json(), "text_id") == _ids(expected, "text_id")
    as_text = requests.post(f"{url}/v1/search/vector", json={**body, "target": "clips"}).json()
    assert _ids(as_text) == _ids(service.search_text(emb, 4))
    dim = len(body["global"])
    for bad, code in (
        ({**body, "global": body["global"][:-1]}, "invalid_vector"),
        ({**body, "prototypes": None}, "invalid_vector"),
        ({**body, "global": [0.0] * dim}, "invalid_vector"),
        ({**body, "target": "both"}, "invalid_request"),
        ({**body, "k": 0}, "invalid_k"),
    ):
        answer = requests.post(f"{url}/v1/search/vector", json=bad)
        assert answer.status_code == 422 and answer.json()["error"]["code"] == code, bad


def test_more_like_this_excludes_the_clip_and_refuses_bad_values(
    serve_router, served_index
) -> None:
    url = serve_router(vectors.router)
    clip_id = served_index["clips"][3]["clip_id"]
    answer = requests.get(f"{url}/v1/similar/{clip_id}", params={"k": 3})
    assert answer.status_code == 200, answer.text
    found = answer.json()
    assert len(found["results"]) == 3 and clip_id not in _ids(found)
    scores = [r["score"] for r in found["results"]]
    assert scores == sorted(scores, reverse=True)
    split = served_index["clips"][0]["split"]
    only = requests.get(f"{url}/v1/similar/{clip_id}", params={"k": 8, "split": split}).json()
    assert {r["split"] for r in only["results"]} == {split}
    assert requests.get(f"{url}/v1/similar/no-such-clip").status_code == 404
    for params in ({"k": 0}, {"min_duration_s": -1}, {"min_duration_s": 9, "max_duration_s": 1}):
        answer = requests.get(f"{url}/v1/similar/{clip_id}", params=params)
        assert answer.status_code == 422, (params, answer.text)

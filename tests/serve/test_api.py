"""The HTTP API served in process (uvicorn on loopback, no Ray Serve): bad input, search,
the text bias, clips and audio, the page and the docs, version reloads, the Serve config."""

from __future__ import annotations

import inspect
import re
import time
from pathlib import Path

import pytest
import requests
import yaml
from pydantic import ValidationError

from gpa_ray import storage
from gpa_ray.index import store
from gpa_ray.serve.auth import ServeSecurityError
from gpa_ray.serve.local import app_from_env
from gpa_ray.testing.synthetic import random_unit_embeddings, synthetic_index_clips

from .conftest import TEST_API_KEY

REPO = Path(__file__).resolve().parents[2]


def esc50_wav(shared_data: Path, name: str = "4-102844-A-49.wav") -> bytes:
    return (shared_data / "esc50" / "audio" / name).read_bytes()


def test_every_bad_input_gets_a_4xx_that_says_why(local_server, check_bad_requests) -> None:
    url, _ = local_server
    check_bad_requests(url)
    ok = requests.post(f"{url}/v1/search/text", json={"query": "a dog barking", "k": 3})
    assert ok.status_code == 200 and len(ok.json()["results"]) == 3


def test_text_search_response(local_server, served_index) -> None:
    url, cfg = local_server
    response = requests.post(f"{url}/v1/search/text", json={"query": "  a dog barking ", "k": 50})
    assert response.status_code == 200
    body = response.json()
    assert body["query"] == "a dog barking" and body["k"] == 50
    results = body["results"]
    assert len(results) == len(served_index["clips"])  # k beyond the pool: the whole pool
    assert [r["rank"] for r in results] == list(range(1, len(results) + 1))
    assert all(a["score"] >= b["score"] for a, b in zip(results, results[1:], strict=False))
    by_id = {c["clip_id"]: c for c in served_index["clips"]}
    for r in results:
        clip = by_id[r["clip_id"]]
        assert r["captions"] == clip["captions"] and r["labels"] == clip["labels"]
        assert r["score"] == pytest.approx(r["global_score"] + r["prototype_score"], abs=1e-6)
        assert r["bias"] == 0.0
        assert r["audio_url"].startswith("/v1/audio/")


def test_audio_search_with_and_without_bias(
    local_server, served_index, shared_data, audio_search_by_bias
) -> None:
    url, _ = local_server
    wav = esc50_wav(shared_data)
    results = audio_search_by_bias(url)
    assert set(results["true"]) == set(served_index["bias"])  # every caption, k > pool
    for text_id, r in results["true"].items():
        plain = results["false"][text_id]
        assert r["bias"] == pytest.approx(served_index["bias"][text_id], abs=1e-6)
        assert r["score"] - plain["score"] == pytest.approx(r["bias"], abs=1e-5)
        assert plain["bias"] == 0.0
    # The same file as multipart/form-data gets the same answer.
    multipart = requests.post(f"{url}/v1/search/audio?k=5", files={"file": ("dog.wav", wav)})
    assert multipart.status_code == 200 and multipart.json()["query"] == "dog.wav"
    top = [r["text_id"] for r in multipart.json()["results"]]
    assert top == sorted(results["true"], key=lambda t: -results["true"][t]["score"])[:5]


def test_clip_metadata_and_audio(local_server, served_index) -> None:
    url, _ = local_server
    clip = served_index["clips"][3]
    response = requests.get(f"{url}/v1/clips/{clip['clip_id']}")
    assert response.status_code == 200
    body = response.json()
    assert body["clip_id"] == clip["clip_id"] and body["captions"] == clip["captions"]
    assert [t["text"] for t in body["texts"]] == clip["captions"]
    assert body["has_audio"] is True
    audio = requests.get(url + body["audio_url"])
    assert audio.status_code == 200 and audio.headers["content-type"] == "audio/flac"
    assert audio.content == clip["audio"]
    encoded = requests.get(f"{url}/v1/clips/{clip['clip_id'].replace('/', '%2F')}")
    assert encoded.status_code == 200 and encoded.json()["clip_id"] == clip["clip_id"]


def test_page_and_api_docs(local_server) -> None:
    url, _ = local_server
    page = requests.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    for needle in ('<form id="text-form">', 'type="search"', 'id="audio-file"', 'el("audio"'):
        assert needle in html
    openapi = requests.get(url + "/openapi.json").json()
    # Every API path the page's script calls exists.
    called = set(re.findall(r'"(v1/[a-z/]+|healthz)', html))
    assert called == {"v1/search/text", "v1/search/audio", "v1/similar/", "healthz"}
    paths = {"/" + p + ("{clip_id}" if p.endswith("/") else "") for p in called}
    assert paths <= set(openapi["paths"])
    assert requests.get(url + "/docs").status_code == 200


def test_health_and_version_reload(keyed_server, served_index) -> None:
    url, key = keyed_server, {"X-API-Key": TEST_API_KEY}
    health = requests.get(url + "/healthz").json()
    first = health["index_version"]
    assert health["status"] == "ok" and health["has_bias"] is True
    assert (health["clips"], health["texts"]) == (8, len(served_index["bias"]))
    assert (
        requests.get(url + "/v1/index", headers=key).json()["checkpoint"]
        == served_index["checkpoint"]
    )
    root, storage_cfg = served_index["index_uri"], served_index["storage"]
    pointer = storage.read_bytes(store.latest_uri(root), storage_cfg)
    clips = synthetic_index_clips(5)
    try:
        store.write_version(
            root,
            "v-next",
            clips,
            random_unit_embeddings(5, 16, 4, seed=1),
            random_unit_embeddings(10, 16, 4, seed=2),
            checkpoint=served_index["checkpoint"],
            storage_cfg=storage_cfg,
        )
        reload = requests.post(url + "/v1/index/reload", headers=key).json()
        assert reload == {"previous_version": first, "index_version": "v-next", "changed": True}
        assert requests.get(url + "/healthz").json()["clips"] == 5
        store.write_version(
            root,
            "v-other-model",
            clips,
            random_unit_embeddings(5, 16, 4, seed=1),
            random_unit_embeddings(10, 16, 4, seed=2),
            checkpoint="s3://elsewhere/checkpoint",
            storage_cfg=storage_cfg,
        )
        refused = requests.post(url + "/v1/index/reload", headers=key)
        assert refused.status_code == 409
        assert (
            "built with checkpoint s3://elsewhere/checkpoint" in refused.json()["error"]["message"]
        )
        assert requests.get(url + "/healthz").json()["index_version"] == "v-next"
    finally:
        storage.write_bytes(store.latest_uri(root), pointer, storage_cfg)
    back = requests.post(url + "/v1/index/reload", headers=key).json()
    assert back["index_version"] == first and back["changed"] is True


def test_local_app_from_environment(served_index, monkeypatch) -> None:
    args = " ".join([f"serve.index_uri={served_index['index_uri']}", *served_index["storage_args"]])
    monkeypatch.setenv("GPA_RAY_SERVE_ARGS", f"debug {args}")
    app = app_from_env()
    assert "/v1/search/text" in app.openapi()["paths"]


def test_serve_config_file_fits_the_app(served_index, tmp_path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    from gpa_ray.serve.app import RetrieverArgs, build_app

    data = yaml.safe_load((REPO / "gpa_ray" / "serve" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(data)
    (app,) = schema.applications
    assert app.import_path == "gpa_ray.serve.app:build_app"
    names = {d.name for d in app.deployments}
    assert names == {"Ingress", "AudioEncoder"}  # one shard: the ingress searches
    assert all(d.autoscaling_config for d in app.deployments)
    args = RetrieverArgs.model_validate(app.args)
    assert args.resolve().serve.reload_interval_s == 60
    # Serve turns the file's `args` into the model named by this annotation (a class, not
    # the postponed string), so `serve deploy` hands the builder a RetrieverArgs.
    assert inspect.signature(build_app).parameters["args"].annotation is RetrieverArgs
    # The builder accepts the file's args (pointed at the test index here).
    # It names a key file; without one it is refused before anything is deployed.
    assert args.resolve().serve.host == data["http_options"]["host"] == "0.0.0.0"
    key_file = tmp_path / "api-key"
    key_file.write_text("k")
    test_overrides = [
        *args.overrides,
        f"serve.index_uri={served_index['index_uri']}",
        *served_index["storage_args"],
    ]
    with pytest.raises(ServeSecurityError, match="cannot read it"):
        build_app(RetrieverArgs(config=args.config, overrides=test_overrides))
    test_args = RetrieverArgs(
        config=args.config, overrides=[*test_overrides, f"serve.api_key_file={key_file}"]
    )
    bound = build_app(test_args)
    assert type(bound).__name__ == "Application"
    with pytest.raises(ValidationError, match="serve.max_kk"):
        RetrieverArgs(overrides=["serve.max_kk=3"])
    with pytest.raises(ValidationError, match="Extra inputs"):
        RetrieverArgs.model_validate({"config": "debug", "index": "x"})


def test_compute_times_summarise_the_recent_window() -> None:
    from gpa_ray.serve.app import ComputeTimes

    times = ComputeTimes(window=3)
    assert times.summary() == {"calls": 0}
    times.recent.extend([5.0, 1.0, 3.0, 100.0])  # the window keeps the last 3
    # sorted (1, 3, 100): p50 = 3, mean = 104 / 3
    assert times.summary() == {"calls": 3, "p50_ms": 3.0, "mean_ms": pytest.approx(104 / 3)}
    with times.timed():
        time.sleep(0.01)
    assert times.recent[-1] >= 10.0

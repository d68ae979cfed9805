"""`gpa_ray.serve.routes.search` served on its own (no other router) over the in-process
backend: both searches answer, refuse what a client gets wrong, and fall back to the
configured `serve.default_k`."""

from __future__ import annotations

from pathlib import Path

import requests

from gpa_ray.serve.api import create_api
from gpa_ray.serve.routes import search


def test_search_routes_alone_answer_and_refuse(
    serve_router, check_bad_requests, served_index, shared_data: Path
) -> None:
    url = serve_router(search.router)
    check_bad_requests(url, "/v1/search/")
    text = requests.post(f"{url}/v1/search/text", json={"query": "rain", "k": 2}).json()
    assert [r["rank"] for r in text["results"]] == [1, 2]
    assert all(r["audio_url"].startswith("/v1/audio/") for r in text["results"])
    wav = (shared_data / "esc50" / "audio" / "4-102844-A-49.wav").read_bytes()
    audio = requests.post(f"{url}/v1/search/audio?k=4&bias=false", data=wav)
    assert audio.status_code == 200, audio.text
    body = audio.json()
    assert (body["query"], body["k"], body["bias_applied"]) == ("upload", 4, False)
    assert {r["text_id"] for r in body["results"]} <= set(served_index["bias"])


def test_k_defaults_to_the_configured_default(
    serve_router, serve_config, local_backend, shared_data: Path
) -> None:
    cfg = serve_config("serve.default_k=3")
    url = serve_router(search.router, cfg.serve)
    text = requests.post(f"{url}/v1/search/text", json={"query": "a dog barking"}).json()
    assert text["k"] == 3 and len(text["results"]) == 3
    wav = (shared_data / "esc50" / "audio" / "4-102844-A-49.wav").read_bytes()
    audio = requests.post(f"{url}/v1/search/audio", files={"file": ("dog.wav", wav)}).json()
    assert (audio["query"], audio["k"], len(audio["results"])) == ("dog.wav", 3, 3)
    # The API's docs state the same default for the audio search's ?k=.
    operation = create_api(local_backend, cfg).openapi()["paths"]["/v1/search/audio"]["post"]
    (k,) = [p for p in operation["parameters"] if p["name"] == "k"]
    assert k["schema"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": cfg.serve.max_k,
        "description": "how many captions to return",
        "default": 3,
        "title": "K",
    }

"""Who may call the retriever: the API key (Bearer or X-API-Key, constant-time), open
liveness, reload that always needs the key, the refusal to serve beyond loopback without
a key, and body limits on the bytes actually sent (chunked bodies included). Served by
uvicorn in this process over the same FastAPI app Ray Serve runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from gpa_ray.serve.auth import API_KEY_ENV, ServeSecurityError, check_exposure, load_api_key
from gpa_ray.serve.local import local_app

from .conftest import TEST_API_KEY as KEY


def test_a_key_is_needed_for_every_route_but_liveness_page_and_docs(keyed_server) -> None:
    url = keyed_server
    body = {"query": "a dog barks", "k": 2}
    missing = requests.post(f"{url}/v1/search/text", json=body)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    wrong = requests.post(f"{url}/v1/search/text", json=body, headers={"X-API-Key": KEY + "x"})
    assert wrong.status_code == 401
    bearer = {"Authorization": f"Bearer {KEY}"}
    assert requests.post(f"{url}/v1/search/text", json=body, headers=bearer).status_code == 200
    api_key = {"X-API-Key": KEY}
    assert requests.get(f"{url}/v1/stats", headers=api_key).status_code == 200
    assert requests.get(f"{url}/v1/stats").status_code == 401
    for path in ("/healthz", "/", "/docs", "/openapi.json"):
        assert requests.get(url + path).status_code == 200, path
    assert requests.post(f"{url}/v1/index/reload").status_code == 401
    reload = requests.post(f"{url}/v1/index/reload", headers=bearer)
    assert reload.status_code == 200 and reload.json()["changed"] is False


def test_reload_is_refused_when_no_key_is_set(local_server) -> None:
    url, _ = local_server
    refused = requests.post(f"{url}/v1/index/reload")
    assert refused.status_code == 403 and "needs an API key" in refused.json()["error"]["message"]
    assert requests.post(f"{url}/v1/search/text", json={"query": "rain", "k": 1}).ok


def test_beyond_loopback_needs_a_key_or_an_explicit_anonymous(
    serve_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    exposed = serve_config("serve.host=0.0.0.0")
    with pytest.raises(ServeSecurityError, match="serve.host 0.0.0.0 is reachable"):
        local_app(exposed)
    check_exposure(serve_config("serve.host=0.0.0.0", "serve.allow_anonymous=true").serve, None)
    check_exposure(serve_config("serve.host=::1").serve, None)
    monkeypatch.setenv(API_KEY_ENV, KEY)
    assert load_api_key(exposed.serve) == KEY
    check_exposure(exposed.serve, load_api_key(exposed.serve))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ServeSecurityError, match="is empty"):
        load_api_key(serve_config(f"serve.api_key_file={empty}").serve)
    with pytest.raises(ServeSecurityError, match="cannot read it"):
        load_api_key(serve_config(f"serve.api_key_file={tmp_path / 'absent'}").serve)


def _chunks(total: int, size: int = 1 << 20) -> Iterator[bytes]:
    yield b'{"query": "'
    for _ in range(total // size):
        yield b"a" * size
    yield b'", "k": 1}'


def test_a_chunked_40_mb_body_gets_413_and_the_next_request_is_served(local_server) -> None:
    url, _ = local_server
    # A generator body is sent with Transfer-Encoding: chunked and no Content-Length.
    response = requests.post(
        f"{url}/v1/search/text",
        data=_chunks(40 << 20),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"
    assert requests.post(f"{url}/v1/search/text", json={"query": "rain", "k": 1}).ok

"""An index of real ESC-50 clips built by the index job onto the test S3 server, with a
known text bias, and the config that serves it (loopback only)."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import requests
import soundfile as sf
import uvicorn
from fastapi import APIRouter, FastAPI

from gpa_ray import storage
from gpa_ray.config import Config, ServeConfig
from gpa_ray.config_loading import load_config
from gpa_ray.data.schema import text_id
from gpa_ray.serve.backend import attach_backend
from gpa_ray.serve.errors import install_error_handlers
from gpa_ray.serve.local import LocalBackend, local_app
from gpa_ray.testing.data import tiny_esc50_ingest
from gpa_ray.testing.jobs import job_main
from gpa_ray.testing.models import save_tiny_text_model, tiny_gpa_checkpoint, tiny_gpa_run_config
from gpa_ray.testing.services import S3Server, free_loopback_ports


def write_bias(uri: str, text_ids: list[str], values: list[float], storage_cfg) -> None:
    """A bias folder in the bias job's format (`gpa_ray.bias_job`)."""
    from gpa_ray.bias_file import BIAS_FILE, BIAS_SCHEMA, META_FILE

    n = len(text_ids)
    table = pa.table(
        {
            "text_id": text_ids,
            "clip_id": [t.split("#")[0] for t in text_ids],
            "caption": [""] * n,
            "bias": values,
            "qb_lse": [0.0] * n,
            "qb_active": [True] * n,
        },
        schema=BIAS_SCHEMA,
    )
    storage.write_parquet(storage.join(uri, BIAS_FILE), table, storage_cfg)
    meta = json.dumps({"G": 0, "J": n, "note": "test bias"}).encode()
    storage.write_bytes(storage.join(uri, META_FILE), meta, storage_cfg)


@pytest.fixture(scope="session")
def served_index(ray_session, shared_data: Path, s3_server: S3Server, tmp_path_factory) -> dict:
    """Ingest 8 ESC-50 clips, save a tiny GPA, write a bias for every caption, and build
    the index with `jobs/build_index.py` to s3://. Returns what tests need."""

    root = tmp_path_factory.mktemp("served")
    ingest = tmp_path_factory.getbasetemp() / "esc50-ingest-8"  # shared with tests/index
    tiny_esc50_ingest(str(ingest), n_clips=8)
    clips = storage.read_parquet(str(ingest / "clips")).to_pylist()
    text_ids = [text_id(c["clip_id"], i) for c in clips for i in range(len(c["captions"]))]
    bias = {t: round(0.05 * ((7 * n) % 11) - 0.25, 4) for n, t in enumerate(text_ids)}
    bias_uri = s3_server.uri("bias-test")
    write_bias(bias_uri, list(bias), list(bias.values()), s3_server.storage)
    run_cfg = tiny_gpa_run_config(save_tiny_text_model(root / "text"))
    checkpoint = str(root / "checkpoint")
    tiny_gpa_checkpoint(checkpoint, run_cfg)
    index_uri = s3_server.uri("index")
    build_args = [
        f"index.input={ingest / 'clips'}",
        f"index.checkpoint={checkpoint}",
        f"index.output={index_uri}",
        f"index.bias={bias_uri}",
        "index.embed_pool.actors=1",
        *s3_server.overrides(),
    ]
    assert job_main("build_index")(build_args) == 0
    return {
        "index_uri": index_uri,
        "checkpoint": checkpoint,
        "clips": clips,
        "bias": bias,
        "storage_args": s3_server.overrides(),
        "storage": s3_server.storage,
    }


@pytest.fixture(scope="session")
def serve_config(served_index: dict) -> Callable[..., Config]:
    """Serving config for the test index (a free loopback port, small limits so the
    limit checks are cheap); extra dotted overrides as arguments."""

    def make(*extra: str) -> Config:
        return load_config(
            overrides=[
                f"serve.index_uri={served_index['index_uri']}",
                "serve.host=127.0.0.1",
                f"serve.port={free_loopback_ports(1)[0]}",
                "serve.max_upload_mb=1",
                "serve.max_audio_seconds=30",
                "serve.max_k=50",
                "serve.cpus_per_replica=0.25",
                "serve.reload_interval_s=0",
                *served_index["storage_args"],
                *extra,
            ]
        )

    return make


@dataclass(frozen=True)
class BadRequest:
    """A request a client gets wrong, and the 4xx it must get: status, error code, and a
    piece of the message that says what is wrong."""

    name: str
    method: str
    path: str
    status: int
    code: str
    message: str
    kwargs: dict = field(default_factory=dict)


def _wav(seconds: float, sr: int = 16000) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(seconds * sr)) / sr
    sf.write(buf, (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr, format="WAV")
    return buf.getvalue()


def _long_flac(seconds: float, sr: int = 8000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * sr), dtype=np.float32), sr, format="FLAC")
    return buf.getvalue()


@pytest.fixture(scope="session")
def bad_requests() -> list[BadRequest]:
    """Everything a client can get wrong (limits as in `serve_config`: k <= 50, uploads
    <= 1 MB, audio <= 30 s)."""
    text, audio = "/v1/search/text", "/v1/search/audio"
    json_type = {"Content-Type": "application/json"}
    wav = _wav(1.0)
    return [
        BadRequest(
            "empty query",
            "POST",
            text,
            422,
            "empty_query",
            "query is empty",
            {"json": {"query": "", "k": 5}},
        ),
        BadRequest(
            "blank query",
            "POST",
            text,
            422,
            "empty_query",
            "query is empty",
            {"json": {"query": "   \n ", "k": 5}},
        ),
        BadRequest(
            "lone surrogate in the query",
            "POST",
            text,
            422,
            "invalid_text",
            "not valid Unicode text (surrogates not allowed",
            {"json": {"query": "a dog \ud800 barking"}},
        ),
        BadRequest(
            "10k-character query",
            "POST",
            text,
            422,
            "query_too_long",
            "10000 characters long; the limit is 1000",
            {"json": {"query": "a" * 10000}},
        ),
        BadRequest(
            "k = 0",
            "POST",
            text,
            422,
            "invalid_k",
            "k must be between 1 and 50, got 0",
            {"json": {"query": "a dog", "k": 0}},
        ),
        BadRequest(
            "negative k",
            "POST",
            text,
            422,
            "invalid_k",
            "got -3",
            {"json": {"query": "a dog", "k": -3}},
        ),
        BadRequest(
            "k above the limit",
            "POST",
            text,
            422,
            "invalid_k",
            "got 51",
            {"json": {"query": "a dog", "k": 51}},
        ),
        BadRequest(
            "k not an integer",
            "POST",
            text,
            422,
            "invalid_request",
            "k: Input should be a valid integer",
            {"json": {"query": "a dog", "k": "five"}},
        ),
        BadRequest(
            "query missing",
            "POST",
            text,
            422,
            "invalid_request",
            "query: Field required",
            {"json": {"k": 3}},
        ),
        BadRequest(
            "query not a string",
            "POST",
            text,
            422,
            "invalid_request",
            "query: Input should be a valid string",
            {"json": {"query": 42}},
        ),
        BadRequest(
            "unknown field",
            "POST",
            text,
            422,
            "invalid_request",
            "Extra inputs are not permitted",
            {"json": {"query": "a dog", "topk": 3}},
        ),
        BadRequest(
            "body not an object",
            "POST",
            text,
            422,
            "invalid_request",
            "valid dictionary",
            {"json": ["a dog"]},
        ),
        BadRequest(
            "malformed JSON",
            "POST",
            text,
            400,
            "malformed_json",
            "not valid JSON",
            {"data": b'{"query": "a dog", ', "headers": json_type},
        ),
        BadRequest(
            "wrong content type",
            "POST",
            text,
            415,
            "unsupported_media_type",
            "must be application/json, got text/plain",
            {"data": b'{"query": "a dog"}', "headers": {"Content-Type": "text/plain"}},
        ),
        BadRequest(
            "form-encoded body",
            "POST",
            text,
            415,
            "unsupported_media_type",
            "application/x-www-form-urlencoded",
            {"data": {"query": "a dog"}},
        ),
        BadRequest(
            "JSON body over 1 MB",
            "POST",
            text,
            413,
            "too_large",
            "the limit is 1 MB",
            {"data": b'{"query": "' + b"a" * 1_100_000 + b'"}', "headers": json_type},
        ),
        BadRequest(
            "upload that is not audio",
            "POST",
            audio,
            422,
            "invalid_audio",
            "not audio in a supported format",
            {"data": b"<html>not a sound</html>", "headers": {"Content-Type": "audio/wav"}},
        ),
        BadRequest(
            "empty upload",
            "POST",
            audio,
            422,
            "invalid_audio",
            "the upload is empty",
            {"data": b"", "headers": {"Content-Type": "application/octet-stream"}},
        ),
        BadRequest(
            "truncated WAV",
            "POST",
            audio,
            422,
            "invalid_audio",
            "truncated WAV",
            {"data": wav[: len(wav) // 2], "headers": {"Content-Type": "audio/wav"}},
        ),
        BadRequest(
            "audio over the duration limit",
            "POST",
            audio,
            422,
            "invalid_audio",
            "limited to 30 s",
            {"data": _long_flac(120.0), "headers": {"Content-Type": "audio/flac"}},
        ),
        BadRequest(
            "upload over the size limit",
            "POST",
            audio,
            413,
            "too_large",
            "the limit is 1 MB",
            {"data": b"\0" * 1_500_000, "headers": {"Content-Type": "audio/wav"}},
        ),
        BadRequest(
            "upload with a JSON content type",
            "POST",
            audio,
            415,
            "unsupported_media_type",
            "got application/json",
            {"json": {"audio": "abc"}},
        ),
        BadRequest(
            "multipart without a file",
            "POST",
            audio,
            422,
            "no_file",
            "no `file` field",
            {"files": {"notes": (None, "hello")}},
        ),
        BadRequest(
            "audio k = 0",
            "POST",
            f"{audio}?k=0",
            422,
            "invalid_k",
            "got 0",
            {"data": wav, "headers": {"Content-Type": "audio/wav"}},
        ),
        BadRequest(
            "audio k not a number",
            "POST",
            f"{audio}?k=ten",
            422,
            "invalid_request",
            "k: Input should be a valid integer",
            {"data": wav, "headers": {"Content-Type": "audio/wav"}},
        ),
        BadRequest(
            "unknown clip id",
            "GET",
            "/v1/clips/esc50/no-such-clip.wav",
            404,
            "unknown_clip",
            "no clip with id 'esc50/no-such-clip.wav'",
        ),
        BadRequest(
            "audio of an unknown clip",
            "GET",
            "/v1/audio/nope",
            404,
            "unknown_clip",
            "no clip with id 'nope'",
        ),
        BadRequest("unknown route", "GET", "/v2/search", 404, "not_found", "Not Found"),
        BadRequest("wrong method", "GET", text, 405, "method_not_allowed", "Method Not Allowed"),
    ]


@pytest.fixture(scope="session")
def audio_search_by_bias(shared_data: Path) -> Callable[[str], dict[str, dict[str, dict]]]:
    """A query that sends one real ESC-50 clip to a server's audio search with the bias on
    and off (k above the pool) and returns {"true"|"false": {text_id: result}}."""
    wav = (shared_data / "esc50" / "audio" / "4-102844-A-49.wav").read_bytes()

    def search(base_url: str) -> dict[str, dict[str, dict]]:
        results = {}
        for bias in ("true", "false"):
            response = requests.post(
                f"{base_url}/v1/search/audio?k=50&bias={bias}",
                data=wav,
                headers={"Content-Type": "audio/wav"},
            )
            assert response.status_code == 200, response.text
            assert response.json()["bias_applied"] is (bias == "true")
            results[bias] = {r["text_id"]: r for r in response.json()["results"]}
        return results

    return search


@pytest.fixture(scope="session")
def check_bad_requests(bad_requests: list[BadRequest]) -> Callable[..., None]:
    """A check that sends every bad request (or those whose path starts with one of
    `prefixes`) to a server: each must get its 4xx with a JSON error saying what is wrong."""

    def check(base_url: str, *prefixes: str) -> None:
        failures = []
        cases = [c for c in bad_requests if not prefixes or c.path.startswith(prefixes)]
        assert cases, f"no bad request under {prefixes}"
        for case in cases:
            response = requests.request(
                case.method, base_url + case.path, timeout=60, **case.kwargs
            )
            try:
                error = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                failures.append(f"{case.name}: {response.status_code} {response.text[:200]!r}")
                continue
            if (
                response.status_code != case.status
                or error["code"] != case.code
                or case.message not in error["message"]
            ):
                failures.append(f"{case.name}: {response.status_code} {error}")
        assert not failures, "\n".join(failures)

    return check


@contextlib.contextmanager
def serving(app: FastAPI, port: int) -> Iterator[str]:
    """`app` served by uvicorn in a thread of this process on loopback `port`; its URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def local_server(serve_config) -> Iterator[tuple[str, Config]]:
    """The retriever API, page included, served by uvicorn in this process on loopback
    (the same FastAPI app Ray Serve runs; seconds to start instead of tens)."""
    cfg = serve_config()
    with serving(local_app(cfg), cfg.serve.port) as url:
        yield url, cfg


TEST_API_KEY = "test-key-5f1c9a"
"""The key `keyed_server` is started with (a test value, in a temporary key file)."""


@pytest.fixture(scope="module")
def keyed_server(serve_config, tmp_path_factory) -> Iterator[str]:
    """`local_server` with an API key (`serve.api_key_file`): every call but liveness,
    the page and the docs needs `TEST_API_KEY`."""
    key_file = tmp_path_factory.mktemp("secret") / "api-key"
    key_file.write_text(TEST_API_KEY + "\n")
    cfg = serve_config(f"serve.api_key_file={key_file}")
    with serving(local_app(cfg), cfg.serve.port) as url:
        yield url


@pytest.fixture(scope="session")
def local_backend(serve_config) -> LocalBackend:
    """The in-process backend over the test index (no Ray), for routes served alone."""
    return LocalBackend(serve_config())


@pytest.fixture(scope="module")
def serve_router(local_backend: LocalBackend, serve_config) -> Iterator[Callable[..., str]]:
    """Serves one router of `gpa_ray.serve.routes` on its own (with the API's error
    handlers, over `local_backend`, with the limits of `serve_cfg` or of `serve_config()`)
    and returns its URL; every server stops with the module."""
    with contextlib.ExitStack() as servers:

        def serve(router: APIRouter, serve_cfg: ServeConfig | None = None) -> str:
            app = FastAPI()
            install_error_handlers(app)
            app.include_router(router)
            attach_backend(app, local_backend, serve_cfg or serve_config().serve)
            return servers.enter_context(serving(app, free_loopback_ports(1)[0]))

        yield serve

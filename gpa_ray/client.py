"""A typed Python client for the retriever's HTTP API (`gpa_ray.serve`), standard library only.

    from gpa_ray.client import RetrieverClient
    client = RetrieverClient("http://127.0.0.1:8000", api_key=None, timeout_s=10)
    hits = client.search_text("a dog barks", k=5)["results"]

Every call has a timeout (`timeout_s`, per attempt). A 503 (a replica starting or
overloaded, or a proxy throttling) and a connection that fails before an answer are
retried with exponential backoff (`Retry`: attempts, first delay, cap; a `Retry-After`
header is honoured up to the cap), since a search changes nothing on the server. Any
other error answer raises `ApiError` at once, naming the method, URL, HTTP status and the
server's `{"error": {"code", "message"}}`; an endpoint that cannot be reached raises
`ConnectionFailed` naming it. Used by `gpa-ray search --url`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, cast


class Filter(TypedDict, total=False):
    """Which clips a search may return (`gpa_ray.serve.routes.filters.SearchFilter`)."""

    corpus: list[str]
    split: list[str]
    labels: list[str]
    min_duration_s: float
    max_duration_s: float


class Result(TypedDict, total=False):
    """One hit: scores, and the clip's (text search) or caption's (audio search) record."""

    rank: int
    score: float
    global_score: float
    prototype_score: float
    bias: float
    stage1_score: float
    clip_id: str
    text_id: str
    text: str
    corpus: str
    split: str
    duration_s: float
    captions: list[str]
    labels: list[str]
    has_audio: bool
    audio_url: str | None


class SearchResponse(TypedDict, total=False):
    """What a search answers (`query` and `bias_applied` where they apply)."""

    query: str
    k: int
    index_version: str
    bias_applied: bool
    took_ms: float
    results: list[Result]


class ClientError(RuntimeError):
    """A call that did not get a usable answer."""


class ConnectionFailed(ClientError):
    """The endpoint could not be reached or did not answer in time (after the retries)."""


class ApiError(ClientError):
    """The server answered with an error: `status`, its error `code` and `message`."""

    def __init__(self, method: str, url: str, status: int, code: str, message: str) -> None:
        self.method, self.url = method, url
        self.status, self.code, self.message = status, code, message
        super().__init__(f"{method} {url} -> HTTP {status} {code}: {message}")


@dataclass(frozen=True)
class Retry:
    """Retries of 503 answers and failed connections: up to `attempts` tries in all,
    waiting `backoff_s`, then twice as long each time, at most `max_backoff_s`."""

    attempts: int = 4
    backoff_s: float = 0.25
    max_backoff_s: float = 4.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        wait = self.backoff_s * 2 ** (attempt - 1)
        if retry_after:
            with contextlib.suppress(ValueError):  # an HTTP date: keep the backoff
                wait = max(wait, float(retry_after))
        return min(wait, self.max_backoff_s)


RETRIED_STATUS = 503


def _error_of(status: int, body: bytes) -> tuple[str, str]:
    """(code, message) of an error answer: the API's JSON shape, else the body's text."""
    try:
        error = json.loads(body)["error"]
        return str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace").strip()
        return f"http_{status}", text[:500] or "(empty body)"


class RetrieverClient:
    """The retriever's HTTP API as methods (see the module docstring for errors/retries)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 10.0,
        retry: Retry | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"base_url must be http(s)://host[:port], got {base_url!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.retry = retry or Retry()
        self.sleep = sleep

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Sequence[tuple[str, str]] = (),
        json_body: Any = None,
        data: bytes | None = None,
        content_type: str | None = None,
    ) -> bytes:
        """One API call with the retries; the answer's body (`ApiError` for an error)."""
        url = self.base_url + path
        if params:
            url += "?" + urllib.parse.urlencode(list(params))
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if json_body is not None:
            data = json.dumps(json_body).encode()
            content_type = "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        for attempt in range(1, self.retry.attempts + 1):
            last = attempt == self.retry.attempts
            req = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as response:
                    return cast(bytes, response.read())
            except urllib.error.HTTPError as exc:
                body = exc.read()
                if exc.code == RETRIED_STATUS and not last:
                    self.sleep(self.retry.delay(attempt, exc.headers.get("Retry-After")))
                    continue
                code, message = _error_of(exc.code, body)
                if exc.code == RETRIED_STATUS:
                    message += f" (after {attempt} attempts)"
                raise ApiError(method, url, exc.code, code, message) from exc
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                if not last:
                    self.sleep(self.retry.delay(attempt))
                    continue
                reason = getattr(exc, "reason", exc)
                raise ConnectionFailed(
                    f"{method} {url}: no answer after {attempt} attempts "
                    f"(timeout {self.timeout_s:g} s each): {reason}"
                ) from exc
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return json.loads(self.request(method, path, **kwargs))

    def health(self) -> dict[str, Any]:
        """Liveness and the index version served (`GET /healthz`)."""
        return cast(dict[str, Any], self._json("GET", "/healthz"))

    def stats(self) -> dict[str, Any]:
        """The encoders' batch-size counts and the replicas' compute times (`GET /v1/stats`)."""
        return cast(dict[str, Any], self._json("GET", "/v1/stats"))

    def index(self) -> dict[str, Any]:
        """The manifest of the index version served (`GET /v1/index`)."""
        return cast(dict[str, Any], self._json("GET", "/v1/index"))

    def search_text(
        self, query: str, k: int | None = None, filter: Filter | None = None
    ) -> SearchResponse:
        """Clips for a caption (`POST /v1/search/text`)."""
        body: dict[str, Any] = {"query": query}
        if k is not None:
            body["k"] = k
        if filter:
            body["filter"] = dict(filter)
        return cast(SearchResponse, self._json("POST", "/v1/search/text", json_body=body))

    def search_texts(
        self, queries: Sequence[str], k: int | None = None, filter: Filter | None = None
    ) -> list[SearchResponse]:
        """Clips for each of many captions in one request (`POST /v1/search/text/batch`)."""
        body: dict[str, Any] = {"queries": list(queries)}
        if k is not None:
            body["k"] = k
        if filter:
            body["filter"] = dict(filter)
        answer = self._json("POST", "/v1/search/text/batch", json_body=body)
        return cast(list[SearchResponse], answer["responses"])

    def search_audio(
        self,
        audio: bytes | str | os.PathLike[str],
        k: int | None = None,
        *,
        bias: bool = True,
        filter: Filter | None = None,
    ) -> SearchResponse:
        """Captions for a sound (`POST /v1/search/audio`): the file's bytes, or a local path."""
        data = audio if isinstance(audio, bytes) else _read_file(audio)
        params: list[tuple[str, str]] = [("bias", "true" if bias else "false")]
        if k is not None:
            params.append(("k", str(k)))
        params += _filter_params(filter)
        answer = self._json(
            "POST",
            "/v1/search/audio",
            params=params,
            data=data,
            content_type="application/octet-stream",
        )
        return cast(SearchResponse, answer)

    def search_vector(
        self,
        global_: Sequence[float],
        prototypes: Sequence[Sequence[float]] | None = None,
        *,
        target: Literal["clips", "texts"] = "clips",
        k: int | None = None,
        bias: bool = True,
        filter: Filter | None = None,
    ) -> SearchResponse:
        """Search with an embedding (`POST /v1/search/vector`): a text's finds clips
        (`target="clips"`), a clip's finds captions (`target="texts"`)."""
        body: dict[str, Any] = {"global": [float(x) for x in global_], "target": target}
        body["bias"] = bias
        if prototypes is not None:
            body["prototypes"] = [[float(x) for x in row] for row in prototypes]
        if k is not None:
            body["k"] = k
        if filter:
            body["filter"] = dict(filter)
        return cast(SearchResponse, self._json("POST", "/v1/search/vector", json_body=body))

    def similar(self, clip_id: str, k: int | None = None) -> SearchResponse:
        """Indexed clips that sound like an indexed clip (`GET /v1/similar/{id}`)."""
        params = [] if k is None else [("k", str(k))]
        path = "/v1/similar/" + urllib.parse.quote(clip_id, safe="/")
        return cast(SearchResponse, self._json("GET", path, params=params))

    def clip(self, clip_id: str) -> dict[str, Any]:
        """A clip's metadata and captions (`GET /v1/clips/{id}`)."""
        path = "/v1/clips/" + urllib.parse.quote(clip_id, safe="/")
        return cast(dict[str, Any], self._json("GET", path))

    def clip_audio(self, clip_id: str) -> bytes:
        """A clip's stored audio as FLAC bytes (`GET /v1/audio/{id}`)."""
        return self.request("GET", "/v1/audio/" + urllib.parse.quote(clip_id, safe="/"))


def _read_file(path: str | os.PathLike[str]) -> bytes:
    with open(os.path.expanduser(os.fspath(path)), "rb") as f:
        return f.read()


def _filter_params(filter: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """A `Filter` as the audio route's query parameters (`label` for each label)."""
    params: list[tuple[str, str]] = []
    for key, value in (filter or {}).items():
        name = "label" if key == "labels" else key
        if isinstance(value, list | tuple):
            params += [(name, str(v)) for v in value]
        elif value is not None:
            params.append((name, str(value)))
    return params

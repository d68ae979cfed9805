"""The HTTP API of the retriever (FastAPI), independent of where the work runs.

`create_api(backend, cfg)` builds the app; a *backend* does the work. On Ray Serve the
backend forwards to the encoder and searcher deployments (`gpa_ray.serve.app`); the
in-process `LocalBackend` runs the same classes in one process (`local_app`, e.g. for a
single machine without Ray: `uvicorn --factory` on a function that returns it).

Routes:
    POST /v1/search/text     {"query": str, "k": int}: clips for a caption (text-to-audio)
    POST /v1/search/audio    raw audio body (any format the decoder reads) or
                             multipart/form-data with a `file` field; ?k=&bias=:
                             captions for a sound (audio-to-text, Sinkhorn bias by default)
    GET  /v1/clips/{id}      clip metadata and its captions
    GET  /v1/audio/{id}      the clip's stored audio (FLAC)
    GET  /v1/index           the manifest of the index version served
    POST /v1/index/reload    switch to the version the index URI names now
    GET  /v1/stats           encoder batch sizes and replica compute times so far
    GET  /healthz            liveness + index version and counts
    GET  /                   the search page;  /docs, /openapi.json: the API docs

Everything a client can get wrong is answered with a 4xx and a JSON body
`{"error": {"code": ..., "message": ...}}` saying what is wrong: malformed JSON (400),
wrong content type (415), body over the size limit (413), a bad field (422: empty or
over-long query, k outside 1..max_k, undecodable audio), unknown clip (404). A 5xx means
a fault of the service, never of the request.
"""

from __future__ import annotations

import email.parser
import email.policy
import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Protocol
from urllib.parse import quote

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpa_ray.config import Config, ServeConfig
from gpa_ray.serve.retriever import IndexMismatchError, QueryError

logger = logging.getLogger(__name__)

AUDIO_TYPES = ("application/octet-stream", "application/ogg")
"""Raw-body content types accepted for audio besides `audio/*`."""
JSON_BODY_LIMIT = 1_000_000


class ApiError(Exception):
    """An error answered as `{"error": {"code", "message"}}` with `status`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Backend(Protocol):
    """Where the API's work runs (Serve deployments, or in process)."""

    async def search_text(self, query: str, k: int) -> dict[str, Any]: ...

    async def search_audio(
        self, data: bytes, source: str, k: int, use_bias: bool
    ) -> dict[str, Any]: ...

    async def clip(self, clip_id: str) -> dict[str, Any] | None: ...

    async def clip_audio(self, clip_id: str) -> tuple[bytes, int] | None: ...

    async def health(self) -> dict[str, Any]: ...

    async def manifest(self) -> dict[str, Any]: ...

    async def reload(self) -> dict[str, Any]: ...

    async def stats(self) -> dict[str, Any]: ...


# --------------------------------------------------------------------------- schemas


class TextSearchRequest(BaseModel):
    """A text-to-audio query."""

    model_config = ConfigDict(extra="forbid")
    query: StrictStr = Field(description="what the sound should be, in words")
    k: StrictInt | None = Field(None, description="how many clips (1..max_k; default_k if unset)")


class Scores(BaseModel):
    rank: int
    score: float = Field(description="R = S_g + S'_p (+ the text bias for audio-to-text)")
    global_score: float = Field(description="S_g: cosine of the global embeddings")
    prototype_score: float = Field(description="S'_p: the prototype scorer's score")
    bias: float = Field(description="Sinkhorn text bias added (0 without)")
    stage1_score: float = Field(description="inner product the shortlist was ranked by")


class ClipResult(Scores):
    clip_id: str
    corpus: str
    split: str
    duration_s: float
    captions: list[str]
    labels: list[str]
    has_audio: bool
    audio_url: str | None


class TextResult(Scores):
    text_id: str
    text: str
    clip_id: str
    labels: list[str]
    has_audio: bool
    audio_url: str | None


class TextSearchResponse(BaseModel):
    query: str
    k: int
    index_version: str
    took_ms: float
    results: list[ClipResult]


class AudioSearchResponse(BaseModel):
    query: str = Field(description="the uploaded file's name, if it had one")
    k: int
    index_version: str
    bias_applied: bool
    took_ms: float
    results: list[TextResult]


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "malformed request (e.g. invalid JSON)"),
        (413, "body over the size limit"),
        (415, "wrong content type"),
        (422, "a field is invalid (the message says which and why)"),
    )
}


# --------------------------------------------------------------------------- helpers


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _is_json(media_type: str) -> bool:
    return media_type == "application/json" or media_type.endswith("+json")


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = list(err.get("loc", ()))
        if where and where[0] in ("body", "query", "path", "header"):
            where = where[1:]  # the part of the request; the rest names the field
        loc = ".".join(str(p) for p in where)
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts)


def _audio_url(request: Request, clip_id: str, has_audio: bool) -> str | None:
    if not has_audio:
        return None
    return f"{request.scope.get('root_path', '')}/v1/audio/{quote(clip_id, safe='')}"


def _with_urls(request: Request, result: dict[str, Any]) -> dict[str, Any]:
    result["results"] = [
        {**r, "audio_url": _audio_url(request, r["clip_id"], r["has_audio"])}
        for r in result["results"]
    ]
    return result


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "bad_content_length", f"invalid Content-Length {declared!r}")
        if int(declared) > limit:
            raise ApiError(413, "too_large", _too_large(int(declared), limit))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", _too_large(size, limit))
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> str:
    return f"the body is {size / 1e6:.1f} MB or more; the limit is {limit / 1e6:g} MB"


def _multipart_file(body: bytes, content_type: str) -> tuple[bytes, str]:
    """The `file` part (or the first part with a file name) of a multipart/form-data body."""
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ApiError(400, "malformed_multipart", "the multipart/form-data body cannot be parsed")
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name == "file" or part.get_filename():
            return part.get_payload(decode=True) or b"", part.get_filename() or "upload"
    raise ApiError(422, "no_file", "the multipart upload has no `file` field with the audio")


def _check_k(k: int, cfg: ServeConfig) -> None:
    if not 1 <= k <= cfg.max_k:
        raise ApiError(422, "invalid_k", f"k must be between 1 and {cfg.max_k}, got {k}")


def _check_query(query: str, cfg: ServeConfig) -> str:
    text = query.strip()
    if not text:
        raise ApiError(422, "empty_query", "query is empty: send a few words describing a sound")
    if len(text) > cfg.max_query_chars:
        raise ApiError(
            422,
            "query_too_long",
            f"query is {len(text)} characters long; the limit is {cfg.max_query_chars}",
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # JSON can carry lone surrogates (e.g. "\ud800"), which no tokenizer accepts.
        raise ApiError(
            422, "invalid_text", f"query is not valid Unicode text ({exc.reason} at {exc.start})"
        ) from exc
    return text


def page_html() -> str:
    """The search page shipped as package data."""
    return (resources.files("gpa_ray.serve") / "static" / "index.html").read_text()


# --------------------------------------------------------------------------- the app


def create_api(backend: Backend, cfg: Config) -> FastAPI:
    """The retriever's FastAPI app over `backend`, with the limits of `cfg.serve`."""
    serve_cfg = cfg.serve
    upload_limit = int(serve_cfg.max_upload_mb * 1e6)
    app = FastAPI(
        title="gpa_ray retriever",
        version="1",
        description="Text-to-audio and audio-to-text search with GPA two-stage ranking.",
    )

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(QueryError)
    async def query_error(_: Request, exc: QueryError) -> JSONResponse:
        return _error(422, "invalid_audio", str(exc))

    @app.exception_handler(IndexMismatchError)
    async def mismatch(_: Request, exc: IndexMismatchError) -> JSONResponse:
        return _error(409, "index_mismatch", str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        body_error = any(e.get("loc", ("",))[0] == "body" for e in errors)
        media_type = _media_type(request)
        if body_error and media_type and not _is_json(media_type):
            return _error(
                415,
                "unsupported_media_type",
                f"Content-Type must be application/json, got {media_type}",
            )
        if any(e.get("type") == "json_invalid" for e in errors):
            detail = "; ".join(str(e.get("ctx", {}).get("error", "")) for e in errors)
            return _error(400, "malformed_json", f"the body is not valid JSON ({detail})")
        return _error(422, "invalid_request", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed")
        return _error(500, "internal", f"internal error ({type(exc).__name__})")

    @app.middleware("http")
    async def limit_json_body(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        declared = request.headers.get("content-length", "")
        if (
            request.url.path.endswith("/v1/search/text")
            and declared.isdigit()
            and int(declared) > JSON_BODY_LIMIT
        ):
            return _error(413, "too_large", _too_large(int(declared), JSON_BODY_LIMIT))
        return await call_next(request)

    @app.post("/v1/search/text", response_model=TextSearchResponse, responses=ERRORS)
    async def search_text(body: TextSearchRequest, request: Request) -> dict[str, Any]:
        """Clips that sound like the query (two-stage: global shortlist, GPA rerank)."""
        started = time.perf_counter()
        query = _check_query(body.query, serve_cfg)
        k = serve_cfg.default_k if body.k is None else body.k
        _check_k(k, serve_cfg)
        result = await backend.search_text(query, k)
        took = 1e3 * (time.perf_counter() - started)
        return {"query": query, "k": k, "took_ms": took, **_with_urls(request, result)}

    @app.post(
        "/v1/search/audio",
        response_model=AudioSearchResponse,
        responses=ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "audio/*": {"schema": {"type": "string", "format": "binary"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {"file": {"type": "string", "format": "binary"}},
                            "required": ["file"],
                        }
                    },
                },
            }
        },
    )
    async def search_audio(
        request: Request,
        k: int = Query(serve_cfg.default_k, description="how many captions to return"),
        bias: bool = Query(True, description="add the Sinkhorn text bias (if the index has one)"),
    ) -> dict[str, Any]:
        """Captions that describe the uploaded sound (wav, flac, ogg, mp3, ...)."""
        started = time.perf_counter()
        _check_k(k, serve_cfg)
        media_type = _media_type(request)
        if media_type == "multipart/form-data":
            body = await _read_body(request, upload_limit + 64 * 1024)
            data, name = _multipart_file(body, request.headers["content-type"])
        elif not media_type or media_type.startswith("audio/") or media_type in AUDIO_TYPES:
            data, name = await _read_body(request, upload_limit), "upload"
        else:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"send the audio file as the body with Content-Type audio/* or "
                f"application/octet-stream (or as multipart/form-data), got {media_type}",
            )
        if len(data) > upload_limit:
            raise ApiError(413, "too_large", _too_large(len(data), upload_limit))
        result = await backend.search_audio(data, name, k, bias)
        took = 1e3 * (time.perf_counter() - started)
        return {"query": name, "k": k, "took_ms": took, **_with_urls(request, result)}

    @app.get("/v1/clips/{clip_id:path}", responses={404: {"model": ErrorResponse}})
    async def clip(clip_id: str, request: Request) -> dict[str, Any]:
        """A clip's metadata, its captions and where its audio is (if the index keeps it)."""
        record = await backend.clip(clip_id)
        if record is None:
            raise ApiError(404, "unknown_clip", f"no clip with id {clip_id!r} in the index")
        return {**record, "audio_url": _audio_url(request, clip_id, record["has_audio"])}

    @app.get(
        "/v1/audio/{clip_id:path}",
        response_class=Response,
        responses={200: {"content": {"audio/flac": {}}}, 404: {"model": ErrorResponse}},
    )
    async def clip_audio(clip_id: str) -> Response:
        """The clip's stored audio as FLAC."""
        found = await backend.clip_audio(clip_id)
        if found is None:
            known = await backend.clip(clip_id)
            message = (
                f"clip {clip_id!r} is indexed without audio"
                if known
                else f"no clip with id {clip_id!r} in the index"
            )
            raise ApiError(404, "no_audio" if known else "unknown_clip", message)
        data, _ = found
        return Response(data, media_type="audio/flac")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness, and which index version is served."""
        return await backend.health()

    @app.get("/v1/index")
    async def index_manifest() -> dict[str, Any]:
        """The manifest of the index version being served."""
        return await backend.manifest()

    @app.post("/v1/index/reload", responses={409: {"model": ErrorResponse}})
    async def reload() -> dict[str, Any]:
        """Serve the version the index URI names now (its LATEST), if it changed."""
        return await backend.reload()

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        """Batch sizes the encoders ran so far (how well `@serve.batch` fills)."""
        return await backend.stats()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html())

    return app

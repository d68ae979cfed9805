"""The two searches: `POST /v1/search/text` (clips for a caption) and
`POST /v1/search/audio` (captions for a sound), with their request and response schemas
and the checks of what a client sends (query text, k, the upload's type and size)."""

from __future__ import annotations

import email.parser
import email.policy
import time
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from gpa_ray.config import ServeConfig
from gpa_ray.serve.backend import BackendDep, ServeConfigDep
from gpa_ray.serve.errors import REQUEST_ERRORS, ApiError, media_type, read_body, too_large
from gpa_ray.serve.openapi_limits import BLANK, WholeNumber
from gpa_ray.serve.routes.clips import audio_url
from gpa_ray.serve.routes.filters import FilterQueryDep, SearchFilter

router = APIRouter()

AUDIO_TYPES = ("application/octet-stream", "application/ogg")
"""Raw-body content types accepted for audio besides `audio/*`."""
MULTIPART_OVERHEAD = 64 * 1024
"""Bytes a multipart upload may carry beyond the audio (part headers, other fields)."""


class TextSearchRequest(BaseModel):
    """A text-to-audio query."""

    model_config = ConfigDict(extra="forbid")
    query: StrictStr = Field(description="what the sound should be, in words")
    k: WholeNumber | None = Field(None, description="how many clips (1..max_k; default_k if unset)")
    filter: SearchFilter | None = Field(None, description="only clips whose metadata match")


class BatchTextSearchRequest(BaseModel):
    """Many text-to-audio queries in one request (each answered as by /v1/search/text)."""

    model_config = ConfigDict(extra="forbid")
    queries: list[StrictStr] = Field(description="the queries", min_length=1)
    k: WholeNumber | None = Field(None, description="how many clips per query")
    filter: SearchFilter | None = Field(None, description="only clips whose metadata match")


class Scores(BaseModel):
    rank: int
    score: float = Field(description="R = S_g + S'_p (+ the text bias for audio-to-text)")
    global_score: float = Field(description="S_g: cosine of the global embeddings")
    prototype_score: float = Field(description="S'_p: the prototype scorer's score")
    bias: float = Field(description="Sinkhorn text bias added (0 without)")
    stage1_score: float = Field(description="inner product the shortlist was ranked by")


class ClipResult(Scores):
    clip_id: str
    segment_id: str = Field(description="the scoring segment: the clip id for segment 0")
    segment: int = Field(description="which window of the file (0 for a clip of one)")
    segment_start_s: float = Field(description="where the segment starts in the file, s")
    segment_end_s: float = Field(description="where the segment ends in the file, s")
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


class BatchTextSearchResponse(BaseModel):
    k: int
    took_ms: float
    responses: list[TextSearchResponse] = Field(description="one per query, in order")


class AudioSearchResponse(BaseModel):
    query: str = Field(description="the uploaded file's name, if it had one")
    k: int
    index_version: str
    bias_applied: bool
    took_ms: float
    results: list[TextResult]


AUDIO_BODY = {
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
}
"""The audio search's body in the OpenAPI schema (the route reads the raw body itself)."""


def check_k(k: int, serve_cfg: ServeConfig) -> None:
    if not 1 <= k <= serve_cfg.max_k:
        raise ApiError(422, "invalid_k", f"k must be between 1 and {serve_cfg.max_k}, got {k}")


def _check_query(query: str, serve_cfg: ServeConfig) -> str:
    """The query without surrounding blanks, if it is text the encoder can take (the
    rules the OpenAPI schema states: `gpa_ray.serve.openapi_limits`)."""
    if len(query) > serve_cfg.max_query_chars:
        raise ApiError(
            422,
            "query_too_long",
            f"query is {len(query)} characters long; the limit is {serve_cfg.max_query_chars}",
        )
    text = query.strip(BLANK)
    if not text:
        raise ApiError(422, "empty_query", "query is empty: send a few words describing a sound")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # JSON can carry lone surrogates (e.g. "\ud800"), which no tokenizer accepts.
        raise ApiError(
            422, "invalid_text", f"query is not valid Unicode text ({exc.reason} at {exc.start})"
        ) from exc
    return text


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


async def _uploaded_audio(request: Request, upload_limit: int) -> tuple[bytes, str]:
    """The uploaded file's bytes and name: the raw body, or the multipart `file` part."""
    media = media_type(request)
    if media == "multipart/form-data":
        body = await read_body(request, upload_limit + MULTIPART_OVERHEAD)
        data, name = _multipart_file(body, request.headers["content-type"])
    elif not media or media.startswith("audio/") or media in AUDIO_TYPES:
        data, name = await read_body(request, upload_limit), "upload"
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send the audio file as the body with Content-Type audio/* or "
            f"application/octet-stream (or as multipart/form-data), got {media}",
        )
    if len(data) > upload_limit:
        raise ApiError(413, "too_large", too_large(len(data), upload_limit))
    return data, name


def with_urls(request: Request, result: dict[str, Any]) -> dict[str, Any]:
    result["results"] = [
        {**r, "audio_url": audio_url(request, r["clip_id"], r["has_audio"])}
        for r in result["results"]
    ]
    return result


@router.post("/v1/search/text", response_model=TextSearchResponse, responses=REQUEST_ERRORS)
async def search_text(
    body: TextSearchRequest, request: Request, backend: BackendDep, serve_cfg: ServeConfigDep
) -> dict[str, Any]:
    """Clips that sound like the query (two-stage: global shortlist, GPA rerank)."""
    started = time.perf_counter()
    query = _check_query(body.query, serve_cfg)
    k = serve_cfg.default_k if body.k is None else body.k
    check_k(k, serve_cfg)
    where = body.filter.clip_filter() if body.filter else None
    result = await backend.search_text(query, k, where)
    took = 1e3 * (time.perf_counter() - started)
    return {"query": query, "k": k, "took_ms": took, **with_urls(request, result)}


@router.post(
    "/v1/search/text/batch", response_model=BatchTextSearchResponse, responses=REQUEST_ERRORS
)
async def search_text_batch(
    body: BatchTextSearchRequest,
    request: Request,
    backend: BackendDep,
    serve_cfg: ServeConfigDep,
) -> dict[str, Any]:
    """Clips for each of many queries (at most `serve.max_batch_queries`)."""
    started = time.perf_counter()
    if len(body.queries) > serve_cfg.max_batch_queries:
        raise ApiError(
            422,
            "too_many_queries",
            f"{len(body.queries)} queries; a batch takes at most {serve_cfg.max_batch_queries}",
        )
    queries = [_check_query(q, serve_cfg) for q in body.queries]
    k = serve_cfg.default_k if body.k is None else body.k
    check_k(k, serve_cfg)
    where = body.filter.clip_filter() if body.filter else None
    results = await backend.search_texts(queries, k, where)
    took = 1e3 * (time.perf_counter() - started)
    responses = [
        {"query": q, "k": k, "took_ms": took, **with_urls(request, r)}
        for q, r in zip(queries, results, strict=True)
    ]
    return {"k": k, "took_ms": took, "responses": responses}


@router.post(
    "/v1/search/audio",
    response_model=AudioSearchResponse,
    responses=REQUEST_ERRORS,
    openapi_extra=AUDIO_BODY,
)
async def search_audio(
    request: Request,
    backend: BackendDep,
    serve_cfg: ServeConfigDep,
    where: FilterQueryDep,
    k: int | None = Query(None, description="how many captions to return"),
    bias: bool = Query(True, description="add the Sinkhorn text bias (if the index has one)"),
) -> dict[str, Any]:
    """Captions that describe the uploaded sound (wav, flac, ogg, mp3, ...), optionally
    only captions of clips that pass the filter parameters."""
    started = time.perf_counter()
    k = serve_cfg.default_k if k is None else k
    check_k(k, serve_cfg)
    data, name = await _uploaded_audio(request, int(serve_cfg.max_upload_mb * 1e6))
    result = await backend.search_audio(data, name, k, bias, where)
    took = 1e3 * (time.perf_counter() - started)
    return {"query": name, "k": k, "took_ms": took, **with_urls(request, result)}

"""What the API answers when a request cannot be served: the JSON error shape
`{"error": {"code": ..., "message": ...}}`, the exception handlers that produce it, and the
request-body size limits.

`install_error_handlers(app)` puts them on an app (`gpa_ray.serve.api.create_api` does).
A client's mistake gets a 4xx that says what is wrong: malformed JSON (400), wrong
content type (415), body over the size limit (413), a bad field (422), unknown route or
clip (404), wrong method (405), an index built with another model (409). Anything else
is a fault of the service: a 500 that names only the exception's type.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpa_ray.serve.retriever import IndexMismatchError, QueryError

logger = logging.getLogger(__name__)

JSON_BODY_LIMIT = 1_000_000
"""Bytes a JSON request body may carry (declared or actually sent) before it is refused."""

SELF_LIMITED_ROUTES = frozenset({"/v1/search/audio"})
"""Routes that read their body themselves under their own limit (`read_body`)."""


class ApiError(Exception):
    """An error answered as `{"error": {"code", "message"}}` with `status`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


REQUEST_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "malformed request (e.g. invalid JSON)"),
        (413, "body over the size limit"),
        (415, "wrong content type"),
        (422, "a field is invalid (the message says which and why)"),
    )
}
"""The 4xx answers a search route documents in the OpenAPI schema (`responses=`)."""


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def media_type(request: Request) -> str:
    """The request's Content-Type without its parameters, lower case ("" if none)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _is_json(media: str) -> bool:
    return media == "application/json" or media.endswith("+json")


def too_large(size: int, limit: int) -> str:
    return f"the body is {size / 1e6:.1f} MB or more; the limit is {limit / 1e6:g} MB"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "bad_content_length", f"invalid Content-Length {declared!r}")
        if int(declared) > limit:
            raise ApiError(413, "too_large", too_large(int(declared), limit))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", too_large(size, limit))
        chunks.append(chunk)
    return b"".join(chunks)


class BodyLimit:
    """ASGI middleware: a request body (other than the audio upload's, which its route
    limits itself) is refused with 413 once the bytes actually received pass `limit`,
    whether it declares a `Content-Length` or arrives chunked. The body is counted as
    FastAPI reads it, so nothing over the limit is ever held."""

    def __init__(
        self, app: ASGIApp, limit: int = JSON_BODY_LIMIT, exempt: frozenset[str] = frozenset()
    ) -> None:
        self.app = app
        self.limit = limit
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"").decode()
        if declared.isdigit() and int(declared) > self.limit:
            response = error_response(413, "too_large", too_large(int(declared), self.limit))
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # FastAPI passes an HTTPException raised while it reads the body on to
                    # the handlers (`http_error`), which answer it in the error shape.
                    raise StarletteHTTPException(413, too_large(received, self.limit))
            return message

        await self.app(scope, counted, send)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = list(err.get("loc", ()))
        if where and where[0] in ("body", "query", "path", "header"):
            where = where[1:]  # the part of the request; the rest names the field
        loc = ".".join(str(p) for p in where)
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts)


async def api_error(_: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message)


async def query_error(_: Request, exc: QueryError) -> JSONResponse:
    return error_response(422, "invalid_audio", str(exc))


async def index_mismatch(_: Request, exc: IndexMismatchError) -> JSONResponse:
    return error_response(409, "index_mismatch", str(exc))


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's validation failure, told apart: a body that is not JSON at all (415), JSON
    that does not parse (400), or a field that is wrong (422)."""
    errors = exc.errors()
    body_error = any(e.get("loc", ("",))[0] == "body" for e in errors)
    media = media_type(request)
    if body_error and media and not _is_json(media):
        return error_response(
            415, "unsupported_media_type", f"Content-Type must be application/json, got {media}"
        )
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = "; ".join(str(e.get("ctx", {}).get("error", "")) for e in errors)
        return error_response(400, "malformed_json", f"the body is not valid JSON ({detail})")
    return error_response(422, "invalid_request", _validation_message(exc))


async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
        exc.status_code, "http_error"
    )
    response = error_response(exc.status_code, code, str(exc.detail))
    response.headers.update(exc.headers or {})  # e.g. 405's `Allow` (RFC 9110 section 15.5.6)
    return response


async def internal_error(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("request failed")
    return error_response(500, "internal", f"internal error ({type(exc).__name__})")


def install_error_handlers(app: FastAPI) -> None:
    """Every error `app` can meet answered in the JSON error shape; the body limit."""
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(QueryError, query_error)
    app.add_exception_handler(IndexMismatchError, index_mismatch)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.add_middleware(BodyLimit, exempt=SELF_LIMITED_ROUTES)

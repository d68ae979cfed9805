"""A clip's record (`GET /v1/clips/{id}`) and its stored audio (`GET /v1/audio/{id}`);
`audio_url` is where a response points a client for a clip's audio. The audio answers a
single byte range (RFC 9110 14): a browser seeks in a long file, or starts a player at a
segment (`#t=start,end`), only where the server serves ranges."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gpa_ray.serve.backend import BackendDep
from gpa_ray.serve.errors import ApiError, ErrorResponse, error_response

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")

router = APIRouter()


def audio_url(request: Request, clip_id: str, has_audio: bool) -> str | None:
    """The path of the clip's audio under the app's root path; None without audio."""
    if not has_audio:
        return None
    return f"{request.scope.get('root_path', '')}/v1/audio/{quote(clip_id, safe='')}"


@router.get("/v1/clips/{clip_id:path}", responses={404: {"model": ErrorResponse}})
async def clip(clip_id: str, request: Request, backend: BackendDep) -> dict[str, Any]:
    """A clip's metadata, its captions and where its audio is (if the index keeps it)."""
    record = await backend.clip(clip_id)
    if record is None:
        raise ApiError(404, "unknown_clip", f"no clip with id {clip_id!r} in the index")
    return {**record, "audio_url": audio_url(request, clip_id, record["has_audio"])}


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single `bytes=` range of a `size`-byte body; None to send
    the whole body (no header, or one this server ignores: several ranges or bad syntax,
    as RFC 9110 allows); `ValueError` when no byte of the range exists."""
    match = _RANGE.fullmatch((header or "").strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":  # the last n bytes
        n = int(last)
        if n == 0:
            raise ValueError("an empty suffix range")
        return max(0, size - n), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        raise ValueError(f"bytes {start}-{last} of {size}")
    return start, end


@router.get(
    "/v1/audio/{clip_id:path}",
    response_class=Response,
    responses={
        200: {"content": {"audio/flac": {}}},
        206: {"content": {"audio/flac": {}}, "description": "the requested byte range"},
        404: {"model": ErrorResponse},
        416: {"model": ErrorResponse, "description": "the byte range lies outside the file"},
    },
)
async def clip_audio(clip_id: str, request: Request, backend: BackendDep) -> Response:
    """The clip's stored audio as FLAC (or the one byte range asked for)."""
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
    try:
        wanted = byte_range(request.headers.get("range"), len(data))
    except ValueError as exc:
        refused = error_response(416, "range_not_satisfiable", f"{exc}: no such bytes")
        refused.headers["Content-Range"] = f"bytes */{len(data)}"
        return refused
    headers = {"Accept-Ranges": "bytes"}
    if wanted is None:
        return Response(data, media_type="audio/flac", headers=headers)
    first, last = wanted
    headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
    return Response(data[first : last + 1], 206, media_type="audio/flac", headers=headers)

"""A clip's record (`GET /v1/clips/{id}`) and its stored audio (`GET /v1/audio/{id}`);
`audio_url` is where a response points a client for a clip's audio."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gpa_ray.serve.backend import BackendDep
from gpa_ray.serve.errors import ApiError, ErrorResponse

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


@router.get(
    "/v1/audio/{clip_id:path}",
    response_class=Response,
    responses={200: {"content": {"audio/flac": {}}}, 404: {"model": ErrorResponse}},
)
async def clip_audio(clip_id: str, backend: BackendDep) -> Response:
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

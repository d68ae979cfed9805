"""The service's own state: liveness (`GET /healthz`), the index version served
(`GET /v1/index`) and the switch to a newer one (`POST /v1/index/reload`), and the
encoders' batch sizes and compute times (`GET /v1/stats`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from gpa_ray.serve.backend import BackendDep
from gpa_ray.serve.errors import ErrorResponse

router = APIRouter()


@router.get("/healthz")
async def healthz(backend: BackendDep) -> dict[str, Any]:
    """Liveness, and which index version is served."""
    return await backend.health()


@router.get("/v1/index")
async def index_manifest(backend: BackendDep) -> dict[str, Any]:
    """The manifest of the index version being served."""
    return await backend.manifest()


@router.post(
    "/v1/index/reload",
    responses={
        401: {"model": ErrorResponse, "description": "a key is set and the request has none"},
        403: {"model": ErrorResponse, "description": "no key is set: reloading is refused"},
        409: {"model": ErrorResponse},
    },
)
async def reload(backend: BackendDep) -> dict[str, Any]:
    """Serve the version the index URI names now (its LATEST), if it changed."""
    return await backend.reload()


@router.get("/v1/stats")
async def stats(backend: BackendDep) -> dict[str, Any]:
    """Batch sizes the encoders ran so far (how well `@serve.batch` fills)."""
    return await backend.stats()

"""Searches that start from an embedding: `POST /v1/search/vector` (a vector the client
computed) and `GET /v1/similar/{id}` ("more like this": clips that sound like an indexed
clip, by the inner product of global audio embeddings)."""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StrictFloat

from gpa_ray.models.gpa import Embeddings
from gpa_ray.serve.backend import BackendDep, ServeConfigDep
from gpa_ray.serve.errors import REQUEST_ERRORS, ApiError, ErrorResponse
from gpa_ray.serve.openapi_limits import WholeNumber
from gpa_ray.serve.routes.filters import FilterQueryDep, SearchFilter
from gpa_ray.serve.routes.search import ClipResult, TextResult, check_k, with_urls

router = APIRouter()


class VectorSearchRequest(BaseModel):
    """A query given as an embedding in the index's space (it is L2-normalised here)."""

    model_config = ConfigDict(extra="forbid")
    global_: list[StrictFloat] = Field(alias="global", description="global embedding [E]")
    prototypes: list[list[StrictFloat]] | None = Field(
        None, description="prototypes [K+1][E]: required when the index has prototypes"
    )
    target: Literal["clips", "texts"] = Field(
        "clips", description="clips: the vector is a text query; texts: an audio query"
    )
    k: WholeNumber | None = Field(None, description="how many results (1..max_k)")
    bias: bool = Field(True, description="texts: add the Sinkhorn text bias")
    filter: SearchFilter | None = None


class VectorSearchResponse(BaseModel):
    k: int
    target: str
    index_version: str
    took_ms: float
    results: list[ClipResult] | list[TextResult]


class SimilarResponse(BaseModel):
    clip_id: str
    k: int
    index_version: str
    took_ms: float
    results: list[ClipResult]


def _unit(rows: list[list[float]], what: str) -> torch.Tensor:
    values = torch.tensor(rows, dtype=torch.float32)
    norms = values.norm(dim=-1, keepdim=True)
    if not torch.isfinite(values).all() or bool((norms == 0).any()):
        raise ApiError(422, "invalid_vector", f"{what} must be finite and non-zero")
    return values / norms


def query_embeddings(body: VectorSearchRequest, embed_dim: int, n_prototypes: int) -> Embeddings:
    """The request's vectors as a one-row query, checked against the index's shapes."""
    if len(body.global_) != embed_dim:
        raise ApiError(
            422,
            "invalid_vector",
            f"global has {len(body.global_)} values; the index has {embed_dim}",
        )
    global_ = _unit([body.global_], "global")
    if not n_prototypes:
        return Embeddings(global_)
    shape = (n_prototypes, embed_dim)
    given = body.prototypes
    if given is None or len(given) != shape[0] or any(len(p) != embed_dim for p in given):
        raise ApiError(
            422, "invalid_vector", f"prototypes must be {shape[0]} lists of {embed_dim} values"
        )
    return Embeddings(global_, _unit(given, "prototypes")[None])


@router.post("/v1/search/vector", response_model=VectorSearchResponse, responses=REQUEST_ERRORS)
async def search_vector(
    body: VectorSearchRequest, request: Request, backend: BackendDep, serve_cfg: ServeConfigDep
) -> dict[str, Any]:
    """Clips (or captions) for a query embedding computed elsewhere."""
    started = time.perf_counter()
    k = serve_cfg.default_k if body.k is None else body.k
    check_k(k, serve_cfg)
    manifest = await backend.manifest()
    query = query_embeddings(body, manifest["embed_dim"], manifest["n_prototypes"])
    where = body.filter.clip_filter() if body.filter else None
    result = await backend.search_vector(query, body.target, k, body.bias, where)
    took = 1e3 * (time.perf_counter() - started)
    return {"k": k, "target": body.target, "took_ms": took, **with_urls(request, result)}


@router.get(
    "/v1/similar/{clip_id:path}",
    response_model=SimilarResponse,
    responses={**REQUEST_ERRORS, 404: {"model": ErrorResponse}},
)
async def similar(
    clip_id: str,
    request: Request,
    backend: BackendDep,
    serve_cfg: ServeConfigDep,
    where: FilterQueryDep,
    k: int | None = Query(None, description="how many clips (1..max_k)"),
) -> dict[str, Any]:
    """Clips that sound like an indexed clip (the clip itself excluded)."""
    started = time.perf_counter()
    k = serve_cfg.default_k if k is None else k
    check_k(k, serve_cfg)
    result = await backend.similar(clip_id, k, where)
    if result is None:
        raise ApiError(404, "unknown_clip", f"no clip with id {clip_id!r} in the index")
    took = 1e3 * (time.perf_counter() - started)
    return {"clip_id": clip_id, "k": k, "took_ms": took, **with_urls(request, result)}

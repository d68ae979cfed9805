"""The HTTP API of the retriever (FastAPI), independent of where the work runs.

`create_api(backend, cfg)` builds the app from the routers of `gpa_ray.serve.routes`, the
error handlers of `gpa_ray.serve.errors` and a *backend* that does the work
(`gpa_ray.serve.backend`). On Ray Serve the backend forwards to the encoder and searcher
deployments (`gpa_ray.serve.app`); the in-process `LocalBackend` runs the same classes in
one process (`local_app`, e.g. for a single machine without Ray: `uvicorn --factory` on a
function that returns it).

Routes (module of `gpa_ray.serve.routes` in brackets):
    POST /v1/search/text     [search] {"query": str, "k": int, "filter": {...}}: clips
                             for a caption
    POST /v1/search/text/batch [search] {"queries": [str], "k", "filter"}: many at once
    POST /v1/search/audio    [search] raw audio body (any format the decoder reads) or
                             multipart/form-data with a `file` field; ?k=&bias=&corpus=
                             &split=&label=&min_duration_s=&max_duration_s=: captions
                             for a sound (Sinkhorn text bias by default)
    POST /v1/search/vector   [vectors] {"global": [E], "prototypes": [[E]], "target":
                             "clips"|"texts", "k", "bias", "filter"}: search by embedding
    GET  /v1/similar/{id}    [vectors] ?k= + filters: clips that sound like a clip
    GET  /v1/clips/{id}      [clips] clip metadata and its captions
    GET  /v1/audio/{id}      [clips] the clip's stored audio (FLAC)
    GET  /v1/index           [service] the manifest of the index version served
    POST /v1/index/reload    [service] switch to the version the index URI names now
    GET  /v1/stats           [service] encoder batch sizes and replica compute times
    GET  /healthz            [service] liveness + index version and counts
    GET  /                   [page] the search page;  /docs, /openapi.json: the API docs

Everything a client can get wrong is answered with a 4xx and a JSON body
`{"error": {"code": ..., "message": ...}}` saying what is wrong: malformed JSON (400),
wrong content type (415), body over the size limit (413), a bad field (422: empty or
over-long query, k outside 1..max_k, undecodable audio), unknown clip (404)
(`gpa_ray.serve.errors`). A 5xx means a fault of the service, never of the request.
On Serve every request is also counted and timed as a Prometheus metric
(`gpa_ray.serve.metrics`).
"""

from __future__ import annotations

from fastapi import FastAPI

from gpa_ray.config import Config
from gpa_ray.serve.auth import api_key_gate, check_exposure, load_api_key
from gpa_ray.serve.backend import Backend, attach_backend
from gpa_ray.serve.errors import install_error_handlers
from gpa_ray.serve.metrics import MetricsMiddleware, RequestMetrics
from gpa_ray.serve.openapi_limits import document_limits
from gpa_ray.serve.retriever import served_manifest
from gpa_ray.serve.routes import clips, page, search, service, vectors

ROUTERS = (search.router, vectors.router, clips.router, service.router, page.router)
"""Every route of the API, in the order the OpenAPI schema lists them."""


def create_api(backend: Backend, cfg: Config, metrics: RequestMetrics | None = None) -> FastAPI:
    """The retriever's FastAPI app over `backend`, with the limits of `cfg.serve`; with
    `metrics` (on Ray) every request is counted and timed (`gpa_ray.serve.metrics`)."""
    app = FastAPI(
        title="gpa_ray retriever",
        version="1",
        description="Text-to-audio and audio-to-text search with GPA two-stage ranking.",
    )
    install_error_handlers(app)
    key = load_api_key(cfg.serve)
    check_exposure(cfg.serve, key)
    app.middleware("http")(api_key_gate(key))  # refuses before a body is read
    if metrics is not None:  # outermost: sees the status of every answer, refusals too
        own = [route for route in app.routes if hasattr(route, "path")]  # the API docs
        routes = [*own, *(route for router in ROUTERS for route in router.routes)]
        app.add_middleware(MetricsMiddleware, metrics=metrics, routes=routes)
    for router in ROUTERS:
        app.include_router(router)
    attach_backend(app, backend, cfg.serve)
    manifest = served_manifest(cfg)  # the index's E and K+1, for the vector search's schema
    document_limits(app, cfg.serve, manifest.embed_dim, manifest.n_prototypes)
    return app

"""The backend the API's routes call, and the FastAPI dependencies that hand it (and the
serving limits) to them.

A backend does the work behind the routes: on Ray Serve it forwards to the encoder and
searcher deployments (`ServeBackend` in `gpa_ray.serve.app`); in process `LocalBackend`
(`gpa_ray.serve.local`) runs the same service classes itself. The routes stay module-level
and name neither: `attach_backend` puts one on an app, and `BackendDep` / `ServeConfigDep`
read it back from the app that is answering the request.
"""

from __future__ import annotations

from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, Request

from gpa_ray.config import ServeConfig
from gpa_ray.index.search import ClipFilter
from gpa_ray.models.gpa import Embeddings


class Backend(Protocol):
    """Where the API's work runs (Serve deployments, or in process)."""

    async def search_text(self, query: str, k: int, where: ClipFilter | None) -> dict[str, Any]: ...

    async def search_texts(
        self, queries: list[str], k: int, where: ClipFilter | None
    ) -> list[dict[str, Any]]: ...

    async def search_audio(
        self, data: bytes, source: str, k: int, use_bias: bool, where: ClipFilter | None
    ) -> dict[str, Any]: ...

    async def search_vector(
        self, query: Embeddings, side: str, k: int, use_bias: bool, where: ClipFilter | None
    ) -> dict[str, Any]: ...

    async def similar(
        self, clip_id: str, k: int, where: ClipFilter | None
    ) -> dict[str, Any] | None: ...

    async def clip(self, clip_id: str) -> dict[str, Any] | None: ...

    async def clip_audio(self, clip_id: str) -> tuple[bytes, int] | None: ...

    async def health(self) -> dict[str, Any]: ...

    async def manifest(self) -> dict[str, Any]: ...

    async def reload(self) -> dict[str, Any]: ...

    async def stats(self) -> dict[str, Any]: ...


def attach_backend(app: FastAPI, backend: Backend, serve_cfg: ServeConfig) -> None:
    """Make `backend` and the limits of `serve_cfg` what `app`'s routes get."""
    app.state.backend = backend
    app.state.serve_cfg = serve_cfg


def get_backend(request: Request) -> Backend:
    """The backend attached to the app answering `request`."""
    backend: Backend = request.app.state.backend
    return backend


def get_serve_config(request: Request) -> ServeConfig:
    """The serving limits (k, query length, upload size) of the app answering `request`."""
    serve_cfg: ServeConfig = request.app.state.serve_cfg
    return serve_cfg


BackendDep = Annotated[Backend, Depends(get_backend)]
ServeConfigDep = Annotated[ServeConfig, Depends(get_serve_config)]

"""The retriever API in one process, without Ray: every call runs the service classes
directly (one query at a time, batches of one).

For a single machine or a notebook: `uvicorn --factory gpa_ray.serve.local:app_from_env`
serves the index named by `GPA_RAY_SERVE_ARGS` (a config preset and dotted overrides,
e.g. `debug serve.index_uri=outputs/debug/index`). Ray Serve (`gpa_ray.serve.app`) is the
scalable way; both answer with the same FastAPI app (`gpa_ray.serve.api`).
"""

from __future__ import annotations

import os
import shlex
from collections import Counter
from typing import Any

from fastapi import FastAPI

from gpa_ray.config import Config
from gpa_ray.config_loading import load_config
from gpa_ray.index.search import ClipFilter
from gpa_ray.models.gpa import Embeddings
from gpa_ray.serve.api import create_api
from gpa_ray.serve.retriever import (
    AudioQueryEncoder,
    SearchService,
    TextQueryEncoder,
    index_checkpoint,
    load_model,
)


class LocalBackend:
    """The API's backend with the query encoders and the search service in this process."""

    def __init__(self, cfg: Config) -> None:
        loaded = load_model(cfg, index_checkpoint(cfg))
        self.text = TextQueryEncoder(loaded.model)
        self.audio = AudioQueryEncoder(
            loaded.model, loaded.cfg, cfg.serve.max_audio_seconds, cfg.serve.query_windows
        )
        self.service = SearchService(cfg, loaded)
        self.batches: dict[str, Counter[int]] = {"text": Counter(), "audio": Counter()}

    async def search_text(self, query: str, k: int, where: ClipFilter | None) -> dict[str, Any]:
        self.batches["text"][1] += 1
        return self.service.search_text(self.text.encode([query])[0], k, where)

    async def search_texts(
        self, queries: list[str], k: int, where: ClipFilter | None
    ) -> list[dict[str, Any]]:
        self.batches["text"][len(queries)] += 1
        return [self.service.search_text(e, k, where) for e in self.text.encode(queries)]

    async def search_audio(
        self, data: bytes, source: str, k: int, use_bias: bool, where: ClipFilter | None
    ) -> dict[str, Any]:
        inputs = self.audio.prepare(data, source)
        self.batches["audio"][1] += 1
        return self.service.search_audio(self.audio.encode([inputs])[0], k, use_bias, where)

    async def search_vector(
        self, query: Embeddings, side: str, k: int, use_bias: bool, where: ClipFilter | None
    ) -> dict[str, Any]:
        if side == "clips":
            return self.service.search_text(query, k, where)
        return self.service.search_audio(query, k, use_bias, where)

    async def similar(
        self, clip_id: str, k: int, where: ClipFilter | None
    ) -> dict[str, Any] | None:
        return self.service.similar(clip_id, k, where)

    async def clip(self, clip_id: str) -> dict[str, Any] | None:
        return self.service.clip(clip_id)

    async def clip_audio(self, clip_id: str) -> tuple[bytes, int] | None:
        return self.service.clip_audio(clip_id)

    async def health(self) -> dict[str, Any]:
        return self.service.health()

    async def manifest(self) -> dict[str, Any]:
        return self.service.manifest()

    async def reload(self) -> dict[str, Any]:
        return self.service.reload()

    async def stats(self) -> dict[str, Any]:
        return {name: {str(k): v for k, v in sorted(c.items())} for name, c in self.batches.items()}


def local_app(cfg: Config) -> FastAPI:
    """The retriever API served from this process."""
    return create_api(LocalBackend(cfg), cfg)


def app_from_env() -> FastAPI:
    """`local_app` for the config in `GPA_RAY_SERVE_ARGS` (preset, then dotted overrides)."""
    words = shlex.split(os.environ.get("GPA_RAY_SERVE_ARGS", ""))
    preset = words[0] if words and "=" not in words[0] else None
    overrides = words[1:] if preset else words
    return local_app(load_config(preset, overrides))

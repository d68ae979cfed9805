"""Ray Serve deployments of the retriever and its typed application builder.

    HTTP -> Ingress (FastAPI, `gpa_ray.serve.api`)
              |-> AudioEncoder  decode + preprocess per request, @serve.batch the model
              |-> TextEncoder   @serve.batch: captions -> query embeddings   (S > 1 shards)
              '-> Searcher-i    shard i of the index version mapped; two-stage search;
                                clip records                               (S > 1 shards)

A version of one shard has no TextEncoder and no Searcher: the ingress replica holds the
`ShardServer` itself (text encoded @serve.batch, searched, answered in one replica), so a
text query's only hop is the proxy's. Scale it by ingress replicas.

Every deployment loads the GPA checkpoint that the served index was built with (read
from the index manifest when the app is built), so queries and index live in one space.
`@serve.batch` can only fill a batch of n if a replica accepts n requests at once, and
Serve's default `max_ongoing_requests` (5) would cap every batch at 5: each encoder
accepts twice its batch size, so one batch fills while the previous one runs.

Every `ShardServer` polls the index URI every `serve.reload_interval_s` and switches to a newer
version once it loaded completely (`POST /v1/index/reload` does it at once).

Each ingress replica counts and times the requests it answers, and each searcher reports
the index version and the rows it serves, as Prometheus metrics (`gpa_ray.serve.metrics`).

Errors caused by a request cross deployment boundaries as values (`Failure`), not as
exceptions, so they arrive at the ingress as what they are and become a 4xx there.

`build_app(RetrieverArgs)` is the import path for `serve run` / `serve deploy`
(`gpa_ray/serve/serve_config.yaml`); `start_retriever(cfg)` runs it on the local Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from gpa_ray.config import Config
from gpa_ray.config_loading import config_from_dict, config_to_dict, load_config
from gpa_ray.index.ann import AnnSettings
from gpa_ray.index.search import ClipFilter, merge_shards
from gpa_ray.index.shard_files import shard_of
from gpa_ray.models.factory import LoadedGPA
from gpa_ray.models.gpa import Embeddings
from gpa_ray.serve.api import create_api
from gpa_ray.serve.auth import check_exposure, load_api_key
from gpa_ray.serve.fanout import ShardRequest, TextQuery, gather
from gpa_ray.serve.metrics import IndexMetrics, RequestMetrics
from gpa_ray.serve.retriever import (
    AudioQueryEncoder,
    IndexMismatchError,
    QueryError,
    SearchService,
    TextQueryEncoder,
    load_model,
    served_manifest,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    """A request-caused failure returned by a deployment: `kind` "query" or "mismatch"."""

    kind: str
    message: str


def _value_or_raise(value: Any) -> Any:
    """`value` itself, unless a deployment returned a `Failure`: then the exception it
    stands for (`QueryError` or `IndexMismatchError`), raised here in the ingress so the
    API answers it with its 4xx."""
    if isinstance(value, Failure):
        raise (QueryError if value.kind == "query" else IndexMismatchError)(value.message)
    return value


def _counts(counter: Counter[int]) -> dict[str, int]:
    return {str(size): n for size, n in sorted(counter.items())}


class ComputeTimes:
    """Milliseconds a replica spent computing its recent calls (the last `window`), so
    the time a request spends in Serve itself (routing, queues, serialisation) can be told
    apart from the work: a request's latency minus its stages' compute times."""

    def __init__(self, window: int = 1000) -> None:
        self.recent: deque[float] = deque(maxlen=window)

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.recent.append(1e3 * (time.perf_counter() - started))

    def summary(self) -> dict[str, float]:
        values = sorted(self.recent)
        if not values:
            return {"calls": 0}
        return {
            "calls": len(values),
            "p50_ms": values[len(values) // 2],
            "mean_ms": sum(values) / len(values),
        }


def _replica_model(cfg: dict[str, Any], checkpoint: str) -> tuple[Config, LoadedGPA]:
    """What every replica starts from: the resolved config, the torch threads it allows,
    and the index's GPA checkpoint (model, training config, digest), loaded once."""
    config = config_from_dict(cfg)
    torch.set_num_threads(config.serve.torch_threads)
    return config, load_model(config, checkpoint)


@serve.deployment(name="TextEncoder")
class TextEncoderDeployment:
    """Batches concurrent text queries into one forward pass of the text tower."""

    def __init__(self, cfg: dict[str, Any], checkpoint: str) -> None:
        config, loaded = _replica_model(cfg, checkpoint)
        self.encoder = TextQueryEncoder(loaded.model)
        self.batches: Counter[int] = Counter()
        self.compute = ComputeTimes()
        self.encode.set_max_batch_size(config.serve.text_batch_size)
        self.encode.set_batch_wait_timeout_s(config.serve.text_batch_wait_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def encode(self, texts: list[str]) -> list[Embeddings]:
        self.batches[len(texts)] += 1
        with self.compute.timed():
            return self.encoder.encode(texts)

    def batch_sizes(self) -> dict[str, int]:
        return _counts(self.batches)

    def compute_times(self) -> dict[str, float]:
        """Per batch: the tower's forward pass and projection."""
        return self.compute.summary()


@serve.deployment(name="AudioEncoder")
class AudioEncoderDeployment:
    """Decodes and preprocesses each upload on its own (a bad file fails only its own
    request), then batches the tower's forward pass."""

    def __init__(self, cfg: dict[str, Any], checkpoint: str) -> None:
        config, loaded = _replica_model(cfg, checkpoint)
        self.encoder = AudioQueryEncoder(
            loaded.model, loaded.cfg, config.serve.max_audio_seconds, config.serve.query_windows
        )
        self.batches: Counter[int] = Counter()
        self._encode.set_max_batch_size(config.serve.audio_batch_size)
        self._encode.set_batch_wait_timeout_s(config.serve.audio_batch_wait_s)

    async def embed(self, data: bytes, source: str) -> Embeddings | Failure:
        try:
            inputs = self.encoder.prepare(data, source)
        except QueryError as exc:
            return Failure("query", str(exc))
        return await self._encode(inputs)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.02)
    async def _encode(self, items: list[list[dict[str, torch.Tensor]]]) -> list[Embeddings]:
        self.batches[len(items)] += 1
        return self.encoder.encode(items)

    def batch_sizes(self) -> dict[str, int]:
        return _counts(self.batches)


class ShardServer:
    """What serves shards of the served index version (all, or `shard`): searches, clip
    lookups, following LATEST. It holds the whole GPA model for stage 2 anyway, so it also
    encodes text queries itself (batched). With S shards each runs as a searcher
    deployment (`SearcherDeployment`); with one shard the ingress runs it in its own
    replica (`InProcess`), so a text query crosses no deployment boundary at all."""

    def __init__(self, cfg: dict[str, Any], checkpoint: str, shard: int | None = None) -> None:
        config, loaded = _replica_model(cfg, checkpoint)
        self.service = SearchService(config, loaded, None if shard is None else [shard])
        self.encoder = TextQueryEncoder(loaded.model)
        self.compute = ComputeTimes()
        self.batches: Counter[int] = Counter()
        self.search_query.set_max_batch_size(config.serve.text_batch_size)
        self.search_query.set_batch_wait_timeout_s(config.serve.text_batch_wait_s)
        self._stop = threading.Event()
        IndexMetrics(config.serve.app_name, shard).keep_reporting(self.service.health, self._stop)
        if config.serve.reload_interval_s > 0:
            threading.Thread(
                target=self._poll, args=(config.serve.reload_interval_s,), daemon=True
            ).start()

    def _poll(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                change = self.service.reload()
                if change["changed"]:
                    logger.info("now serving index version %s", change["index_version"])
            except Exception:
                logger.exception("index version check failed; still serving the current one")

    def __del__(self) -> None:
        self._stop.set()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def search_query(self, requests: list[TextQuery]) -> list[dict[str, Any]]:
        """Text queries end to end: one forward pass for the batch, then each search."""
        self.batches[len(requests)] += 1
        with self.compute.timed():
            embeddings = self.encoder.encode([r.text for r in requests])
            return [
                self.service.search_text(e, r.k, r.where)
                for e, r in zip(embeddings, requests, strict=True)
            ]

    def search_audio(
        self, query: Embeddings, k: int, use_bias: bool, where: ClipFilter | None
    ) -> dict[str, Any]:
        with self.compute.timed():
            return self.service.search_audio(query, k, use_bias, where)

    def candidates(self, request: ShardRequest) -> tuple[str, list[Any]]:
        """This shard's candidates for a fan-out search (the ingress merges them)."""
        with self.compute.timed():
            return self.service.version, request.run(self.service.searcher)

    def compute_times(self) -> dict[str, float]:
        """Per search: both stages and the result rows (with one shard: the encoding too)."""
        return self.compute.summary()

    def batch_sizes(self) -> dict[str, int]:
        return _counts(self.batches)

    def clip_embedding(self, clip_id: str) -> Embeddings | None:
        return self.service.searcher.clip_embedding(clip_id)

    def similar(self, clip_id: str, k: int, where: ClipFilter | None) -> dict[str, Any] | None:
        return self.service.similar(clip_id, k, where)

    def clip(self, clip_id: str) -> dict[str, Any] | None:
        return self.service.clip(clip_id)

    def clip_audio(self, clip_id: str) -> tuple[bytes, int] | None:
        return self.service.clip_audio(clip_id)

    def health(self) -> dict[str, Any]:
        return self.service.health()

    def manifest(self) -> dict[str, Any]:
        return self.service.manifest()

    def reload(self) -> dict[str, Any] | Failure:
        try:
            return self.service.reload()
        except IndexMismatchError as exc:
            return Failure("mismatch", str(exc))


SearcherDeployment = serve.deployment(name="Searcher")(ShardServer)
"""One shard's `ShardServer` as its own deployment (versions of several shards)."""


class InProcess:
    """A handle-shaped view of an object in this replica: `view.method.remote(...)` is an
    awaitable of the method's result, as a `DeploymentHandle` call is. It lets the ingress
    hold the one-shard `ShardServer` itself behind the same backend code."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> _InProcessMethod:
        return _InProcessMethod(getattr(self._target, name))


class _InProcessMethod:
    def __init__(self, method: Any) -> None:
        self.method = method

    async def remote(self, *args: Any, **kwargs: Any) -> Any:
        result = self.method(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result


class ServeBackend:
    """The API's backend on Serve: forwards to the encoder and searcher deployments.

    With one shard `searchers` is the ingress's own `ShardServer` (`InProcess`): a text
    query is encoded and searched in the ingress replica. With S shards the query is
    embedded once by the text encoder and the ingress fans out to every shard's
    deployment and merges (`gpa_ray.serve.fanout`)."""

    def __init__(
        self,
        cfg: Config,
        text: DeploymentHandle | None,
        audio: DeploymentHandle,
        searchers: list[DeploymentHandle] | list[InProcess],
    ) -> None:
        self.cfg = cfg
        self.text = text
        self.audio = audio
        self.searchers = searchers
        self.settings = AnnSettings.from_config(cfg.index)

    async def _fan_out(self, request: ShardRequest) -> dict[str, Any]:
        answers = await asyncio.gather(*(h.candidates.remote(request) for h in self.searchers))
        version, per_shard = gather(answers)
        (results,) = merge_shards(per_shard, request.k, self.cfg.index.shortlist, self.settings)
        return {"index_version": version, "results": results}

    def _owner(self, clip_id: str) -> DeploymentHandle | InProcess:
        return self.searchers[shard_of([clip_id], len(self.searchers))[0]]

    async def search_text(self, query: str, k: int, where: ClipFilter | None) -> dict[str, Any]:
        if self.text is None:
            return await self.searchers[0].search_query.remote(TextQuery(query, k, where))
        embedding = await self.text.encode.remote(query)
        return await self._fan_out(ShardRequest("text", embedding, k, where=where))

    async def search_texts(
        self, queries: list[str], k: int, where: ClipFilter | None
    ) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self.search_text(q, k, where) for q in queries)))

    async def search_vector(
        self, query: Embeddings, side: str, k: int, use_bias: bool, where: ClipFilter | None
    ) -> dict[str, Any]:
        kind = "text" if side == "clips" else "audio"
        result = await self._fan_out(ShardRequest(kind, query, k, use_bias, where=where))
        if kind == "audio":
            result["bias_applied"] = use_bias and (await self.health())["has_bias"]
        return result

    async def search_audio(
        self, data: bytes, source: str, k: int, use_bias: bool, where: ClipFilter | None
    ) -> dict[str, Any]:
        embedding = _value_or_raise(await self.audio.embed.remote(data, source))
        if len(self.searchers) == 1:
            return await self.searchers[0].search_audio.remote(embedding, k, use_bias, where)
        return await self.search_vector(embedding, "texts", k, use_bias, where)

    async def similar(
        self, clip_id: str, k: int, where: ClipFilter | None
    ) -> dict[str, Any] | None:
        owner = self._owner(clip_id)
        if len(self.searchers) == 1:
            return await owner.similar.remote(clip_id, k, where)
        embedding = await owner.clip_embedding.remote(clip_id)
        if embedding is None:
            return None
        request = ShardRequest("similar", embedding.global_[0], k, exclude=clip_id, where=where)
        return await self._fan_out(request)

    async def clip(self, clip_id: str) -> dict[str, Any] | None:
        return await self._owner(clip_id).clip.remote(clip_id)

    async def clip_audio(self, clip_id: str) -> tuple[bytes, int] | None:
        return await self._owner(clip_id).clip_audio.remote(clip_id)

    async def health(self) -> dict[str, Any]:
        parts = await asyncio.gather(*(h.health.remote() for h in self.searchers))
        return {
            **parts[0],
            "shards": [s for p in parts for s in p["shards"]],
            "clips": sum(p["clips"] for p in parts),
            "texts": sum(p["texts"] for p in parts),
            "load_s": max(p["load_s"] for p in parts),
        }

    async def manifest(self) -> dict[str, Any]:
        return await self.searchers[0].manifest.remote()

    async def reload(self) -> dict[str, Any]:
        answers = await asyncio.gather(*(h.reload.remote() for h in self.searchers))
        return [_value_or_raise(a) for a in answers][0]

    async def stats(self) -> dict[str, Any]:
        searcher = self.searchers[0]
        compute = {"searcher": await searcher.compute_times.remote()}
        if self.text is None:
            text_batches = await searcher.batch_sizes.remote()
        else:
            text_batches = await self.text.batch_sizes.remote()
            compute["text_encoder"] = await self.text.compute_times.remote()
        return {
            "note": "batch sizes seen by one replica of each encoder (with one shard the "
            "ingress replica answering encodes text); compute times of the last 1000 "
            "calls of one replica of each deployment",
            "text": text_batches,
            "audio": await self.audio.batch_sizes.remote(),
            "compute_ms": compute,
        }


@serve.deployment(name="Ingress")
@serve.ingress()
class IngressDeployment:
    """The HTTP entry point: the FastAPI app of `gpa_ray.serve.api` over `ServeBackend`.
    Without searcher handles (a version of one shard) it serves the index itself."""

    def __init__(
        self,
        cfg: dict[str, Any],
        checkpoint: str,
        text: DeploymentHandle | None,
        audio: DeploymentHandle,
        searchers: list[DeploymentHandle] | None,
    ) -> None:
        self.cfg = config_from_dict(cfg)
        shards = searchers if searchers else [InProcess(ShardServer(cfg, checkpoint))]
        self.backend = ServeBackend(self.cfg, text, audio, shards)

    def __serve_build_asgi_app__(self) -> Any:
        return create_api(self.backend, self.cfg, RequestMetrics(self.cfg.serve.app_name))


class RetrieverArgs(BaseModel):
    """Arguments of `build_app` (`args:` in a Serve config file): a config preset (name
    or YAML path) and dotted overrides, checked against the config schema."""

    model_config = ConfigDict(extra="forbid")
    config: str | None = Field(None, description="preset name or YAML path (None: defaults)")
    overrides: list[str] = Field(
        default_factory=list, description="dotted overrides, e.g. serve.index_uri=s3://b/index"
    )

    @model_validator(mode="after")
    def _valid(self) -> RetrieverArgs:
        self.resolve()
        return self

    def resolve(self) -> Config:
        return load_config(self.config, self.overrides)


def retriever_app(cfg: Config) -> serve.Application:
    """The bound retriever application for a resolved config. A version of one shard is
    served by the ingress itself (plus the audio encoder); one of S shards gets a
    searcher deployment per shard and a text encoder."""
    check_exposure(cfg.serve, load_api_key(cfg.serve))  # fail here, not in each replica
    manifest = served_manifest(cfg)
    checkpoint, n_shards = manifest.checkpoint, int(manifest.search.get("shards", 1))
    cfg_dict = config_to_dict(cfg)
    s = cfg.serve
    actor = {"num_cpus": s.cpus_per_replica}
    audio = AudioEncoderDeployment.options(
        max_ongoing_requests=2 * s.audio_batch_size, ray_actor_options=actor
    ).bind(cfg_dict, checkpoint)
    text, searchers = None, None
    if n_shards > 1:
        text = TextEncoderDeployment.options(
            max_ongoing_requests=2 * s.text_batch_size, ray_actor_options=actor
        ).bind(cfg_dict, checkpoint)
        searchers = [
            SearcherDeployment.options(
                name=f"Searcher-{shard}",
                max_ongoing_requests=2 * s.text_batch_size,
                ray_actor_options=actor,
            ).bind(cfg_dict, checkpoint, shard)
            for shard in range(n_shards)
        ]
    return IngressDeployment.options(
        max_ongoing_requests=8 * s.text_batch_size, ray_actor_options=actor
    ).bind(cfg_dict, checkpoint, text, audio, searchers)


def build_app(args: RetrieverArgs) -> serve.Application:
    """Typed application builder (`import_path: gpa_ray.serve.app:build_app`)."""
    return retriever_app(args.resolve())


# Serve validates `args` against the builder's parameter annotation only when that is a
# class; postponed annotations make it the string "RetrieverArgs", and Serve would pass a
# plain dict. The signature therefore carries the class itself.
build_app.__signature__ = inspect.signature(build_app, eval_str=True)  # type: ignore[attr-defined]


def start_retriever(cfg: Config) -> str:
    """Run the retriever on the connected Ray, HTTP on `serve.host:serve.port`; its URL."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(retriever_app(cfg), name=cfg.serve.app_name, route_prefix="/")
    return f"http://{cfg.serve.host}:{cfg.serve.port}"

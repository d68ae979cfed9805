"""Prometheus metrics of the retriever on Ray Serve, through Ray's metrics API
(`ray.util.metrics`): every replica reports to its node's metrics agent, which exports
them with the rest of Ray's on the node's metrics-export port (Prometheus text at
`/metrics`, refreshed about every 10 s).

Ray prefixes each name with `ray_` and counters with `_total` on export:

    ray_gpa_serve_requests_total{application, route, method, status}  requests answered
    ray_gpa_serve_request_latency_ms_bucket{application, route, method, status, le}
                                           (+ _count, _sum)  milliseconds to answer
    ray_gpa_serve_index_info{application, index_version, shard}  1: the version served
    ray_gpa_serve_index_clips{application, shard}, ..._index_texts{...}  its rows

`application` is the Serve application (`serve.app_name`). `route` is the route's template
(`/v1/clips/{clip_id}`), so ids do not multiply series; a path no route knows is
`unmatched` (its 404), a known path with the wrong method keeps the route (its 405).
`status` is the status the client got, errors included (a request whose handler raised is
counted as the 500 it is answered with). `shard` is the shard a searcher serves, or `all`
when the ingress serves the whole version. Ray also adds its own labels (`WorkerId` tells
replicas apart, `NodeAddress`, `SessionName`...). Ray computes a histogram's `_sum` from
its bucket midpoints, so quantiles come from the buckets.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

LATENCY_BOUNDARIES_MS = [1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000]
"""Bucket upper bounds of the latency histogram (milliseconds)."""

UNMATCHED = "unmatched"
"""The `route` label of a path that no route matches."""


class RequestMetrics:
    """The request counter and latency histogram of `application` (created in the replica
    that records)."""

    def __init__(self, application: str) -> None:
        from ray.util.metrics import Counter, Histogram

        tags = ("application", "route", "method", "status")
        default = {"application": application}
        self.requests = Counter(
            "gpa_serve_requests", description="HTTP requests answered", tag_keys=tags
        ).set_default_tags(default)
        self.latency = Histogram(
            "gpa_serve_request_latency_ms",
            description="time from a request's arrival to the end of its response",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=tags,
        ).set_default_tags(default)

    def record(self, route: str, method: str, status: int, seconds: float) -> None:
        tags = {"route": route, "method": method, "status": str(status)}
        self.requests.inc(tags=tags)
        self.latency.observe(1e3 * seconds, tags=tags)


class IndexMetrics:
    """Which index version a searcher serves and how many clips and texts it holds.

    Ray exports a gauge only while it is being set (a value not set again within about
    two export periods is dropped), so `keep_reporting` sets them again every few seconds;
    a version served before drops out the same way."""

    def __init__(self, application: str, shard: int | None) -> None:
        from ray.util.metrics import Gauge

        self.shard = "all" if shard is None else str(shard)
        default = {"application": application}
        self.info = Gauge(
            "gpa_serve_index_info",
            description="1 for the index version served",
            tag_keys=("application", "index_version", "shard"),
        ).set_default_tags(default)
        counts = ("application", "shard")
        self.clips = Gauge("gpa_serve_index_clips", "clips served", counts)
        self.texts = Gauge("gpa_serve_index_texts", "texts served", counts)
        self.clips.set_default_tags(default)
        self.texts.set_default_tags(default)

    def serving(self, health: dict[str, Any]) -> None:
        """Report the version in `health` (`SearchService.health()`) as the one served."""
        self.info.set(1, tags={"index_version": str(health["index_version"]), "shard": self.shard})
        self.clips.set(health["clips"], tags={"shard": self.shard})
        self.texts.set(health["texts"], tags={"shard": self.shard})

    def keep_reporting(
        self, health: Callable[[], dict[str, Any]], stop: threading.Event, every_s: float = 5.0
    ) -> None:
        """Report `health()` now and then every `every_s` until `stop` is set (a daemon
        thread)."""

        def loop() -> None:
            while True:
                try:
                    self.serving(health())
                except Exception:
                    logger.exception("index metrics not reported")
                if stop.wait(every_s):
                    return

        threading.Thread(target=loop, name="index-metrics", daemon=True).start()


def route_template(scope: Scope, routes: list[BaseRoute]) -> str:
    """The template of the route `scope` reaches, as a router picks it: the first full
    match, else the first partial one (right path, wrong method), else `UNMATCHED`.
    Matched up front, so a request refused before routing (a key, a body limit) is
    counted under its route too. `routes` must be flat: FastAPI keeps an included router
    as one node without a path, so `app.routes` alone would not do."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return str(getattr(route, "path", UNMATCHED))
        if match is Match.PARTIAL and partial is None:
            partial = route
    return str(getattr(partial, "path", UNMATCHED))


class MetricsMiddleware:
    """ASGI middleware: counts and times every HTTP request by route, method and the
    status that was sent. Pure ASGI (it only watches `send`), so a response passes
    through unchanged, whatever its status."""

    def __init__(self, app: ASGIApp, metrics: RequestMetrics, routes: list[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        route = route_template(scope, self.routes)
        status = 500  # what the client gets if the app raises before it answers

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            self.metrics.record(route, scope["method"], status, time.perf_counter() - started)

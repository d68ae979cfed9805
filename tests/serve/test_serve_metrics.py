"""The retriever's Prometheus metrics on Ray Serve (`gpa_ray.serve.metrics`), read from
the session Ray's metrics-export port on loopback, as Prometheus would scrape them."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from gpa_ray.config import Config
from gpa_ray.serve.app import start_retriever
from gpa_ray.serve.metrics import LATENCY_BOUNDARIES_MS

APP = "metrics_test"
"""The Serve application's name: its series are told apart from other apps' by it."""
EXPORT_DEADLINE_S = 90
"""Ray exports a replica's metrics about every 10 s; a change must show within this."""

Key = tuple[str, str, str]
"""(route, method, status) of the request counter."""


@pytest.fixture(scope="module")
def metrics_app(ray_session, serve_config) -> Iterator[tuple[str, Config]]:
    from ray import serve

    cfg = serve_config(f"serve.app_name={APP}")
    url = start_retriever(cfg)
    deadline = time.monotonic() + 300
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=10).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "the retriever did not come up"
        time.sleep(1)
    yield url, cfg
    serve.shutdown()


@pytest.fixture(scope="module")
def metrics_url(ray_session) -> str:
    import ray

    (node,) = ray.nodes()
    assert node["NodeManagerAddress"] == "127.0.0.1"
    return f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"


def scrape(url: str, application: str = APP) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of `application`'s `gpa_serve` metrics: (name, labels, value)."""
    text = requests.get(url, timeout=30).text
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("ray_gpa_serve_") and s.labels.get("application") == application
    ]


def request_counts(samples: list[tuple[str, dict[str, str], float]]) -> Counter[Key]:
    """The request counter by (route, method, status), summed over replicas."""
    counts: Counter[Key] = Counter()
    for name, labels, value in samples:
        if name == "ray_gpa_serve_requests_total":
            counts[labels["route"], labels["method"], labels["status"]] += int(value)
    return counts


def wait_for(
    url: str,
    done: Callable[[list[tuple[str, dict[str, str], float]]], bool],
    application: str = APP,
) -> list[tuple[str, dict[str, str], float]]:
    """Scrape until `done` holds for the samples (or fail at `EXPORT_DEADLINE_S`)."""
    deadline = time.monotonic() + EXPORT_DEADLINE_S
    while True:
        samples = scrape(url, application)
        if done(samples):
            return samples
        gauges = [(n, labels) for n, labels, _ in samples if "index" in n]
        assert time.monotonic() < deadline, (dict(request_counts(samples)), gauges)
        time.sleep(1)


def _chunked(size: int) -> Iterator[bytes]:
    yield b'{"query": "'
    yield b"a" * size
    yield b'"}'


def test_requests_are_counted_by_route_and_status_errors_included(metrics_app, metrics_url) -> None:
    url, _ = metrics_app
    text = f"{url}/v1/search/text"
    json_type = {"Content-Type": "application/json"}
    # (route, method, status), the error code answered (None: a result), the response.
    sent: list[tuple[Key, str | None, requests.Response]] = [
        (("/v1/search/text", "POST", "200"), None, requests.post(text, json={"query": "rain"})),
        (("/v1/search/text", "POST", "200"), None, requests.post(text, json={"query": "a dog"})),
        (
            ("/v1/search/text", "POST", "422"),
            "empty_query",
            requests.post(text, json={"query": ""}),
        ),
        (("/v1/search/text", "GET", "405"), "method_not_allowed", requests.get(text)),
        (
            ("/v1/clips/{clip_id:path}", "GET", "404"),
            "unknown_clip",
            requests.get(f"{url}/v1/clips/no-such-clip"),
        ),
        (("unmatched", "GET", "404"), "not_found", requests.get(f"{url}/v1/no/such/route")),
        (
            ("/v1/search/text", "POST", "413"),  # a declared length over the 1 MB limit
            "too_large",
            requests.post(text, data=b"x" * 2_000_000, headers=json_type),
        ),
        (
            ("/v1/search/text", "POST", "413"),  # chunked: refused while it is read
            "too_large",
            requests.post(text, data=_chunked(2_000_000), headers=json_type),
        ),
        (("/v1/index/reload", "POST", "403"), "forbidden", requests.post(f"{url}/v1/index/reload")),
    ]
    for (_, _, status), code, response in sent:
        # Every answer keeps its status through Serve with the metrics middleware around it.
        assert str(response.status_code) == status, (status, response.text)
        if code is not None:
            assert response.json()["error"]["code"] == code, response.text
    expected = Counter(key for key, _, _ in sent)

    def counted(samples) -> bool:
        counts = request_counts(samples)
        return all(counts[key] >= n for key, n in expected.items())

    counts = request_counts(wait_for(metrics_url, counted))
    assert {key: counts[key] for key in expected} == dict(expected)
    assert counts["/healthz", "GET", "200"] >= 1  # the fixture's readiness checks

    # The counter rises with more requests.
    for query in ("wind", "a bell", "birds"):
        assert requests.post(text, json={"query": query}).status_code == 200
    key = ("/v1/search/text", "POST", "200")
    samples = wait_for(metrics_url, lambda s: request_counts(s)[key] >= expected[key] + 3)
    assert request_counts(samples)[key] == expected[key] + 3

    # The latency histogram saw the same requests, in cumulative buckets.
    buckets: dict[float, float] = {}
    count = 0.0
    for name, labels, value in samples:
        if (labels.get("route"), labels.get("method"), labels.get("status")) != key:
            continue
        if name == "ray_gpa_serve_request_latency_ms_bucket":
            bound = float(labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + value
        elif name == "ray_gpa_serve_request_latency_ms_count":
            count += value
    assert count == expected[key] + 3
    assert sorted(buckets) == [*map(float, LATENCY_BOUNDARIES_MS), float("inf")]
    ordered = [buckets[b] for b in sorted(buckets)]
    assert ordered == sorted(ordered) and ordered[-1] == count
    assert ordered[0] < count  # a search takes more than 1 ms: not all in the first bucket


def test_index_version_and_rows_served(metrics_app, metrics_url) -> None:
    url, _ = metrics_app
    health = requests.get(f"{url}/healthz").json()

    def gauges(samples) -> dict[str, float]:
        out = {}
        for name, labels, value in samples:
            if labels.get("shard") != "all":
                continue
            if name == "ray_gpa_serve_index_info":
                out[f"info:{labels['index_version']}"] = value
            elif name in ("ray_gpa_serve_index_clips", "ray_gpa_serve_index_texts"):
                out[name.rsplit("_", 1)[1]] = value
        return out

    samples = wait_for(metrics_url, lambda s: len(gauges(s)) >= 3)
    assert gauges(samples) == {
        f"info:{health['index_version']}": 1.0,
        "clips": float(health["clips"]),
        "texts": float(health["texts"]),
    }
    assert health["clips"] == 8


def test_a_handler_that_raises_is_counted_as_the_500_it_gets(ray_session, metrics_url) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from gpa_ray.serve.errors import install_error_handlers
    from gpa_ray.serve.metrics import MetricsMiddleware, RequestMetrics

    app = FastAPI()
    install_error_handlers(app)  # the retriever's handlers: a fault becomes a JSON 500

    @app.get("/boom/{part}")
    async def boom(part: str) -> None:
        raise RuntimeError(part)

    application = "metrics_fault_test"
    app.add_middleware(MetricsMiddleware, metrics=RequestMetrics(application), routes=app.routes)
    response = TestClient(app, raise_server_exceptions=False).get("/boom/x")
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal"

    def faults(samples: list) -> float:
        return sum(
            value
            for name, labels, value in samples
            if name == "ray_gpa_serve_requests_total"
            and (labels["route"], labels["status"]) == ("/boom/{part}", "500")
        )

    samples = wait_for(metrics_url, lambda s: faults(s) >= 1, application)
    assert faults(samples) == 1

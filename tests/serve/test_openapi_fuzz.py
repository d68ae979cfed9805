"""Schemathesis fuzzes the retriever's published OpenAPI schema against the server
(uvicorn on loopback): schema-valid requests must be served, schema-invalid ones refused
with a 4xx, no request may cause a 5xx, and every answer must match its documented
status, content type and shape (`gpa_ray.serve.openapi_limits` writes the limits)."""

from __future__ import annotations

from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

EXAMPLES_PER_OPERATION = 25
"""Generated requests per operation and mode (positive, negative), at most: bounded."""


def _inverted_range(case: Any) -> bool:
    """A filter with min_duration_s > max_duration_s: refused by the server (422), and the
    one rule JSON Schema cannot state (the filter's description says it)."""
    sources = [case.query or {}]
    if isinstance(case.body, dict) and isinstance(case.body.get("filter"), dict):
        sources.append(case.body["filter"])
    for given_ in sources:
        low, high = given_.get("min_duration_s"), given_.get("max_duration_s")
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high))
        if numbers and low > high:
            return True
    return False


def _fuzz(operation: Any, mode: GenerationMode, url: str) -> tuple[int, list[str]]:
    """Send up to EXAMPLES_PER_OPERATION generated requests; return how many were sent and
    the checks that failed (all of them, not only the first)."""
    # Random bytes are valid per the schema (any binary body) but are not audio: the
    # upload's positive cases are checked for everything but acceptance.
    excluded = [positive_data_acceptance] if operation.path == "/v1/search/audio" else []
    label = f"{operation.label} ({mode.value})"
    failures: list[str] = []
    sent = 0
    cases = operation.as_strategy(generation_mode=mode).filter(
        lambda case: not _inverted_range(case)
    )

    @given(case=cases)
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case: Any) -> None:
        nonlocal sent
        sent += 1
        try:
            case.call_and_validate(base_url=url, excluded_checks=excluded)
        except BaseException as exc:  # a FailureGroup: keep going, report them all
            failures.append(f"{label}: {exc}"[:1500])

    try:
        fuzz()
    except Unsatisfiable:
        # Nothing to negate: every value of the operation's inputs is valid (no
        # parameters, or a free-form path string), so no negative case exists.
        assert mode is GenerationMode.NEGATIVE, label
    return sent, failures


def test_schema_and_server_agree_under_fuzzing(local_server) -> None:
    url, _ = local_server
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    failures: list[str] = []
    sent: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            count, failed = _fuzz(operation, mode, url)
            sent[f"{operation.label} ({mode.value})"] = count
            failures += failed
    # Hypothesis stops early once an operation's input space is exhausted (a route with
    # no parameters has one request), so each operation must have been exercised rather
    # than a fixed total reached.
    unexercised = [label for label, count in sent.items() if "positive" in label and not count]
    total = sum(sent.values())
    print(f"fuzzed {len(sent) // 2} operations with {total} requests: {sent}")
    assert len(sent) >= 20 and not unexercised, (sent, unexercised)
    assert not failures, f"{len(failures)} of {total} requests disagreed:\n" + "\n\n".join(
        failures[:10]
    )


def test_405_names_the_allowed_methods(local_server) -> None:
    url, _ = local_server
    response = requests.get(f"{url}/v1/search/text", timeout=10)
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json()["error"]["code"] == "method_not_allowed"

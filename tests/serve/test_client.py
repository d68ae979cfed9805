"""The HTTP client (`gpa_ray.client`) against the retriever API served on loopback: its
answers equal the in-process search, 4xx answers become `ApiError`s naming the status and
the server's code and message, 503s (from a throttling proxy in front) are retried with
backoff, and an endpoint that is not there is named."""

from __future__ import annotations

import json

import pytest

from gpa_ray import GPA
from gpa_ray.cli import main
from gpa_ray.client import ApiError, ConnectionFailed, RetrieverClient, Retry
from gpa_ray.testing.faulty_proxy import faulty_proxy
from gpa_ray.testing.services import free_loopback_ports


@pytest.fixture(scope="module")
def client(local_server) -> RetrieverClient:
    return RetrieverClient(local_server[0], timeout_s=30)


def test_searches_equal_the_in_process_search(client: RetrieverClient, served_index: dict) -> None:
    model = GPA.from_index(
        served_index["index_uri"], device="cpu", storage_cfg=served_index["storage"]
    )
    clips = served_index["clips"]
    query = clips[3]["captions"][0]
    answer = client.search_text(query, k=3)
    expected = model.search(query, served_index["index_uri"], k=3)
    assert [r["clip_id"] for r in answer["results"]] == [r["clip_id"] for r in expected]
    assert [r["score"] for r in answer["results"]] == pytest.approx(
        [r["score"] for r in expected], abs=1e-5
    )
    assert answer["index_version"] == client.health()["index_version"]
    assert sum(client.stats()["text"].values()) >= 1  # the query's text-encoder batch
    (batched,) = client.search_texts([query], k=3)
    assert batched["results"] == answer["results"]
    label = clips[0]["labels"][0]
    only = client.search_text(query, k=3, filter={"labels": [label]})["results"]
    assert only and all(label in r["labels"] for r in only)
    heard = client.search_audio(clips[3]["audio"], k=2, bias=False)
    by_api = model.search_audio(clips[3]["audio"], served_index["index_uri"], k=2, use_bias=False)
    assert [r["text_id"] for r in heard["results"]] == [r["text_id"] for r in by_api]
    assert heard["bias_applied"] is False
    record = client.clip(clips[3]["clip_id"])
    assert record["clip_id"] == clips[3]["clip_id"] and record["captions"] == clips[3]["captions"]


def test_a_4xx_is_an_error_naming_status_code_and_message(client: RetrieverClient) -> None:
    with pytest.raises(ApiError) as exc:
        client.search_text("a dog", k=0)
    assert (exc.value.status, exc.value.code) == (422, "invalid_k")
    assert "k must be between 1 and 50, got 0" in exc.value.message
    assert str(exc.value).startswith("POST http://127.0.0.1:")
    assert "/v1/search/text -> HTTP 422 invalid_k: k must be between 1 and 50" in str(exc.value)
    with pytest.raises(ApiError) as exc:
        client.clip("esc50/no-such-clip")
    assert (exc.value.status, exc.value.code) == (404, "unknown_clip")
    assert "no clip with id 'esc50/no-such-clip'" in exc.value.message
    with pytest.raises(ApiError) as exc:
        client.search_audio(b"this is not audio", k=2)
    assert exc.value.status == 422 and "not audio" in exc.value.message


def test_503s_are_retried_with_backoff(client: RetrieverClient) -> None:
    waits: list[float] = []
    expected = client.search_text("a dog barks", k=2)
    with faulty_proxy(client.base_url, slow_down=0.5, reset=0.0, seed=3) as proxy:
        throttled = RetrieverClient(
            proxy.endpoint, timeout_s=30, retry=Retry(attempts=8), sleep=waits.append
        )
        for _ in range(6):
            answer = throttled.search_text("a dog barks", k=2)
            assert answer["results"] == expected["results"]
        assert proxy.counts.slow_down > 0  # the faults happened, and were absorbed
        assert len(waits) == proxy.counts.slow_down
        assert all(0.25 <= w <= 4.0 for w in waits)
    with faulty_proxy(client.base_url, slow_down=1.0, reset=0.0) as proxy:
        waits.clear()
        always = RetrieverClient(
            proxy.endpoint, timeout_s=30, retry=Retry(attempts=3, backoff_s=0.5), sleep=waits.append
        )
        with pytest.raises(ApiError) as exc:
            always.search_text("a dog barks")
        assert exc.value.status == 503 and "after 3 attempts" in exc.value.message
        assert waits == [0.5, 1.0] and proxy.counts.slow_down == 3


def test_an_endpoint_that_is_not_there_is_named() -> None:
    (port,) = free_loopback_ports(1)
    waits: list[float] = []
    client = RetrieverClient(
        f"http://127.0.0.1:{port}", timeout_s=2, retry=Retry(attempts=2), sleep=waits.append
    )
    with pytest.raises(ConnectionFailed, match=rf"GET http://127.0.0.1:{port}/healthz: no answer"):
        client.health()
    assert waits == [0.25]
    with pytest.raises(ValueError, match="base_url must be http"):
        RetrieverClient("127.0.0.1:8000")


def test_the_search_command_queries_a_running_endpoint(
    client: RetrieverClient, served_index: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    query = served_index["clips"][2]["captions"][0]
    assert main(["search", query, "--url", client.base_url, "-k", "3", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == client.search_text(query, k=3)["results"]
    with pytest.raises(SystemExit) as exc:
        main(["search", query, "--url", client.base_url, "-k", "0"])
    assert exc.value.code == 2
    assert "-> HTTP 422 invalid_k: k must be between 1 and 50, got 0" in capsys.readouterr().err

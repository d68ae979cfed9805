"""End to end at the size of the shared ESC-50 subset (slow: minutes): all 414 clips
ingested, a `debug`-preset GPA checkpoint, the index built by the job, the retriever on
Ray Serve, and "a dog barking" answered exactly as the in-process search answers it."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
import torch

from gpa_ray.checkpoints import save_gpa
from gpa_ray.config_loading import load_config
from gpa_ray.data.ingest import run_ingest
from gpa_ray.models.factory import build_gpa
from gpa_ray.serve.retriever import SearchService, TextQueryEncoder, load_model
from gpa_ray.testing.jobs import job_main


@pytest.mark.slow
def test_esc50_subset_dog_query_on_serve_equals_in_process(
    ray_session, shared_data: Path, tmp_path: Path, serve_config
) -> None:
    from ray import serve

    ingest = tmp_path / "ingest"
    summary = run_ingest(
        load_config(
            "debug",
            [
                "corpus.kind=esc50",
                f"corpus.root={shared_data / 'esc50'}",
                f"ingest.output={ingest}",
            ],
        )
    )
    assert summary["clips_ok"] == 414
    checkpoint = str(tmp_path / "checkpoint")
    debug = load_config("debug")
    torch.manual_seed(0)
    save_gpa(build_gpa(debug), debug, checkpoint)
    index = tmp_path / "index"
    build_args = [
        "--config", "debug",
        f"index.input={ingest / 'clips'}",
        f"index.checkpoint={checkpoint}",
        f"index.output={index}",
    ]  # fmt: skip
    assert job_main("build_index")(build_args) == 0
    cfg = serve_config(f"serve.index_uri={index}")
    serve_args = [
        f"serve.index_uri={index}",
        "serve.host=127.0.0.1",
        f"serve.port={cfg.serve.port}",
        "serve.cpus_per_replica=0.25",
        "serve.reload_interval_s=0",
    ]
    assert job_main("serve_retriever")(serve_args, block=False) == 0
    try:
        url = f"http://127.0.0.1:{cfg.serve.port}"
        response = requests.post(f"{url}/v1/search/text", json={"query": "a dog barking", "k": 10})
        assert response.status_code == 200, response.text
        served = response.json()["results"]
        loaded = load_model(cfg, checkpoint)
        model, service = loaded.model, SearchService(cfg, loaded)
        local = service.search_text(TextQueryEncoder(model).encode(["a dog barking"])[0], 10)
        assert [r["clip_id"] for r in served] == [r["clip_id"] for r in local["results"]]
        for a, b in zip(served, local["results"], strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
        assert service.health()["clips"] == 414
    finally:
        serve.shutdown()

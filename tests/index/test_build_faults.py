"""The index build from S3 to S3 through a misbehaving proxy (503 SlowDown, connections
cut mid-body) equals an undisturbed build: every storage access is retried, nothing
transient is recorded as a failed clip."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpa_ray.config_loading import load_config
from gpa_ray.index import mapped
from gpa_ray.index.build import run_build_index
from gpa_ray.testing.faulty_proxy import faulty_proxy
from gpa_ray.testing.services import S3Server


def _build(pool: str, checkpoint: str, output: str, s3: S3Server, endpoint: str) -> dict:
    cfg = load_config(
        overrides=[
            *s3.overrides(),
            f"storage.endpoint_url={endpoint}",
            f"index.input={pool}",
            f"index.checkpoint={checkpoint}",
            f"index.output={output}",
            "index.version=v1",
            "index.embed_pool.actors=1",
            "index.embed_pool.batch_size=4",
        ]
    )
    return run_build_index(cfg)


def test_build_through_a_faulty_proxy_equals_an_undisturbed_build(
    ray_session, esc50_pool: str, lass_checkpoint: str, s3_server: S3Server, tmp_path: Path
) -> None:
    clean_uri = s3_server.uri("bias-eval", "index-clean")
    faulty_uri = s3_server.uri("bias-eval", "index-faulty")
    clean = _build(esc50_pool, lass_checkpoint, clean_uri, s3_server, s3_server.endpoint_url)
    with faulty_proxy(s3_server.endpoint_url, slow_down=0.1, reset=0.05, seed=6) as proxy:
        faulty = _build(esc50_pool, lass_checkpoint, faulty_uri, s3_server, proxy.endpoint)
    assert proxy.counts.total > 50 and proxy.counts.faulty_share >= 0.10, proxy.counts
    assert faulty["failed_clips"] == clean["failed_clips"] == 0
    assert (faulty["clips"], faulty["texts"]) == (clean["clips"], clean["texts"])
    assert clean["clips"] == 16
    (a,) = mapped.open_version(
        clean_uri, cache_dir=str(tmp_path / "a"), storage_cfg=s3_server.storage
    )
    (b,) = mapped.open_version(
        faulty_uri, cache_dir=str(tmp_path / "b"), storage_cfg=s3_server.storage
    )
    for side in ("clips", "texts"):
        one, two = getattr(a, side), getattr(b, side)
        assert one.ids.to_pylist() == two.ids.to_pylist()
        assert np.array_equal(one.global_, two.global_)
        assert np.array_equal(one.prototypes, two.prototypes)

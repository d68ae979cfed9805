"""cluster.yaml passes Ray's own cluster-config validation, and every shipped preset's
resource requests fit some worker node type (no cloud calls)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from gpa_ray.config_loading import load_config, preset_names
from gpa_ray.jobs_cli import RAY_PROCESS_ENV

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_is_valid_for_ray(cluster: dict) -> None:
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_cluster_yaml_has_no_credentials() -> None:
    text = CLUSTER_YAML.read_text().lower()
    for secret in ("aws_access_key_id", "aws_secret_access_key", "secret_key"):
        assert secret not in text


def _worker_types(cluster: dict) -> dict[str, dict[str, float]]:
    head = cluster["head_node_type"]
    return {
        name: node["resources"]
        for name, node in cluster["available_node_types"].items()
        if name != head
    }


def _fits(request: dict[str, float], nodes: dict[str, dict[str, float]]) -> bool:
    return any(
        all(resources.get(key, 0) >= amount for key, amount in request.items())
        for resources in nodes.values()
    )


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_fits_a_node_type(cluster: dict, preset: str) -> None:
    cfg = load_config(preset)
    nodes = _worker_types(cluster)
    train = {"CPU": cfg.train.cpus_per_worker, "GPU": 1.0 if cfg.train.use_gpu else 0.0}
    encoder = {
        "CPU": cfg.ingest.encode_pool.cpus_per_actor,
        "GPU": cfg.ingest.encode_pool.gpus_per_actor,
    }
    assert _fits(train, nodes), f"{preset}: no node type offers a train worker {train}"
    assert _fits(encoder, nodes), f"{preset}: no node type offers an encoder {encoder}"
    gpu_nodes = sum(
        cluster["available_node_types"][name]["max_workers"]
        for name, res in nodes.items()
        if res.get("GPU", 0) >= 1
    )
    if cfg.train.use_gpu:
        assert cfg.train.num_workers <= gpu_nodes, f"{preset}: more GPU workers than nodes"


def test_every_node_starts_ray_with_the_project_ray_environment(cluster: dict) -> None:
    """The cluster's Ray gets what a locally started one gets (`RAY_PROCESS_ENV`)."""
    for commands in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        exports = " ".join(f"{key}={value}" for key, value in RAY_PROCESS_ENV.items())
        assert f"export {exports} &&" in start

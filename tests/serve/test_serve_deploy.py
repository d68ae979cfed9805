"""`serve deploy gpa_ray/serve/serve_config.yaml`, the way an operator runs the retriever.

A real Ray head node (`ray start --head`, loopback only, stopped by PID afterwards) gets
the shipped Serve config through the `serve deploy` CLI, changed only where a user must
fill in their own values: the index URI (the test index on the S3 server, with its
credentials), the HTTP host and port, and CPUs that fit two cores. The app must come up,
answer `/healthz` and a text query with the same clips and scores as the in-process
search, and `serve shutdown` must take it down.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpa_ray.config_loading import load_config
from gpa_ray.serve.retriever import SearchService, TextQueryEncoder, load_model
from gpa_ray.testing.cluster import LocalRayCluster, local_ray_cluster
from gpa_ray.testing.services import free_loopback_ports

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "gpa_ray" / "serve" / "serve_config.yaml"
UP_TIMEOUT_S = 300


def deploy_config(served_index: dict, port: int) -> dict[str, Any]:
    """The shipped config with a user's values filled in for this machine."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config["proxy_location"] = "HeadOnly"
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    (app,) = config["applications"]
    app["args"]["overrides"] = [
        f"serve.index_uri={served_index['index_uri']}",
        "serve.reload_interval_s=0",
        *served_index["storage_args"],
    ]
    for deployment in app["deployments"]:
        deployment["ray_actor_options"]["num_cpus"] = 0.25
    return config


def serve_cli(cluster: LocalRayCluster, *args: str) -> str:
    command = [str(Path(cluster.ray_cli).with_name("serve")), *args]
    done = subprocess.run(
        command, env=cluster.env, capture_output=True, text=True, timeout=300, cwd=REPO
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{output}"
    return output


def wait_until_up(url: str, cluster: LocalRayCluster) -> dict[str, Any]:
    deadline = time.monotonic() + UP_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:
                if response.status == 200:
                    return json.load(response)
        except (OSError, urllib.error.HTTPError):
            pass
        if time.monotonic() > deadline:
            status = serve_cli(cluster, "status", "--address", cluster.dashboard_url)
            raise TimeoutError(f"the deployed retriever did not answer {url}/healthz:\n{status}")
        time.sleep(2.0)


def post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def test_serve_deploy_of_the_shipped_config(served_index: dict, tmp_path: Path) -> None:
    (port,) = free_loopback_ports(1)
    config = deploy_config(served_index, port)
    config_file = tmp_path / "serve_config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{port}"
    with local_ray_cluster() as cluster:
        serve_cli(cluster, "deploy", str(config_file), "--address", cluster.dashboard_url)
        health = wait_until_up(url, cluster)
        got = post_json(f"{url}/v1/search/text", {"query": "a dog barking", "k": 3})
        status = serve_cli(cluster, "status", "--address", cluster.dashboard_url)
        serve_cli(cluster, "shutdown", "-y", "--address", cluster.dashboard_url)

    args = config["applications"][0]["args"]
    cfg = load_config(args["config"], args["overrides"])
    loaded = load_model(cfg, served_index["checkpoint"])
    model, service = loaded.model, SearchService(cfg, loaded)
    expected = service.search_text(TextQueryEncoder(model).encode(["a dog barking"])[0], 3)
    assert health["status"] == "ok" and health["clips"] == len(served_index["clips"])
    assert "RUNNING" in status and "gpa_retriever" in status
    assert [r["clip_id"] for r in got["results"]] == [r["clip_id"] for r in expected["results"]]
    assert [r["score"] for r in got["results"]] == pytest.approx(
        [r["score"] for r in expected["results"]], abs=1e-5
    )

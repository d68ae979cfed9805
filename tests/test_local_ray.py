"""An embedded local Ray stays on loopback and keeps to itself (`gpa_ray.local_ray`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from gpa_ray.local_ray import LocalRayPorts, inherited_address, pinned_env
from gpa_ray.testing.cluster import descendant_pids, listening_sockets

REPO = Path(__file__).resolve().parents[1]

#: A job's start of Ray (`init_ray` on the embedded default), then one task and one actor
#: so that workers run; prints what its Ray processes listen on and what they see.
LOCAL_JOB = """
import json, os, sys, time
import ray  # imported first, as every job does, before any Ray setting
from gpa_ray.jobs_cli import init_ray, parse_job_args
from gpa_ray.testing.cluster import descendant_pids, listening_sockets

cfg = parse_job_args(sys.argv[1:], "local job")
init_ray(cfg)
address = ray.get_runtime_context().gcs_address

@ray.remote(num_cpus=0.25)
def env_address():
    return os.environ.get("RAY_ADDRESS", "")

@ray.remote(num_cpus=0.25)
class Probe:
    def lookups(self, state_api):
        # What "the" Ray is to a process that names none: the address the state API and
        # the `ray` CLI resolve (where "Found multiple active Ray instances" is raised; the
        # Serve controller asks it), and the state API's answer (it needs the dashboard).
        from ray._private.services import canonicalize_bootstrap_address_or_die
        from ray.util.state import list_nodes

        nodes = [n.node_ip for n in list_nodes()] if state_api else None
        return {"bootstrap": canonicalize_bootstrap_address_or_die(None), "nodes": nodes}

probe = Probe.remote()
seen = {"task": ray.get(env_address.remote()),
        "actor": ray.get(probe.lookups.remote(cfg.ray.include_dashboard))}
time.sleep(3)  # the agents' and the dashboard's servers come up after ray.init returns
pids = [os.getpid(), *descendant_pids(os.getpid())]
print(json.dumps({"address": address, "seen": seen, "sockets": listening_sockets(pids),
                  "node_ip": ray.util.get_node_ip_address()}), flush=True)
sys.stdin.readline()  # holds its Ray up until the test has used its own beside it
assert ray.get(env_address.remote()) == address
ray.shutdown()
"""

UNPINNED_LOOKUP = (
    "import json\n"
    "from ray._private.services import find_gcs_addresses\n"
    "print(json.dumps(sorted(find_gcs_addresses())))\n"
)
"""The Ray instances a process that pins none chooses among (each raylet in `ps`)."""

#: What a shell that never started a Ray has not set (the pins of `gpa_ray.local_ray`).
PINNED_KEYS = set(pinned_env("127.0.0.1", LocalRayPorts(0, 0, 0, 0, 0)))


@contextmanager
def local_job(*overrides: str, timeout: float = 240) -> Iterator[dict]:
    """Run `LOCAL_JOB` in a fresh Python as a job started from a shell (no `RAY_ADDRESS`,
    no Ray setting of ours); yield what it printed while its Ray is still up."""
    env = {k: v for k, v in os.environ.items() if k not in PINNED_KEYS}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))
    job = subprocess.Popen(
        [sys.executable, "-c", LOCAL_JOB, "ray.num_cpus=1", *overrides],
        env=env,
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for line in job.stdout:
            lines.append(line)
            if line.startswith("{"):
                break
        assert lines and lines[-1].startswith("{"), "".join(lines[-60:])
        yield json.loads(lines[-1])
        job.stdin.close()
        rest = job.stdout.read()
        assert job.wait(timeout) == 0, rest[-4000:]
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()


def test_pinned_env_names_the_ray_and_its_ports() -> None:
    ports = LocalRayPorts(
        gcs=1001,
        metrics_export=1002,
        dashboard=1003,
        autoscaler_metrics=1004,
        dashboard_metrics=1005,
    )
    assert pinned_env("127.0.0.1", ports) == {
        "RAY_ADDRESS": "127.0.0.1:1001",
        "RAY_GCS_SERVER_PORT": "1001",
        "AUTOSCALER_METRIC_PORT": "1004",
        "DASHBOARD_METRIC_PORT": "1005",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    # Another interface: Ray's own resolution of the node address stays as it is.
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in pinned_env("10.0.0.5", ports)


@pytest.mark.slow
def test_a_local_jobs_ray_processes_listen_on_loopback_only() -> None:
    with local_job("ray.include_dashboard=true") as out:
        pass
    host, port = out["address"].rsplit(":", 1)
    assert host == "127.0.0.1" and out["node_ip"] == "127.0.0.1"
    sockets = out["sockets"]
    pids = {pid for _, _, pid in sockets}
    # The GCS, the raylet, the agents, the dashboard, the workers and the driver: many
    # processes, each on loopback (Ray's defaults put most on 0.0.0.0 or the external IP).
    assert len(pids) >= 5, sockets
    assert any(p == int(port) for _, p, _ in sockets), sockets
    assert {ip for ip, _, _ in sockets} == {"127.0.0.1"}, sockets
    # A worker inherits the job's own address, and the state API it asks finds that Ray.
    actor = {"bootstrap": out["address"], "nodes": ["127.0.0.1"]}
    assert out["seen"] == {"task": out["address"], "actor": actor}


@pytest.mark.slow
def test_a_second_local_ray_runs_beside_the_sessions(ray_session) -> None:
    import ray

    session = ray.get_runtime_context().gcs_address
    assert os.environ["RAY_ADDRESS"] == session  # pinned by the session's own start
    assert inherited_address() == ""  # its own pin is not a cluster to join once shut down
    from ray._private.services import canonicalize_bootstrap_address_or_die

    @ray.remote(num_cpus=0.25)
    def lookups() -> tuple[str, str]:
        return os.environ.get("RAY_ADDRESS", ""), canonicalize_bootstrap_address_or_die(None)

    with local_job() as other:
        # Its worker and actor found its own Ray with the session's up...
        assert other["address"] != session
        actor = {"bootstrap": other["address"], "nodes": None}
        assert other["seen"] == {"task": other["address"], "actor": actor}
        # ...and with the other one up, the session's do too (the job then runs a task).
        assert ray.get(lookups.remote()) == (session, session)
        assert canonicalize_bootstrap_address_or_die(None) == session
        own = [os.getpid(), *descendant_pids(os.getpid())]
        assert {ip for ip, _, _ in listening_sockets(own)} == {"127.0.0.1"}
        # The control: a process that pins nothing sees both (and raises "Found multiple
        # active Ray instances" where it has to pick one).
        unpinned = {k: v for k, v in os.environ.items() if k not in PINNED_KEYS}
        done = subprocess.run(
            [sys.executable, "-c", UNPINNED_LOOKUP],
            env=unpinned,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        assert {session, other["address"]} <= set(json.loads(done.stdout)), done.stdout

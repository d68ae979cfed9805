"""The embedded local Ray: bound to loopback, on ports of its own, found only by its own
processes.

A job on the embedded default and a test session on one machine each start a Ray. Left to
its defaults, Ray 2.60 binds such a Ray to the machine's external interface (it resolves
"127.0.0.1" to the routable address), reuses fixed ports (dashboard 8265, autoscaler and
dashboard metrics 44217 / 44227), and lets any process that asks the state API without an
address pick among every Ray it sees in `ps` ("Found multiple active Ray instances"; the
Serve controller does so). Here every process that starts a local Ray pins its own:

- the node address (`ray.node_ip_address`, loopback by default) for every Ray process;
- a free GCS, metrics-export, dashboard and metrics port each;
- `RAY_ADDRESS` = this Ray's GCS in the environment its processes inherit (raylet, GCS,
  agents, every worker and actor) and in this process, so anything that looks for "the"
  Ray finds this one.

Ray offers no `ray.init` argument for the dashboard agent's HTTP port (52365) or for the
resolution of a loopback node address: the first stays fixed (on loopback; a second local
Ray's agent serves no HTTP), the second is Ray's `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`
switch, read when `ray` is first imported, so it is also turned off for the duration of
`ray.init` in this process.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

LOOPBACK = "127.0.0.1"

#: Ray's switch for a node address other than loopback (Ray names it after the platforms
#: where it is off by default); "0" makes every Ray process resolve "localhost" to loopback.
ENABLE_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

_pinned_address = ""
"""The `RAY_ADDRESS` this process set for the last local Ray it started (see
`inherited_address`)."""


def free_loopback_ports(n: int) -> list[int]:
    """`n` distinct TCP ports that were free on 127.0.0.1 a moment ago (all held at once
    while asking, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass(frozen=True)
class LocalRayPorts:
    """The ports a local Ray would otherwise take at random or share with another Ray."""

    gcs: int
    metrics_export: int
    """Prometheus text of every metric on the node, `ray.util.metrics` included."""
    dashboard: int
    autoscaler_metrics: int
    dashboard_metrics: int

    @classmethod
    def free(cls) -> LocalRayPorts:
        return cls(*free_loopback_ports(5))


def pinned_env(host: str, ports: LocalRayPorts) -> dict[str, str]:
    """Environment of every process of a local Ray on `host`: its own address and the
    ports that Ray's processes read from the environment (not from `ray.init`)."""
    env = {
        "RAY_ADDRESS": f"{host}:{ports.gcs}",
        "RAY_GCS_SERVER_PORT": str(ports.gcs),
        "AUTOSCALER_METRIC_PORT": str(ports.autoscaler_metrics),
        "DASHBOARD_METRIC_PORT": str(ports.dashboard_metrics),
    }
    if host == LOOPBACK:
        env[ENABLE_CLUSTER_ENV] = "0"
    return env


def inherited_address() -> str:
    """`RAY_ADDRESS` from the environment, unless it is the pin of a local Ray this process
    started itself (gone once that Ray is shut down, so not a cluster to join)."""
    address = os.environ.get("RAY_ADDRESS", "")
    return "" if address and address == _pinned_address else address


@contextmanager
def _environment(updates: dict[str, str]) -> Iterator[None]:
    """`updates` in `os.environ` for the block (the processes it starts inherit them)."""
    before = {key: os.environ.get(key) for key in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def _loopback_resolution(on: bool) -> Iterator[None]:
    """Make this process's Ray keep a loopback node address as given (Ray read
    `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` when it was imported, maybe before it was set)."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    if on:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def start_local_ray(host: str = LOOPBACK, **init_kwargs: Any) -> str:
    """Start an embedded Ray on `host` with its own ports and address pinned, and return
    its GCS address (a no-op returning the current one if Ray is already up).

    `init_kwargs` go to `ray.init` (`num_cpus`, `object_store_memory`, `include_dashboard`,
    `log_to_driver`...). The environment stays as it was but for `RAY_ADDRESS`, which
    names the new Ray from then on.
    """
    global _pinned_address
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    ports = LocalRayPorts.free()
    env = pinned_env(host, ports)
    with _environment(env), _loopback_resolution(host == LOOPBACK):
        context = ray.init(
            address="local",
            _node_ip_address=host,
            _metrics_export_port=ports.metrics_export,
            dashboard_host=host,
            dashboard_port=ports.dashboard,
            **init_kwargs,
        )
    address = context.address_info["gcs_address"]
    os.environ["RAY_ADDRESS"] = _pinned_address = address
    return address

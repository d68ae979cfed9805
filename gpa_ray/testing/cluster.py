"""A real `ray start --head` cluster on loopback, and the processes it started.

For the tests of the cluster path (`ray job submit`, Serve deployments) and for benchmarks
that measure the processes they start. Processes are found in /proc (Linux) and stopped
by PID only: nothing here runs `ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gpa_ray.credentials import export_storage_credentials
from gpa_ray.jobs_cli import set_ray_process_env
from gpa_ray.local_ray import LOOPBACK, LocalRayPorts, free_loopback_ports, pinned_env
from gpa_ray.testing.services import TEST_S3_STORAGE

RAY_CLI = str(Path(sys.executable).parent / "ray")
"""The `ray` command of the running Python environment."""
RAY_PORT_FLAGS = (
    "port",
    "dashboard-port",
    "node-manager-port",
    "object-manager-port",
    "ray-client-server-port",
    "dashboard-agent-grpc-port",
    "dashboard-agent-listen-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)
"""Every port option of `ray start --head`: each is given a free loopback port."""


@dataclass(frozen=True)
class LocalRayCluster:
    """A running `ray start --head` cluster on loopback and how to reach it."""

    pid: int
    gcs_address: str
    """`127.0.0.1:<port>`: what `RAY_ADDRESS` / `ray.init(address=...)` take."""
    dashboard_url: str
    """`http://127.0.0.1:<port>`: what `ray job submit --address` takes."""
    temp_dir: str
    env: dict[str, str]
    """Environment for CLI calls against the cluster (same auth and interface settings)."""

    @property
    def ray_cli(self) -> str:
        """The `ray` command of the running Python environment."""
        return RAY_CLI


def descendant_pids(pid: int) -> list[int]:
    """PIDs of every live process below `pid` (read from /proc; Linux), so tests and
    benchmarks can measure or clean up exactly the processes they started."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def listening_sockets(pids: list[int]) -> list[tuple[str, int, int]]:
    """Every TCP socket in LISTEN state that one of `pids` holds, as (address, port, pid),
    read from /proc/net/tcp{,6} and the processes' /proc/<pid>/fd (Linux). An IPv4-mapped
    IPv6 address (`::ffff:127.0.0.1`) is given as its IPv4 address."""
    owner: dict[str, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        owner[target[len("socket:[") : -1]] = pid
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in owner:  # 0A: TCP_LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            # The kernel prints each 32-bit word of the address in host (little-endian) order.
            raw = b"".join(bytes.fromhex(hex_ip[i : i + 8])[::-1] for i in range(0, len(hex_ip), 8))
            ip = ipaddress.ip_address(raw)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            found.append((str(ip), int(hex_port, 16), owner[fields[9]]))
    return sorted(found)


def cluster_processes(temp_dir: str, root_pid: int | None = None) -> dict[int, str]:
    """Live processes of the cluster rooted at `temp_dir`, as {pid: start time}: Ray's
    node processes and workers name the session folder on their command line, job
    drivers run in a working directory under it, and all of them (with the dashboard's
    and client server's helpers, which do neither) descend from `root_pid` while it
    lives. The start time (`/proc/<pid>/stat` field 22) tells a reused PID apart."""
    marker = temp_dir.rstrip("/") + "/"
    stats: dict[int, tuple[int, str]] = {}
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            stats[int(entry.name)] = (int(fields[1]), fields[19])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
            cwd = os.readlink(entry / "cwd") + "/"
        except (OSError, IndexError):
            continue
        if marker in cmdline or cwd.startswith(marker):
            found[int(entry.name)] = fields[19]
    if root_pid is not None:
        for pid, (_, start) in stats.items():
            ancestor = pid
            while ancestor in stats and ancestor != root_pid:
                ancestor = stats[ancestor][0]
            if ancestor == root_pid and pid != root_pid:
                found[pid] = start
    return found


def _still_running(processes: dict[int, str], temp_dir: str) -> list[int]:
    """PIDs among `processes` that still run (same start time), plus any process that has
    appeared under `temp_dir` since."""
    now = cluster_processes(temp_dir)
    alive = []
    for pid, start in processes.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[19] == start and fields[0] != "Z":
            alive.append(pid)
    return sorted(set(alive) | set(now))


def cluster_env() -> dict[str, str]:
    """This process's environment without `RAY_ADDRESS`, with token auth, usage stats and
    the drain wait off, plus the project's Ray process environment and (unless set) the
    test S3 server's credentials: what the head node, so every worker, and CLI calls
    against it run with (a cluster's workers take credentials from their environment)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if "AWS_ACCESS_KEY_ID" not in env:
        export_storage_credentials(TEST_S3_STORAGE, env)
    env.update(
        RAY_AUTH_MODE="disabled",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
    )
    set_ray_process_env(env)
    return env


def ray_start_command(ports: dict[str, int], num_cpus: int, temp_dir: str) -> list[str]:
    """`ray start --head --block` on 127.0.0.1 with the dashboard (job submission needs it),
    the given port of every option in `RAY_PORT_FLAGS`, any free worker ports, and
    `temp_dir` as its session folder."""
    return [
        RAY_CLI,
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--object-store-memory={512 * 1024 * 1024}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        *[f"--{flag}={ports[flag]}" for flag in RAY_PORT_FLAGS],
        "--min-worker-port=0",
        "--max-worker-port=0",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]


def _log_tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-4000:]


def _wait_for_jobs_api(
    proc: subprocess.Popen[bytes], dashboard_url: str, log_path: Path, timeout: float
) -> None:
    """Poll the Jobs API until it answers; fail early if `ray start` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{_log_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{dashboard_url}/api/jobs/", timeout=10):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Ray Jobs API not up after {timeout} s:\n{_log_tail(log_path)}"
                ) from None
            time.sleep(1.0)


def _stop_cluster(
    proc: subprocess.Popen[bytes], temp_dir: str, log_path: Path, timeout: float
) -> None:
    """SIGTERM to `ray start` (SIGKILL after `timeout`), which stops what it started; then
    kill by PID whatever of the cluster still runs after `timeout`, remove `temp_dir`, and
    raise if anything had to be killed."""
    started = cluster_processes(temp_dir, proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + timeout
    left = _still_running(started, temp_dir)
    while left and time.monotonic() < deadline:
        time.sleep(1.0)
        left = _still_running(started, temp_dir)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    tail = _log_tail(log_path)
    shutil.rmtree(temp_dir, ignore_errors=True)
    if left:
        raise RuntimeError(f"processes of the test Ray cluster outlived it: {left}\n{tail}")


@contextmanager
def local_ray_cluster(
    num_cpus: int = 2, start_timeout: float = 300.0, stop_timeout: float = 60.0
) -> Iterator[LocalRayCluster]:
    """Run a real Ray head node (with the dashboard, so job submission works) on 127.0.0.1.

    `ray start --head --block` runs as one child process with every port chosen free on
    loopback and its own short temp dir (Unix socket paths must stay under 108 bytes, so
    not under pytest's tmp path); token auth is off for it and for `env`. Yields once the
    Jobs API answers. On exit the `ray start` process is sent SIGTERM (SIGKILL after
    `stop_timeout`), which stops everything it started; then no process of this cluster
    may remain: leftovers are killed by PID and reported as an error.
    """
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    *chosen, autoscaler_metrics, dashboard_metrics = free_loopback_ports(len(RAY_PORT_FLAGS) + 2)
    ports = dict(zip(RAY_PORT_FLAGS, chosen, strict=True))
    env = cluster_env()
    # The head's processes (and the jobs' drivers and workers) name this cluster as theirs
    # and take metrics ports of their own, as an embedded local Ray does.
    pinned = LocalRayPorts(
        gcs=ports["port"],
        metrics_export=ports["metrics-export-port"],
        dashboard=ports["dashboard-port"],
        autoscaler_metrics=autoscaler_metrics,
        dashboard_metrics=dashboard_metrics,
    )
    log_path = Path(temp_dir) / "ray_start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ray_start_command(ports, num_cpus, temp_dir),
            env={**env, **pinned_env(LOOPBACK, pinned)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    cluster = LocalRayCluster(
        pid=proc.pid,
        gcs_address=f"127.0.0.1:{ports['port']}",
        dashboard_url=f"http://127.0.0.1:{ports['dashboard-port']}",
        temp_dir=temp_dir,
        env=env,
    )
    try:
        _wait_for_jobs_api(proc, cluster.dashboard_url, log_path, start_timeout)
        yield cluster
    finally:
        _stop_cluster(proc, temp_dir, log_path, stop_timeout)

"""The test helpers themselves (`gpa_ray.testing`): paths, free ports, `ray start`'s
command line and the process tracking that cleans up after a local cluster."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

import gpa_ray
from gpa_ray.testing.cluster import (
    RAY_CLI,
    RAY_PORT_FLAGS,
    cluster_processes,
    descendant_pids,
    ray_start_command,
)
from gpa_ray.testing.data import SHARED_DATA_ENV, shared_data_dir
from gpa_ray.testing.jobs import JOBS_DIR
from gpa_ray.testing.services import free_loopback_ports

REPO = Path(gpa_ray.__file__).resolve().parents[1]


def test_paths_are_found_from_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SHARED_DATA_ENV, raising=False)
    assert shared_data_dir() == REPO.parent / "shared" / "data"
    monkeypatch.setenv(SHARED_DATA_ENV, "/elsewhere")
    assert shared_data_dir() == Path("/elsewhere")
    assert JOBS_DIR == REPO / "jobs" and (JOBS_DIR / "quickstart.py").is_file()


def test_free_loopback_ports_differ_and_can_be_bound() -> None:
    ports = free_loopback_ports(4)
    assert len(set(ports)) == 4
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_ray_start_command_gives_every_port_option_its_port() -> None:
    ports = {flag: 20000 + i for i, flag in enumerate(RAY_PORT_FLAGS)}
    command = ray_start_command(ports, num_cpus=2, temp_dir="/tmp/rayX")
    assert command[:4] == [RAY_CLI, "start", "--head", "--block"]
    for flag, port in ports.items():
        assert [a for a in command if a.startswith(f"--{flag}=")] == [f"--{flag}={port}"]
    assert "--temp-dir=/tmp/rayX" in command and "--num-cpus=2" in command


def test_processes_are_found_by_folder_and_by_ancestry(tmp_path: Path) -> None:
    """A shell started in `tmp_path` and the `sleep` it starts: both are this process's
    descendants and both work in the folder; from the shell as root, only the `sleep`."""
    shell = subprocess.Popen(["sh", "-c", "sleep 60 & wait"], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 10
        while not descendant_pids(shell.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        (sleeper,) = descendant_pids(shell.pid)
        assert {shell.pid, sleeper} <= set(descendant_pids(os.getpid()))
        assert set(cluster_processes(str(tmp_path))) == {shell.pid, sleeper}
        assert set(cluster_processes(str(tmp_path / "other"), root_pid=shell.pid)) == {sleeper}
    finally:
        for pid in descendant_pids(shell.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shell.kill()
        shell.wait()

"""The shared job command line: presets, dotted overrides, and joining Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpa_ray.jobs_cli import init_ray, parse_job_args, ray_address
from gpa_ray.testing.jobs import job_main

REPO = Path(__file__).resolve().parents[1]


def test_preset_name_set_and_positional_overrides() -> None:
    cfg = parse_job_args(
        [
            "--config",
            "debug",
            "--set",
            "ingest.encode_pool.actors=3",
            "corpus.kind=esc50",
            "codec.bandwidth=6",
        ],
        "test",
    )
    assert cfg.ingest.encode_pool.actors == 3  # --set beats the preset (which says 2)
    assert cfg.ingest.rows_per_commit == 16  # from the debug preset
    assert cfg.corpus.kind == "esc50"
    assert cfg.codec.bandwidth == 6.0


def test_preset_by_path_and_later_override_wins(tmp_path: Path) -> None:
    preset = tmp_path / "mine.yaml"
    preset.write_text("ingest:\n  output: /data/out\n  encode_pool:\n    batch_size: 2\n")
    cfg = parse_job_args(
        [
            "--config",
            str(preset),
            "--set",
            "ingest.encode_pool.batch_size=5",
            "ingest.encode_pool.batch_size=7",
        ],
        "test",
    )
    assert cfg.ingest.output == "/data/out"
    assert cfg.ingest.encode_pool.batch_size == 7


def test_bad_arguments_exit_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_job_args(["ingest.outptu=/x"], "test")
    assert exc.value.code == 2
    assert "did you mean 'ingest.output'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_job_args(["--config", "no_such_preset"], "test")
    assert "shipped presets are" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_job_args(["ingest.encode_pool.actors=two"], "test")
    assert "expects int" in capsys.readouterr().err


def test_ray_address_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(parse_job_args([], "t")) == "local"
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert ray_address(parse_job_args([], "t")) == "ray://head:10001"
    assert ray_address(parse_job_args(["ray.address=auto"], "t")) == "auto"


def test_init_ray_is_a_no_op_inside_a_running_ray(ray_session) -> None:
    import ray

    before = ray.get_runtime_context().get_node_id()
    init_ray(parse_job_args(["ray.num_cpus=1", "ray.address=local"], "t"))
    assert ray.is_initialized()
    assert ray.get_runtime_context().get_node_id() == before


def test_init_ray_starts_a_local_ray_with_the_configured_resources() -> None:
    script = (
        "import json, ray\n"
        "from gpa_ray.jobs_cli import init_ray, parse_job_args\n"
        "init_ray(parse_job_args(['ray.num_cpus=1', 'ray.object_store_memory_mb=96'], 't'))\n"
        "print(json.dumps(ray.cluster_resources()))\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    resources = json.loads(done.stdout.strip().splitlines()[-1])
    assert resources["CPU"] == 1.0
    assert resources["object_store_memory"] == pytest.approx(96 * 1024 * 1024, rel=0.01)


@pytest.mark.parametrize("job", sorted(p.stem for p in (REPO / "jobs").glob("*.py")))
def test_every_job_has_help_listing_presets_and_keys(job: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        job_main(job)(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "presets (--config NAME):" in out and "debug" in out
    assert "train: lr, epochs" in out


def test_ray_process_env_adds_defaults_and_keeps_what_the_user_set() -> None:
    from gpa_ray.jobs_cli import RAY_PROCESS_ENV, set_ray_process_env

    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "OTHER": "x"}
    set_ray_process_env(env)
    assert env == {**RAY_PROCESS_ENV, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "OTHER": "x"}
    empty: dict[str, str] = {}
    set_ray_process_env(empty)
    assert empty == RAY_PROCESS_ENV

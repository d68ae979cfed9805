"""Runs and checkpoints: their layout, which checkpoint a URI means, and saving/loading them.

A run is the folder `<train.storage_path>/<train.name>/` (local or s3://):

    <run>/checkpoint_*/   the checkpoints Ray Train uploaded (`gpa_ray.train.worker` writes them)
    <run>/config.yaml     the run's resolved config (`gpa_ray.train.trainer.fit`)
    <run>/summary.json    GPA runs (`gpa_ray.train.gpa_loop.train_gpa`): the run's
                          `best_checkpoint` (by `gpa_ray.train.trainer.checkpoint_metric`)
                          and `checkpoint` (its latest), as URIs

A checkpoint is a directory that rebuilds its model by itself:

    model.pt      the unwrapped model's state dict (CPU tensors, loaded weights_only)
    config.yaml   the resolved config of the run that wrote it
    optimizer.pt  optimizer and LR-scheduler state (training checkpoints; only to resume)
    state.json    task, epoch, global step, metrics history, resume log and the task's own
                  facts, e.g. a label vocabulary (training checkpoints; `TrainLoop.state()`)

`save_gpa` writes only `model.pt` + `config.yaml`; every training checkpoint of a GPA run
has that layout too, so `gpa_ray.models.factory.load_gpa` (which rebuilds the model from
`config.yaml`, the factory's job, then loads `model.pt`) loads either. The AudioFormer
family loads here (`encoder_from_checkpoint`).

Which checkpoint a URI means is `resolve_checkpoint(uri, which)`: a checkpoint URI (one
holding `model.pt`) is itself; a run URI resolves to

- "latest": its `checkpoint_*` folder with the most optimizer steps (`state.json` step).
  Training uses it: `train.init_from`, an AudioFormer `audio_encoder.weights`, and the
  latest checkpoint a finished run reports (`latest_checkpoint`; Ray Train itself hands
  a resumed run's workers its latest).
- "best": `summary.json`'s `best_checkpoint`, else its `checkpoint`, else (no summary, or
  it names folders that are gone) the latest. GPA consumers use it: the bias job and
  evaluation resolve with it, and it is `factory.load_gpa`'s default (index build, Serve); the
  quickstart hands them its GPA run's best checkpoint (`TrainResult.best_checkpoint`).

Pure core: imports config, storage and the model classes only (not the factory, which
imports this module), never ray.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from typing import Any, Literal

import torch
import yaml

from gpa_ray import storage
from gpa_ray.config import AudioFormerConfig, Config, StorageConfig
from gpa_ray.config_loading import config_from_dict, config_to_yaml
from gpa_ray.models.audioformer import AudioFormerEncoder
from gpa_ray.models.gpa import GPAModel

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
RUN_SUMMARY_FILE = "summary.json"
CHECKPOINT_PREFIX = "checkpoint_"

Which = Literal["best", "latest"]

ARCHITECTURE_FIELDS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "intermediate_size",
    "max_positions",
)


class CheckpointError(FileNotFoundError):
    """No usable checkpoint at a URI, or one its config does not describe (the message
    names the URI)."""


@dataclasses.dataclass
class TrainState:
    """Progress of a run: completed epochs, optimizer steps taken, one record per epoch,
    and the global step of every restore from a checkpoint (the resume log)."""

    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    resumes: list[int] = dataclasses.field(default_factory=list)


def save_train_checkpoint(
    directory: str,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    train_state: TrainState,
    task: str,
    loop_state: dict[str, Any],
    cfg: Config,
) -> None:
    """Write a training checkpoint into a local directory (which Ray Train then persists)."""
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


def load_train_checkpoint(
    directory: str,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], TrainState]:
    """(model state, optimizer state, train state) of a local training checkpoint: what a
    worker restores (Ray Train hands it the checkpoint as a local directory)."""
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
    """The `checkpoint_*` folder of a run with the most optimizer steps, or None."""
    latest: tuple[int, str] | None = None
    for uri in storage.list_files(run_uri, STATE_FILE, storage_cfg):
        directory = uri[: -len(STATE_FILE)].rstrip("/")
        if not directory.rsplit("/", 1)[-1].startswith(CHECKPOINT_PREFIX):
            continue
        step = int(json.loads(storage.read_bytes(uri, storage_cfg))["step"])
        if latest is None or step > latest[0]:
            latest = (step, directory)
    return None if latest is None else latest[1]


def _best_checkpoint(run_uri: str, storage_cfg: StorageConfig | None) -> str | None:
    """The checkpoint `summary.json` names (best, else latest), else the run's latest."""
    summary_uri = storage.join(run_uri, RUN_SUMMARY_FILE)
    if storage.exists(summary_uri, storage_cfg):
        summary: dict[str, Any] = json.loads(storage.read_bytes(summary_uri, storage_cfg))
        for key in ("best_checkpoint", "checkpoint"):
            found = summary.get(key)
            if found and storage.exists(storage.join(found, MODEL_FILE), storage_cfg):
                return str(found).rstrip("/")
    return latest_checkpoint(run_uri, storage_cfg)


def resolve_checkpoint(uri: str, which: Which, storage_cfg: StorageConfig | None = None) -> str:
    """A checkpoint URI as given; a run URI -> its `which` checkpoint (see the module doc).

    Raises `CheckpointError` naming `uri` when it is neither, or cannot be read.
    """
    finders = {"best": _best_checkpoint, "latest": latest_checkpoint}
    if which not in finders:
        raise ValueError(f"which must be 'best' or 'latest', not {which!r}")
    uri = uri.rstrip("/")
    try:
        if storage.exists(storage.join(uri, MODEL_FILE), storage_cfg):
            return uri
        found = finders[which](uri, storage_cfg)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {uri}: {exc}") from exc
    if found is None:
        run_files = f"{RUN_SUMMARY_FILE} or " if which == "best" else ""
        raise CheckpointError(
            f"no checkpoint at {uri}: expected {MODEL_FILE} there, or a training run "
            f"directory with {run_files}{CHECKPOINT_PREFIX}* folders"
        )
    return found


def weights_digest(checkpoint: str, storage_cfg: StorageConfig | None = None) -> str:
    """SHA-256 of a checkpoint's `model.pt` (streamed, never held whole): its identity,
    whatever URI reaches it and whatever later training does to its run. Equals the
    digest `read_weights` returns with the state."""
    return storage.sha256_digest(storage.join(checkpoint, MODEL_FILE), storage_cfg)


def write_run_summary(
    run_uri: str, summary: dict[str, Any], storage_cfg: StorageConfig | None = None
) -> None:
    """Write `<run>/summary.json`, whose `best_checkpoint` and `checkpoint` "best" follows."""
    text = json.dumps(summary, indent=2, default=str)
    storage.write_bytes(storage.join(run_uri, RUN_SUMMARY_FILE), text.encode(), storage_cfg)


def read_state(checkpoint: str, storage_cfg: StorageConfig | None = None) -> dict[str, Any]:
    """`state.json` of a training checkpoint (a checkpoint URI: resolve a run's first)."""
    return json.loads(storage.read_bytes(storage.join(checkpoint, STATE_FILE), storage_cfg))


def read_config(checkpoint: str, storage_cfg: StorageConfig | None = None) -> Config:
    """The resolved config stored in a checkpoint (a checkpoint URI: a run folder holds a
    `config.yaml` too, so resolve a run's first)."""
    text = storage.read_bytes(storage.join(checkpoint, CONFIG_FILE), storage_cfg).decode()
    return config_from_dict(yaml.safe_load(text) or {})


def read_weights(
    checkpoint: str, storage_cfg: StorageConfig | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, SHA-256 of `model.pt`) of a checkpoint URI from one read: the digest
    names exactly the bytes the state was loaded from."""
    data = storage.read_bytes(storage.join(checkpoint, MODEL_FILE), storage_cfg)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return state, hashlib.sha256(data).hexdigest()


def load_model_state(
    checkpoint: str, storage_cfg: StorageConfig | None = None
) -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint (a checkpoint URI: resolve a run's first)."""
    return read_weights(checkpoint, storage_cfg)[0]


def sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix.` with the prefix removed (a submodule's state dict)."""
    head = prefix.rstrip(".") + "."
    out = {k[len(head) :]: v for k, v in state.items() if k.startswith(head)}
    if not out:
        raise CheckpointError(f"checkpoint has no weights under {prefix!r}")
    return out


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


def check_architecture(saved: AudioFormerConfig, wanted: AudioFormerConfig, uri: str) -> None:
    """Fail with the differing fields if a checkpoint's RoFormer differs from the config's."""
    diff = [
        f"{name}: checkpoint {getattr(saved, name)} vs config {getattr(wanted, name)}"
        for name in ARCHITECTURE_FIELDS
        if getattr(saved, name) != getattr(wanted, name)
    ]
    if diff:
        raise ValueError(f"{uri} holds a different AudioFormer ({'; '.join(diff)})")


def encoder_from_checkpoint(checkpoint: str, cfg: Config) -> AudioFormerEncoder:
    """The codebook-1 backbone of an MLM, FT1 or FT2 checkpoint (a checkpoint URI), e.g.
    as a GPA audio tower; its RoFormer must match `cfg.audioformer`."""
    task = read_state(checkpoint, cfg.storage)["task"]
    saved = read_config(checkpoint, cfg.storage).audioformer
    check_architecture(saved, cfg.audioformer, checkpoint)
    prefix = {
        "mlm": f"models.c{saved.codebooks[0]}.mlm.roformer",
        "ft1": "encoder.roformer",
        "ft2": "anchor.encoder.roformer",
    }
    if task not in prefix:
        raise ValueError(f"{checkpoint} is a {task!r} checkpoint, not an AudioFormer one")
    encoder = AudioFormerEncoder.from_config(saved)
    encoder.roformer.load_state_dict(
        sub_state(load_model_state(checkpoint, cfg.storage), prefix[task])
    )
    return encoder

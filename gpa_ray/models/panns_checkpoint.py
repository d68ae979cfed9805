"""Reading PANNs checkpoints safely and loading them strictly into the audio CNNs.

The published PANNs files (`Cnn14_mAP=0.431.pth`, `ResNet38_mAP=0.434.pth`, ...) are what
`audioset_tagging_cnn`'s training script saves: a dict holding the state dict under
`model` next to training bookkeeping, `iteration` (an int) and `sampler` (the balanced
sampler's state: lists of int64 numpy arrays and of ints). They are read with
`torch.load(weights_only=True)`: a checkpoint is data, never code. Unpickling the sampler
state needs numpy's array reconstruction and nothing else, so exactly those globals are
allowed (`CHECKPOINT_SAFE_GLOBALS`), under both the numpy 1 names the files were written
with and the numpy 2 names, and only for the duration of the load.

Loading is strict: the file's keys must be the architecture's keys, except the parts of a
PANNs model that GPA drops by design (`PANNS_ONLY_PREFIXES`: the waveform front end and
the two classifier layers). A file with any other difference (another network, another
width, a truncated file) raises `WeightsUnavailableError` naming the file and listing the
missing and unexpected keys: a run never starts from random weights after a warning.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gpa_ray.config import StorageConfig
from gpa_ray.pretrained import WeightsUnavailableError

log = logging.getLogger(__name__)

PANNS_ONLY_PREFIXES = ("spectrogram_extractor.", "logmel_extractor.", "fc1.", "fc_audioset.")
"""Keys of a PANNs checkpoint with no place in GPA's towers: the STFT/mel front end (log-mel
is computed by `gpa_ray.audio.features`) and `fc1` / `fc_audioset`, the last two linear
layers, which GPA section 2.2 discards."""

MAX_LISTED_KEYS = 25
"""How many missing / unexpected keys an error message lists (then `... and N more`)."""

_RECONSTRUCT = np._core.multiarray._reconstruct
CHECKPOINT_SAFE_GLOBALS: list[Any] = [
    (_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
    _RECONSTRUCT,
    np.ndarray,
    np.dtype,
    type(np.dtype(np.int64)),
]
"""What unpickling a published PANNs file needs beyond tensors and containers: numpy's
int64 array reconstruction (the sampler's per-class index arrays), named as numpy 1 wrote
it (`numpy.core...`, the published files) and as numpy 2 writes it (`numpy._core...`)."""


def read_state_dict(
    source: str | Mapping[str, Tensor], storage_cfg: StorageConfig | None = None
) -> dict[str, Tensor]:
    """The state dict of a mapping, or of a checkpoint file at a local path or URI.

    A published PANNs file's weights are its `model` entry; a plain state dict (as
    `torch.save(model.state_dict())` writes) is used as it is. Every failure (unreadable,
    not a torch file, a global outside `CHECKPOINT_SAFE_GLOBALS`, no state dict inside)
    raises `WeightsUnavailableError` naming the file.
    """
    if isinstance(source, Mapping):
        return _state_of(source, "<state dict>")
    from gpa_ray import storage

    try:
        data = storage.read_bytes(source, storage_cfg=storage_cfg)
    except OSError as exc:
        raise WeightsUnavailableError(f"weights file {source!r} cannot be read: {exc}") from exc
    try:
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types; all mean "not loadable"
        raise WeightsUnavailableError(
            f"weights file {source!r} cannot be loaded with weights_only=True "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    return _state_of(obj, repr(source))


def _state_of(obj: object, name: str) -> dict[str, Tensor]:
    """The state dict in a loaded object: its `model` entry when it has one."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        raise WeightsUnavailableError(
            f"weights file {name} does not hold a state dict (names -> tensors), "
            f"nor one under 'model' (got {type(obj).__name__})"
        )
    return dict(obj)


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    rest = len(keys) - MAX_LISTED_KEYS
    return f"[{shown}{f', ... and {rest} more' if rest > 0 else ''}]"


def load_panns_weights(
    model: nn.Module,
    source: str | Mapping[str, Tensor],
    storage_cfg: StorageConfig | None = None,
) -> list[str]:
    """Load PANNs-named weights into `model`, strictly; return the dropped PANNs-only keys.

    Raises `WeightsUnavailableError` (naming the file and listing the missing and
    unexpected keys) unless the file's keys, minus `PANNS_ONLY_PREFIXES`, are exactly the
    model's, and when a shape differs (e.g. another `width`).
    """
    name = source if isinstance(source, str) else "<state dict>"
    state = read_state_dict(source, storage_cfg)
    dropped = sorted(k for k in state if k.startswith(PANNS_ONLY_PREFIXES))
    kept = {k: v for k, v in state.items() if not k.startswith(PANNS_ONLY_PREFIXES)}
    expected = set(model.state_dict())
    missing = sorted(expected - kept.keys())
    unexpected = sorted(kept.keys() - expected)
    if missing or unexpected:
        raise WeightsUnavailableError(
            f"weights file {name!r} does not fit {type(model).__name__}: "
            f"{len(missing)} missing keys {_listed(missing)}, "
            f"{len(unexpected)} unexpected keys {_listed(unexpected)}"
        )
    own = model.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in kept.items()
        if v.shape != own[k].shape
    ]
    if mismatched:
        raise WeightsUnavailableError(
            f"weights file {name!r} does not fit {type(model).__name__}: "
            f"{len(mismatched)} size mismatches {_listed(mismatched)}"
        )
    model.load_state_dict(kept, strict=True)
    log.info("audio CNN weights from %s (%d PANNs-only keys dropped)", name, len(dropped))
    return dropped

"""AudioFormer backbones from training checkpoints, for use outside the training loops.

Kept apart from the Ray Train loops so the model factory (pure core) can build an
AudioFormer audio tower from a pre-training or fine-tuning checkpoint without importing
Ray. Checkpoints are read with `gpa_ray.train.checkpoints`, which is plain torch + storage.
"""

from __future__ import annotations

from gpa_ray.config import AudioFormerConfig, Config
from gpa_ray.models.audioformer import AudioFormerEncoder
from gpa_ray.train import checkpoints

ARCHITECTURE_FIELDS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "intermediate_size",
    "max_positions",
)


def check_architecture(saved: AudioFormerConfig, wanted: AudioFormerConfig, uri: str) -> None:
    """Fail with the differing fields if a checkpoint's RoFormer differs from the config's."""
    diff = [
        f"{name}: checkpoint {getattr(saved, name)} vs config {getattr(wanted, name)}"
        for name in ARCHITECTURE_FIELDS
        if getattr(saved, name) != getattr(wanted, name)
    ]
    if diff:
        raise ValueError(f"{uri} holds a different AudioFormer ({'; '.join(diff)})")


def encoder_from_checkpoint(uri: str, cfg: Config) -> AudioFormerEncoder:
    """The codebook-1 backbone of an MLM, FT1 or FT2 checkpoint (e.g. as a GPA audio tower)."""
    task = checkpoints.read_state(uri, cfg.storage)["task"]
    saved = checkpoints.read_config(uri, cfg.storage).audioformer
    state = checkpoints.load_model_state(uri, cfg.storage)
    prefix = {
        "mlm": f"models.c{saved.codebooks[0]}.mlm.roformer",
        "ft1": "encoder.roformer",
        "ft2": "anchor.encoder.roformer",
    }
    if task not in prefix:
        raise ValueError(f"{uri} is a {task!r} checkpoint, not an AudioFormer one")
    encoder = AudioFormerEncoder.from_config(saved)
    encoder.roformer.load_state_dict(checkpoints.sub_state(state, prefix[task]))
    return encoder

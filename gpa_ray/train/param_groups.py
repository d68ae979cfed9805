"""Optimizer parameter groups of a GPA model: one lr, or a much smaller lr for the audio
tower's early blocks ("Good, Fast, Cheap" section 3: the PANN is fine-tuned in all its
layers, "earlier layers having an extremely small learning rate, and the later layers
having a learning rate comparable to the other models'").

With `audio_encoder.early_lr_scale` != 1 the trainable parameters of the tower's blocks
before its last `audio_encoder.late_blocks` (`gpa_ray.models.audio_tower.audio_blocks`,
input to output) form a group at `train.lr x early_lr_scale`; every other trainable
parameter (later blocks, text tower, projections) is in the group at `train.lr`. Both
groups carry one `clip_group`, so gradient clipping sees the whole model as one, as it
would with a single group.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gpa_ray.config import Config
from gpa_ray.models.audio_tower import audio_blocks

CLIP_GROUP = "clip_group"


def gpa_param_groups(model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """Adam parameter groups for `model` (a `GPAModel`) under `cfg`."""
    lr = cfg.train.lr
    trainable = [p for p in model.parameters() if p.requires_grad]
    scale = cfg.audio_encoder.early_lr_scale
    if scale == 1.0:
        return [{"params": trainable, "lr": lr}]
    if not 0.0 < scale < 1.0 or cfg.audio_encoder.late_blocks < 0:
        raise ValueError(
            "audio_encoder.early_lr_scale must lie in (0, 1] and audio_encoder.late_blocks "
            f"be >= 0, got {scale} and {cfg.audio_encoder.late_blocks}"
        )
    blocks = audio_blocks(model.audio_encoder.encoder)
    early_blocks = blocks[: max(0, len(blocks) - cfg.audio_encoder.late_blocks)]
    early_ids = {id(p) for block in early_blocks for p in block.parameters() if p.requires_grad}
    early = [p for p in trainable if id(p) in early_ids]
    late = [p for p in trainable if id(p) not in early_ids]
    groups = [{"params": late, "lr": lr, CLIP_GROUP: 0}]
    if early:
        groups.append({"params": early, "lr": lr * scale, CLIP_GROUP: 0})
    return groups

"""Layer-wise learning rates (`audio_encoder.early_lr_scale`) and joint clipping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gpa_ray.config_loading import load_config
from gpa_ray.models.factory import build_gpa
from gpa_ray.train.gpa_loop import GPALoop
from gpa_ray.train.worker import clip_gradients


def _model_and_optimizer(*overrides: str):
    cfg = load_config("debug", list(overrides))
    loop = GPALoop(cfg)
    model = build_gpa(cfg)
    return cfg, model, loop.build_optimizer(model)


def test_one_group_by_default() -> None:
    cfg, model, optimizer = _model_and_optimizer()
    assert len(optimizer.param_groups) == 1
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for p in optimizer.param_groups[0]["params"]) == trainable


def test_early_blocks_train_at_the_scaled_lr() -> None:
    cfg, model, optimizer = _model_and_optimizer(
        "audio_encoder.early_lr_scale=0.01", "audio_encoder.late_blocks=2", "train.lr=1e-4"
    )
    late, early = optimizer.param_groups
    assert late["lr"] == pytest.approx(1e-4) and early["lr"] == pytest.approx(1e-6)
    cnn = model.audio_encoder.encoder
    early_ids = {id(p) for p in early["params"]}
    # CNN14's blocks: bn0, conv_block1..6; the last two train at the full lr.
    for name in ("bn0", "conv_block1", "conv_block2", "conv_block3", "conv_block4"):
        assert all(id(p) in early_ids for p in getattr(cnn, name).parameters())
    for name in ("conv_block5", "conv_block6"):
        assert not any(id(p) in early_ids for p in getattr(cnn, name).parameters())
    # Every trainable parameter is in exactly one group (text tower, projections: late).
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="early_lr_scale"):
        _model_and_optimizer("audio_encoder.early_lr_scale=2")


def test_groups_of_one_model_are_clipped_together() -> None:
    a = nn.Parameter(torch.zeros(2))
    b = nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([3.0, 0.0])
    b.grad = torch.tensor([0.0, 4.0])  # joint norm 5
    groups = [{"params": [a], "clip_group": 0}, {"params": [b], "lr": 0.1, "clip_group": 0}]
    optimizer = torch.optim.SGD(groups, lr=1.0)
    assert clip_gradients(optimizer, max_norm=1.0) == pytest.approx([5.0])
    assert a.grad.tolist() == pytest.approx([0.6, 0.0], abs=1e-6)
    assert b.grad.tolist() == pytest.approx([0.0, 0.8], abs=1e-6)

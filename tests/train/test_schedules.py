"""LR schedules (`train.lr_schedule`) and the DP baseline's checkpoint-selection metric."""

from __future__ import annotations

import pytest
import torch

from gpa_ray.config import TrainConfig
from gpa_ray.metrics import retrieval_metrics
from gpa_ray.train.gpa_loop import with_recall_sums
from gpa_ray.train.schedules import advance, build_scheduler, metric_mode


def _optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _lrs(train: TrainConfig, records: list[dict[str, float]]) -> list[float]:
    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, train)
    out = []
    for record in records:
        advance(scheduler, record, train)
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_step_schedule_is_step_lr() -> None:
    train = TrainConfig(lr_step_epochs=2, lr_gamma=0.5)
    assert _lrs(train, [{}] * 5) == pytest.approx([1.0, 0.5, 0.5, 0.25, 0.25])


def test_plateau_cuts_the_lr_after_patience_epochs_without_improvement() -> None:
    train = TrainConfig(lr_schedule="plateau", plateau_factor=0.1, plateau_patience=2)
    losses = [3.0, 2.0, 2.5, 2.4, 2.1, 2.2, 1.0]
    # Best 2.0 at epoch 2; epochs 3, 4 do not improve (patience 2), epoch 5 is the third
    # bad epoch: lr 1 -> 0.1. The counter restarts; epoch 7 improves.
    lrs = _lrs(train, [{"train_loss": v} for v in losses])
    assert lrs == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1])


def test_plateau_maximises_a_recall_metric() -> None:
    train = TrainConfig(lr_schedule="plateau", plateau_metric="val_t2a_R_sum", plateau_patience=0)
    assert metric_mode("val_t2a_R_sum") == "max" and metric_mode("val_loss") == "min"
    lrs = _lrs(train, [{"val_t2a_R_sum": v} for v in (0.5, 0.6, 0.55)])
    assert lrs == pytest.approx([1.0, 1.0, 0.1])


def test_plateau_state_resumes_the_same_schedule() -> None:
    train = TrainConfig(lr_schedule="plateau", plateau_patience=1)
    records = [{"train_loss": v} for v in (1.0, 1.1, 0.9, 1.2, 1.3, 1.4)]
    whole = _lrs(train, records)
    optimizer = _optimizer()
    first = build_scheduler(optimizer, train)
    for record in records[:3]:
        advance(first, record, train)
    saved = (optimizer.state_dict(), first.state_dict())
    optimizer = _optimizer()
    optimizer.load_state_dict(saved[0])
    resumed = build_scheduler(optimizer, train)
    resumed.load_state_dict(saved[1])
    rest = []
    for record in records[3:]:
        advance(resumed, record, train)
        rest.append(optimizer.param_groups[0]["lr"])
    assert rest == pytest.approx(whole[3:])
    assert whole[-1] < 1.0


def test_bad_schedule_settings_are_named() -> None:
    with pytest.raises(ValueError, match="train.lr_schedule 'cosine'"):
        build_scheduler(_optimizer(), TrainConfig(lr_schedule="cosine"))
    with pytest.raises(ValueError, match="plateau_factor"):
        build_scheduler(_optimizer(), TrainConfig(lr_schedule="plateau", plateau_factor=1.5))
    train = TrainConfig(lr_schedule="plateau", plateau_metric="val_loss")
    scheduler = build_scheduler(_optimizer(), train)
    with pytest.raises(ValueError, match="'val_loss' is not in the epoch record.*train_loss"):
        advance(scheduler, {"epoch": 1, "train_loss": 1.0}, train)


def test_recall_sum_is_what_the_dp_baseline_selects_by() -> None:
    # 3 clips x 1 caption, T2A ranks: caption 0 -> clip 0 first, caption 1 -> clip 1 at
    # rank 2, caption 2 -> clip 2 at rank 3: R@1 = 1/3, R@5 = R@10 = 1.
    scores = torch.tensor([[0.9, 0.8, 0.7], [0.1, 0.5, 0.6], [0.0, 0.2, 0.3]])
    metrics = with_recall_sums(retrieval_metrics(scores, caption_to_clip=[0, 1, 2]))
    expected = sum(metrics[f"t2a_R@{k}"] for k in (1, 5, 10))
    assert metrics["t2a_R_sum"] == pytest.approx(expected)
    assert metrics["t2a_R@1"] == pytest.approx(1 / 3)
    assert metrics["t2a_R_sum"] == pytest.approx(1 / 3 + 2)
    assert "a2t_R_sum" in metrics
    assert with_recall_sums({"t2a_R@1": 0.5}) == {"t2a_R@1": 0.5}

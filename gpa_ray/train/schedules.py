"""Learning-rate schedules of the training worker, chosen by `train.lr_schedule`.

- "step": lr x `lr_gamma` every `lr_step_epochs` epochs (the GPA / DP baseline schedule);
- "plateau": `ReduceLROnPlateau`, lr x `plateau_factor` once `plateau_metric` has not
  improved for `plateau_patience` epochs ("Good, Fast, Cheap" section 5: "a learning rate
  scheduler that decreased the learning rate on a plateau"). The metric is a key of the
  epoch record (`train_loss`, `val_t2a_R_sum`, ...); a name ending in `loss` is
  minimised, any other maximised, the rule checkpoint ranking uses.

Both step once per epoch, after validation, on the finished epoch record, and both keep
their state in the checkpoint, so a resumed run continues the same schedule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from gpa_ray.config import TrainConfig

LR_SCHEDULES = ("step", "plateau")
Scheduler = torch.optim.lr_scheduler.StepLR | torch.optim.lr_scheduler.ReduceLROnPlateau


def metric_mode(metric: str) -> str:
    """ "min" for a loss, "max" for anything else (recall, accuracy, mAP)."""
    return "min" if metric.endswith("loss") else "max"


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> Scheduler:
    """The schedule `train.lr_schedule` over `optimizer`."""
    if train.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=max(1, train.lr_step_epochs), gamma=train.lr_gamma
        )
    if train.lr_schedule == "plateau":
        if not 0.0 < train.plateau_factor < 1.0:
            raise ValueError(f"train.plateau_factor must lie in (0, 1), got {train.plateau_factor}")
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode=metric_mode(train.plateau_metric),
            factor=train.plateau_factor,
            patience=train.plateau_patience,
        )
    raise ValueError(
        f"unknown train.lr_schedule {train.lr_schedule!r}; choose one of {LR_SCHEDULES}"
    )


def advance(scheduler: Scheduler, record: Mapping[str, Any], train: TrainConfig) -> None:
    """Step the schedule at the end of an epoch whose record is `record`."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        metric = train.plateau_metric
        if metric not in record:
            known = sorted(k for k in record if k.startswith(("train_", "val_")))
            raise ValueError(
                f"train.plateau_metric {metric!r} is not in the epoch record; it has {known}"
            )
        scheduler.step(float(record[metric]))
        return
    scheduler.step()

"""The contract between a training task and the generic Ray Train plumbing.

A task (AudioFormer MLM, FT1, FT2, GPA, ...) is a `TrainLoop`: a small, picklable object
built in the driver from the resolved config (plus anything the driver computed once,
such as the label vocabulary) and shipped to every worker. It never holds a model
itself: each worker calls `build_model` after seeding, so all ranks start from the same
weights. The plumbing (`gpa_ray.train.worker`) owns everything else: devices, DDP,
optimizer steps, bf16 autocast, gradient clipping, LR schedule, checkpoints, resume,
metrics files and `ray.train.report`.

Per epoch a worker does, in this order:

    for batch in its train shard (collated by `collate_fn(train=True)`):
        loss, logs = loop.train_step(model, batch, generator)     # forward + loss only
        backward, clip, optimizer step                            # plumbing
    metrics = loop.evaluate(model, its share of the val batches)  # no_grad, eval mode

`evaluate` runs on every rank over a disjoint share of the validation batches (possibly
none) and must return the *global* metrics, identical on every rank; it must call the
same collectives on every rank whatever its share (`gather_rows` once at the end is the
simple way). Metric names are prefixed by the plumbing: `train_<log>` and `val_<metric>`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gpa_ray.config import Config
from gpa_ray.train.distributed import gather_with_grad, world_size

Batch = dict[str, Any]


class TrainLoop(abc.ABC):
    """What a training task supplies; see the module docstring for the call order.

    Class attributes: `task` names the task in checkpoints and logs; `columns` are the
    clip-shard columns the collate function reads; `metric`/`metric_mode` choose the best
    checkpoint when `train.checkpoint_metric` is empty (a key of the reported metrics,
    e.g. "val_accuracy"; "max" or "min").
    """

    task: str = ""
    columns: tuple[str, ...] = ()
    metric: str = "val_loss"
    metric_mode: str = "min"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh model on CPU (initial weights included, e.g. from `train.init_from`)."""

    @abc.abstractmethod
    def collate_fn(self, train: bool, epoch: int = 0) -> Callable[[Any], Batch]:
        """Arrow batch -> dict of tensors (see `gpa_ray.data.loaders.CodesCollate`).

        `epoch` (0-based) seeds any random draws made while collating training batches,
        so a run resumed at epoch e draws what an uninterrupted run draws there."""

    def train_dataset(self, dataset: Any) -> Any:
        """The training Ray Dataset as this task consumes it, from the clip split read in
        its seeded block order (e.g. one row per caption); the clips themselves by default."""
        return dataset

    @abc.abstractmethod
    def train_step(
        self, model: nn.Module, batch: Batch, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]:
        """Forward one batch; return (the loss to back-propagate, floats to log).

        `model` is the DDP-wrapped model when there are several workers: call it, not its
        submodules, so gradients are synchronised. `generator` (on the model's device,
        seeded per rank and epoch) drives any randomness such as masking, so a resumed
        run draws the same masks as an uninterrupted one.
        """

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
        """Global validation metrics from this rank's share of the batches (see above)."""

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Adam over the trainable parameters. Gradients are clipped per parameter group,
        so a task that trains independent models puts each in its own group."""
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.cfg.train.lr)

    def state(self) -> dict[str, Any]:
        """JSON-able facts saved with every checkpoint (e.g. the label vocabulary), so a
        checkpoint can be used without the run that wrote it."""
        return {}


def gather_rows(x: Tensor) -> Tensor:
    """Concatenate `x` (rows may differ per rank, possibly zero) from every rank, no grad."""
    with torch.no_grad():
        return gather_with_grad(x.contiguous())[0].detach()


def sum_across_workers(values: Tensor) -> Tensor:
    """Element-wise sum of a float tensor over ranks (itself when not distributed)."""
    if world_size() == 1:
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor of a batch to `device` (other values pass through)."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()
    }


def strided(batches: Iterable[Batch], rank: int, world: int) -> Iterator[Batch]:
    """Every `world`-th batch starting at `rank`: disjoint, exhaustive shares of one stream."""
    for i, batch in enumerate(batches):
        if i % world == rank:
            yield batch

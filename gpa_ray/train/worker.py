"""The function every Ray Train worker runs: the generic epoch loop around a `TrainLoop`.

It owns what every task shares, so each task's loop is only its forward, loss and
metrics: seeding, device placement and DDP (`ray.train.torch.prepare_model`), resume from
`ray.train.get_checkpoint()` (after a worker failure, or when a run with the same
storage path and name is started again), the optimizer step with bf16 autocast on GPU
and gradient-norm clipping per parameter group, the LR schedule (`train.lr_schedule`),
evaluation, early stopping (`gpa_ray.train.early_stopping`), checkpoints, the metrics
files, experiment tracking (`gpa_ray.train.tracking`) and `ray.train.report`.

Every worker calls `ray.train.report` exactly once per epoch (Train V2 requires equal
counts); only world rank 0 attaches the checkpoint, writes the metrics files and logs to
the trackers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from gpa_ray import storage
from gpa_ray.checkpoints import TrainState, load_train_checkpoint, save_train_checkpoint
from gpa_ray.train import history, schedules
from gpa_ray.train.early_stopping import should_stop
from gpa_ray.train.loop import TrainLoop, strided, sum_across_workers, to_device
from gpa_ray.train.tracking import Tracker, checkpoint_dir_name

logger = logging.getLogger(__name__)

FAULT_MARKER = "fault_drill.done"
"""Written under the run directory just before the fault drill exits a worker, so the
restarted worker group passes the same step without dying again."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def deterministic_torch(cpus: float) -> None:
    """Torch in a training worker: as many threads as the worker holds whole CPUs (at
    least 1; float reductions depend on the thread count, so it is fixed by the config,
    not by the machine) and deterministic kernels where torch has a choice (cuBLAS also
    needs its workspace setting, read when its first handle is created)."""
    torch.set_num_threads(max(1, int(cpus)))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """A seed per (run seed, rank, epoch): ranks draw different masks and orders, and a
    resumed epoch draws exactly what the interrupted one drew."""
    return (seed * 1_000_003 + epoch * 10_007 + rank) % 2**31


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float) -> list[float]:
    """Clip the gradient norm of each parameter group to `max_norm`; return the norms.

    Per group, not globally, so independent models trained in one run (one per
    codebook in AudioFormer pre-training) are clipped exactly as if trained alone.
    Groups that share a `clip_group` value (one model at several learning rates,
    `gpa_ray.train.param_groups`) are clipped together, as one.
    """
    joint: dict[Any, list[nn.Parameter]] = {}
    for index, group in enumerate(optimizer.param_groups):
        key = ("clip_group", group["clip_group"]) if "clip_group" in group else index
        joint.setdefault(key, []).extend(p for p in group["params"] if p.grad is not None)
    return [
        float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        for params in joint.values()
        if params
    ]


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA when enabled; a no-op elsewhere (CPU runs stay fp32)."""
    if bf16 and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def maybe_fail(loop: TrainLoop, run_uri: str, step: int, rank: int) -> None:
    """The fault drill (`train.fail_at_step`): rank 0 exits hard at that step, once a run."""
    cfg = loop.cfg
    if cfg.train.fail_at_step <= 0 or step != cfg.train.fail_at_step or rank != 0:
        return
    marker = storage.join(run_uri, FAULT_MARKER)
    if storage.exists(marker, cfg.storage):
        return
    storage.write_bytes(marker, f"step {step}\n".encode(), cfg.storage)
    logger.warning("fault drill: worker of rank 0 exits at step %d", step)
    os._exit(17)


def _mean_logs(sums: dict[str, float], count: int, keys: list[str]) -> dict[str, float]:
    """Per-step logs averaged over the steps of every rank."""
    values = torch.tensor([sums.get(k, 0.0) for k in keys] + [float(count)], dtype=torch.float64)
    total = sum_across_workers(values)
    n = max(total[-1].item(), 1.0)
    return {k: total[i].item() / n for i, k in enumerate(keys)}


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; `config` = {"loop": TrainLoop, "run_uri": str, "has_val": bool,
    "stop_metric": (metric, "max"|"min") for `train.early_stopping_patience`}."""
    import ray.train
    import ray.train.torch

    loop: TrainLoop = config["loop"]
    run_uri: str = config["run_uri"]
    cfg = loop.cfg
    deterministic_torch(cfg.train.cpus_per_worker)
    rank = ray.train.get_context().get_world_rank()
    seed_everything(cfg.train.seed)
    model = loop.build_model()
    optimizer = loop.build_optimizer(model)
    scheduler = schedules.build_scheduler(optimizer, cfg.train)
    state = TrainState()
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            model_state, optimizer_state, state = load_train_checkpoint(directory)
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state["optimizer"])
        scheduler.load_state_dict(optimizer_state["scheduler"])
        state.resumes.append(state.step)
        logger.info("rank %d resumed at epoch %d, step %d", rank, state.epoch, state.step)
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(model)
    _move_optimizer_state(optimizer, device)
    metric, mode = config.get("stop_metric", ("", "max"))
    tracker = (
        Tracker.open(cfg, run_uri, loop.task, state.epoch, metric, mode) if rank == 0 else None
    )
    try:
        _train_epochs(loop, config, model, optimizer, scheduler, state, tracker)
    except BaseException:
        if tracker is not None:
            tracker.close(failed=True)
        raise
    if tracker is not None:
        tracker.close()


def _train_epochs(
    loop: TrainLoop,
    config: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: schedules.Scheduler,
    state: TrainState,
    tracker: Tracker | None,
) -> None:
    """The epochs from `state.epoch` on: train, evaluate, checkpoint and report each."""
    import ray.train
    import ray.train.torch

    cfg, run_uri = loop.cfg, config["run_uri"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if config["has_val"] else None
    generator = torch.Generator(device=device)
    metric, mode = config.get("stop_metric", ("", "max"))
    for epoch in range(state.epoch, cfg.train.epochs):
        if should_stop(state.history, metric, mode, cfg.train.early_stopping_patience):
            logger.info("early stop before epoch %d: no better %s", epoch + 1, metric)
            break
        started, cpu_started = time.perf_counter(), time.process_time()
        generator.manual_seed(epoch_seed(cfg.train.seed, rank, epoch))
        # Dropout draws from the global generators: reseeded per epoch, so a resumed
        # epoch draws what the interrupted one drew.
        seed_everything(epoch_seed(cfg.train.seed, rank, epoch))
        model.train()
        sums: dict[str, float] = {}
        steps = 0
        first_batch_seconds = 0.0
        for batch in _batches(loop, train_shard, epoch, epoch_seed(cfg.train.seed, rank, epoch)):
            if steps == 0:
                # Each epoch starts a new streaming execution of the shard: its start-up
                # is a per-epoch cost, kept apart from the per-step time.
                first_batch_seconds = time.perf_counter() - started
            state.step += 1
            maybe_fail(loop, run_uri, state.step, rank)
            batch = to_device(batch, device)
            with autocast(device, cfg.train.bf16):
                loss, logs = loop.train_step(model, batch, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip > 0:
                clip_gradients(optimizer, cfg.train.grad_clip)
            optimizer.step()
            for key, value in logs.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            steps += 1
        lr = optimizer.param_groups[0]["lr"]
        record: dict[str, Any] = {"epoch": epoch + 1, "step": state.step, "lr": lr}
        record["train_seconds"] = time.perf_counter() - started
        record["train_cpu_seconds"] = time.process_time() - cpu_started
        record["first_batch_seconds"] = first_batch_seconds
        record.update({f"train_{k}": v for k, v in _mean_logs(sums, steps, sorted(sums)).items()})
        if val_shard is not None:
            model.eval()
            with torch.no_grad(), autocast(device, cfg.train.bf16):
                batches = strided(_batches(loop, val_shard, None, 0), rank, world)
                metrics = loop.evaluate(model, (to_device(b, device) for b in batches))
            record.update({f"val_{k}": v for k, v in metrics.items()})
        record["epoch_seconds"] = time.perf_counter() - started
        record["steps_per_epoch"] = steps
        schedules.advance(scheduler, record, cfg.train)
        state.epoch = epoch + 1
        state.history.append(record)
        _report(loop, run_uri, model, optimizer, scheduler, state, record, rank, tracker)


def _batches(loop: TrainLoop, shard: Any, epoch: int | None, seed: int) -> Iterator[dict[str, Any]]:
    """Batches of a shard: training batches of `epoch`, or validation batches (None)."""
    cfg = loop.cfg.train
    train = epoch is not None
    shuffle = cfg.shuffle_buffer if train and cfg.shuffle_buffer > 0 else None
    return shard.iter_torch_batches(
        batch_size=cfg.batch_size,
        collate_fn=loop.collate_fn(train, epoch or 0),
        local_shuffle_buffer_size=max(shuffle, cfg.batch_size) if shuffle else None,
        local_shuffle_seed=seed if shuffle else None,
    )


def _move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Restored optimizer moments live on CPU; put them beside their parameters."""
    for per_param in optimizer.state.values():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor) and key != "step":
                per_param[key] = value.to(device)


def _report(
    loop: TrainLoop,
    run_uri: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: schedules.Scheduler,
    state: TrainState,
    record: dict[str, Any],
    rank: int,
    tracker: Tracker | None = None,
) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(record, checkpoint=None)
        return
    history.write(run_uri, state.history, f"{loop.task} {loop.cfg.train.name}", loop.cfg.storage)
    with tempfile.TemporaryDirectory(prefix="gpa_ray_ckpt_") as directory:
        save_train_checkpoint(
            directory,
            model_state=unwrap(model).state_dict(),
            optimizer_state={
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
            },
            train_state=state,
            task=loop.task,
            loop_state=loop.state(),
            cfg=loop.cfg,
        )
        # Named here (Ray Train's format, and every rank gets rank 0's name) so the
        # trackers can be told where this epoch's checkpoint is stored.
        name = checkpoint_dir_name()
        checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(record, checkpoint=checkpoint, checkpoint_dir_name=name)
    if tracker is not None:
        tracker.log_epoch(record, storage.join(run_uri, name))

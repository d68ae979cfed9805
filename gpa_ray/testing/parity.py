"""Ray Train workers for the training-parity tests (`tests/train/test_gpa_training.py`).

They live in the package, not in a test file, so Ray workers can import them by name.
"""

from __future__ import annotations

from typing import Any

import ray.train
import ray.train.torch
import torch

from gpa_ray.train.worker import clip_gradients, seed_everything, unwrap


def gpa_one_step_worker(config: dict[str, Any]) -> None:
    """Ray Train worker for GPA parity tests: for each `GPALoop` in `config["loops"]`,
    build its model, take ONE optimizer step on this rank's rows of `config["table"]`
    (rank r of W gets rows r*n .. r*n+n-1, n = rows / W) exactly as the training worker
    steps (DDP, clipping, Adam), and on rank 0 save [{"loss", "grads", "state"}, ...]
    (the gradients Adam consumed, the parameters after its step) to `config["out"]`.
    `config["float64"]` runs model and inputs in double precision, so a comparison of
    worker counts is not blurred by float32 rounding of sums taken in another order."""
    torch.set_num_threads(1)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    table = config["table"]
    per_rank = table.num_rows // world
    shard = table.slice(rank * per_rank, per_rank)
    results = []
    for loop in config["loops"]:
        seed_everything(loop.cfg.train.seed)
        model = loop.build_model()
        if config.get("float64"):
            model = model.double()
        optimizer = loop.build_optimizer(model)
        model = ray.train.torch.prepare_model(model)
        model.train()
        batch = loop.collate_fn(True)(shard)
        if config.get("float64"):
            batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
        loss, logs = loop.train_step(model, batch, torch.Generator())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(optimizer, loop.cfg.train.grad_clip)
        net = unwrap(model)
        grads = {
            k: p.grad.detach().cpu().clone()
            for k, p in net.named_parameters()
            if p.grad is not None
        }
        optimizer.step()
        state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        results.append({"loss": logs["loss"], "grads": grads, "state": state})
    if rank == 0:
        torch.save(results, str(config["out"]))
    ray.train.report({"steps": len(results)})

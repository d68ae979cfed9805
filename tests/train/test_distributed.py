"""Parity of the cross-worker gather: 2 gloo ranks reproduce the single-process loss and
gradients of a contrastive loss over the global batch, including uneven rank sizes."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from gpa_ray.testing.services import free_loopback_ports
from gpa_ray.train.distributed import gather_with_grad, global_loss_scale

DIM = 5


def _features(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))


def _rows_loss(
    audio: torch.Tensor, text_all: torch.Tensor, offset: int, total: int
) -> torch.Tensor:
    """Audio->text cross-entropy of the given query rows against every text, / global batch."""
    logits = F.normalize(audio, dim=-1) @ F.normalize(text_all, dim=-1).T / 0.07
    targets = torch.arange(offset, offset + audio.shape[0])
    return F.cross_entropy(logits, targets, reduction="sum") / total


def _projection() -> torch.nn.Linear:
    """A shared trainable layer, identical on every rank (as DDP guarantees)."""
    torch.manual_seed(2)
    return torch.nn.Linear(DIM, DIM)


def _worker(rank: int, sizes: list[int], port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=len(sizes))
    try:
        total = sum(sizes)
        start = sum(sizes[:rank])
        proj = _projection()
        audio = _features(total, 0)[start : start + sizes[rank]].clone().requires_grad_(True)
        text = _features(total, 1)[start : start + sizes[rank]].clone().requires_grad_(True)
        text_all, offset = gather_with_grad(proj(text))
        loss = _rows_loss(audio, text_all, offset, total)
        (loss * global_loss_scale()).backward()
        # What DDP does with parameter gradients: average over ranks.
        weight_grad = proj.weight.grad.clone()
        dist.all_reduce(weight_grad)
        weight_grad /= len(sizes)
        scale = global_loss_scale()
        out[rank] = (offset, loss.detach(), audio.grad / scale, text.grad / scale, weight_grad)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [[3, 3], [4, 2]])
def test_two_ranks_match_single_process(sizes: list[int]) -> None:
    total = sum(sizes)
    proj = _projection()
    audio = _features(total, 0).requires_grad_(True)
    text = _features(total, 1).requires_grad_(True)
    reference = _rows_loss(audio, proj(text), 0, total)
    reference.backward()

    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(sizes, free_loopback_ports(1)[0], out), nprocs=len(sizes), join=True)

    assert sum(out[r][1] for r in range(len(sizes))) == pytest.approx(reference.item(), abs=1e-5)
    start = 0
    for r, size in enumerate(sizes):
        offset, _, audio_grad, text_grad, weight_grad = out[r]
        assert offset == start
        torch.testing.assert_close(weight_grad, proj.weight.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(
            audio_grad, audio.grad[start : start + size], atol=1e-6, rtol=1e-5
        )
        torch.testing.assert_close(text_grad, text.grad[start : start + size], atol=1e-6, rtol=1e-5)
        start += size


def test_single_process_is_identity() -> None:
    x = torch.ones(2, 3)
    gathered, offset = gather_with_grad(x)
    assert gathered is x and offset == 0


TAU = 0.1
N_VIEWS = 3
# Clip 10 is drawn on both ranks and clip 11 twice on the second rank (with [3, 3]): the
# gathered clip keys must keep each out of its own negatives.
MPC_KEYS = [10, 12, 13, 10, 11, 11]


def _mpc_inputs(proj: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """Global [6, V, D] views (anchor view through the trainable layer, frozen views
    fixed) and their leaf anchor features."""
    anchor_in = _features(6, 3).requires_grad_(True)
    frozen = _features(6 * (N_VIEWS - 1), 4).reshape(6, N_VIEWS - 1, DIM)
    return torch.cat([proj(anchor_in)[:, None], frozen], dim=1), anchor_in


def _mpc_worker(rank: int, sizes: list[int], port: int, out: dict) -> None:
    from gpa_ray.train.audioformer_loops import global_batch_mpc

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=len(sizes))
    try:
        start = sum(sizes[:rank])
        rows = slice(start, start + sizes[rank])
        proj = _projection()
        views, _ = _mpc_inputs(proj)
        keys = torch.tensor(MPC_KEYS)[rows]
        loss = global_batch_mpc(views[rows], keys, TAU)
        loss.backward()  # as FT2's step: no extra scale, DDP averages below
        weight_grad = proj.weight.grad.clone()
        dist.all_reduce(weight_grad)
        weight_grad /= len(sizes)
        out[rank] = (loss.detach(), weight_grad)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [[3, 3], [4, 2]])
def test_mpc_over_two_ranks_matches_single_process(sizes: list[int]) -> None:
    from gpa_ray.losses import mpc_loss
    from gpa_ray.train.audioformer_loops import global_batch_mpc

    proj = _projection()
    views, _ = _mpc_inputs(proj)
    reference = mpc_loss(views, TAU, torch.tensor(MPC_KEYS))
    reference.backward()
    # The simple path of the loop itself is the plain loss on one process.
    single = global_batch_mpc(views.detach(), torch.tensor(MPC_KEYS), TAU)
    assert single.item() == pytest.approx(reference.item(), abs=1e-12)
    unaware = mpc_loss(views.detach(), TAU)
    assert abs(unaware.item() - reference.item()) > 1e-3  # the keys matter here

    manager = mp.Manager()
    out = manager.dict()
    port = free_loopback_ports(1)[0]
    mp.spawn(_mpc_worker, args=(sizes, port, out), nprocs=len(sizes), join=True)

    for r in range(len(sizes)):
        loss, weight_grad = out[r]
        assert loss.item() == pytest.approx(reference.item(), abs=1e-5)
        torch.testing.assert_close(weight_grad, proj.weight.grad, atol=1e-6, rtol=1e-5)

"""Cross-worker gathering so contrastive negatives span the global batch.

Every contrastive loss in gpa_ray scores a worker's local queries against the keys of
*all* workers (as open_clip does). `gather_with_grad` concatenates a tensor from every
rank while keeping the autograd graph: the backward pass sums, on each rank, the gradients
that every rank's loss sends to that rank's rows. Hence if each rank's loss covers only its
own query rows (normalised by the global batch), the ranks' losses add up to the
single-process loss, and every local row receives exactly the single-process gradient.
DDP then *averages* parameter gradients over ranks, so a rank's loss is multiplied by
`world_size()` before backward (`global_loss_scale`) to reproduce the single-process step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def world_size() -> int:
    """Number of ranks in the default process group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather `x` along dim 0 from every rank, differentiably.

    Ranks may hold different numbers of rows (the last batch of an epoch): rows are padded
    to the largest count for the collective and trimmed afterwards. Returns the global
    tensor and the offset of this rank's first row in it, so local row i's positive key is
    global row `offset + i`.
    """
    if world_size() == 1:
        return x, 0
    n_local = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    counts = [torch.zeros_like(n_local) for _ in range(world_size())]
    dist.all_gather(counts, n_local)
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    padded = x
    if x.shape[0] < longest:
        pad = x.new_zeros((longest - x.shape[0], *x.shape[1:]))
        padded = torch.cat([x, pad], dim=0)
    parts = dist_fn.all_gather(padded)
    gathered = torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)], dim=0)
    return gathered, sum(sizes[: rank()])


def global_loss_scale() -> float:
    """Factor for a rank's local-rows loss so DDP's gradient averaging yields the full step."""
    return float(world_size())

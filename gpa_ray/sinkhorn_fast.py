"""The bias job's per-block Sinkhorn updates (GPA eq 10) in fewer passes over R'.

`gpa_ray.sinkhorn.row_potential` and `column_lse` are the reference: written for clarity,
they allocate R' + g, then R' + g over eps, then let `torch.logsumexp` take its own passes;
on CPU that costs about as much per round as scoring the block took. These compute the
same log-sum-exp with one temporary per call: add the potential, take the maximum along
the reduced axis, subtract it and scale by 1/eps in place, exponentiate in place, sum.
With the maximum subtracted every exponent is <= 0, so nothing overflows at any eps
(the log domain's point); results agree with the reference to float32 rounding
(tests/test_sinkhorn.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gpa_ray.sinkhorn import QBNormStats


def _shifted_exp_sum(shifted: Tensor, dim: int, epsilon: float) -> tuple[Tensor, Tensor]:
    """(max along `dim`, sum along `dim` of exp((x - max) / eps)), x = `shifted`, which is
    overwritten (the caller's temporary)."""
    top = shifted.amax(dim=dim, keepdim=True)
    total = shifted.sub_(top).mul_(1.0 / epsilon).exp_().sum(dim=dim)
    return top.squeeze(dim), total


def row_potential_fast(
    block_scores: Tensor, g: Tensor, epsilon: float, n_rows_total: int
) -> Tensor:
    """f for a block of rows [G_block, J], as `gpa_ray.sinkhorn.row_potential`:
    eps*log(1/G) - eps*LSE_j((R'_ij + g_j)/eps) = -eps*log G - max_i - eps*log(sum)."""
    top, total = _shifted_exp_sum(block_scores.float() + g.float(), 1, epsilon)
    return -epsilon * math.log(n_rows_total) - top - epsilon * torch.log(total)


def column_lse_fast(block_scores: Tensor, f_block: Tensor, epsilon: float) -> Tensor:
    """This block's LSE_i((R'_ij + f_i)/eps) [J], as `gpa_ray.sinkhorn.column_lse`."""
    top, total = _shifted_exp_sum(block_scores.float() + f_block.float()[:, None], 0, epsilon)
    return top / epsilon + torch.log(total)


def qb_norm_statistics_fast(querybank_scores: Tensor, beta: float, k: int) -> QBNormStats:
    """QB-Norm's statistics of a block of querybank rows, as
    `gpa_ray.sinkhorn.qb_norm_statistics`: LSE_q(beta * s_qj) [J] and the items in the
    top-k of some row [J] (the bias job reduces them in its first round)."""
    bank = querybank_scores.float()
    n_gallery = bank.shape[1]
    top = torch.topk(bank, min(k, n_gallery), dim=1).indices.reshape(-1)
    active = torch.zeros(n_gallery, dtype=torch.bool, device=bank.device)
    active[top] = True
    peak, total = _shifted_exp_sum(bank * beta, 0, 1.0)
    return QBNormStats(peak + torch.log(total), active)

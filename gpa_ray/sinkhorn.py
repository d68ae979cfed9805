"""Text biases for audio-to-text retrieval: log-domain Sinkhorn-Knopp (GPA eq 10) and baselines.

A retrieval model tends to have "hub" texts that rank high for many audio queries. GPA fixes
this by treating the scores R' between G training audio queries and the J test texts as an
entropic optimal-transport problem with uniform marginals and using the text potential g as
an additive bias: R*_ij = R_ij + g_j (A2T only). The updates (uniform marginals 1/G, 1/J,
temperature epsilon, g initialised to 0, `n_iter` rounds of "f then g"):

    f_i = eps * log(1/G) - eps * LSE_j((R'_ij + g_j) / eps)
    g_j = eps * log(1/J) - eps * LSE_i((R'_ij + f_i) / eps)

Everything is in the log domain (log-sum-exp), so scores/eps of 1e4 stay finite in fp32.
GPA states the 10 rounds (section 3.1) but no epsilon: the default 0.05 is our choice.

Distribution: `f` for a block of rows needs only that block and `g`, and the `g` update
needs only a column log-sum-exp per block, combined by one more log-sum-exp. So each actor
holds a block of rows of R' and every round moves a single J-vector each way; R' is never
materialised on one node. `sinkhorn_potentials_blockwise` runs that exact loop in-process
(the parity reference for the distributed job).

Baselines, for comparison studies:
- `qb_norm`: QB-Norm's dynamic inverted softmax, normalising by a querybank of training
  queries (uses no test queries). Its querybank enters only through a J-vector LSE and a
  J-vector activation mask (`qb_norm_statistics`), which also combine across row blocks.
- `dual_softmax`: the dual-softmax prior over the test-query axis. It uses the other test
  queries to rescore each query, i.e. it leaks test-set information and is not a fair
  single-query retrieval setting; it exists only to reproduce published comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

ScoreBlocks = Sequence[Tensor] | Callable[[], Iterable[Tensor]]


class QBNormStats(NamedTuple):
    """QB-Norm's querybank summary over J gallery items: `lse` [J] = LSE_q(beta*s_qj) and
    `active` [J] bool (in the top-k of some querybank query)."""

    lse: Tensor
    active: Tensor


def _working(scores: Tensor) -> Tensor:
    """Half-precision scores are promoted: log-sum-exp over thousands of items needs fp32."""
    if scores.dtype in (torch.float16, torch.bfloat16):
        return scores.float()
    return scores


def row_potential(block_scores: Tensor, g: Tensor, epsilon: float, n_rows_total: int) -> Tensor:
    """f for a block of rows: eps*log(1/G) - eps*LSE_j((R'_ij + g_j)/eps).

    `block_scores` is [G_block, J], `g` is [J]; `n_rows_total` is G, the number of rows of
    the whole R' (the uniform row marginal is 1/G, not 1/G_block). Returns [G_block].
    """
    scores = _working(block_scores)
    lse = torch.logsumexp((scores + g.to(scores.dtype)) / epsilon, dim=1)
    return -epsilon * math.log(n_rows_total) - epsilon * lse


def column_lse(block_scores: Tensor, f_block: Tensor, epsilon: float) -> Tensor:
    """This block's share of the g update: LSE_i((R'_ij + f_i)/eps) over its rows, [J]."""
    scores = _working(block_scores)
    return torch.logsumexp((scores + f_block.to(scores.dtype)[:, None]) / epsilon, dim=0)


def combine_column_lse(partials: Sequence[Tensor]) -> Tensor:
    """Merge per-block column LSEs into the LSE over all rows (log-sum-exp across blocks)."""
    if not partials:
        raise ValueError("combine_column_lse needs at least one block")
    return torch.logsumexp(torch.stack(list(partials)), dim=0)


def column_potential(lse: Tensor, epsilon: float) -> Tensor:
    """g from the combined column LSE: eps*log(1/J) - eps*LSE. This g is the text bias b."""
    return -epsilon * math.log(lse.shape[0]) - epsilon * lse


def sinkhorn_potentials(
    scores: Tensor, epsilon: float = 0.05, n_iter: int = 10
) -> tuple[Tensor, Tensor]:
    """Log-domain Sinkhorn-Knopp on R' [G, J] with uniform marginals. Returns (f [G], g [J]).

    g starts at 0; each of the `n_iter` rounds updates f, then g (GPA eq 10). The text bias
    for A2T retrieval is g.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be [G, J], got shape {tuple(scores.shape)}")
    if n_iter < 1:
        raise ValueError("n_iter must be >= 1")
    scores = _working(scores)
    g = torch.zeros(scores.shape[1], dtype=scores.dtype, device=scores.device)
    for _ in range(n_iter):
        f = row_potential(scores, g, epsilon, scores.shape[0])
        g = column_potential(column_lse(scores, f, epsilon), epsilon)
    return f, g


def sinkhorn_potentials_blockwise(
    score_blocks: ScoreBlocks,
    epsilon: float = 0.05,
    n_iter: int = 10,
    n_rows_total: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The same iteration as `sinkhorn_potentials`, over row blocks of R' (never stacked).

    `score_blocks` is either a sequence of [G_b, J] tensors or a zero-argument callable that
    yields the blocks anew on every pass (e.g. recomputing scores from embeddings); with a
    callable, `n_rows_total` (G) must be given. Returns (f [G], g [J]) with f in block order.
    """
    if callable(score_blocks):
        if n_rows_total is None:
            raise ValueError("n_rows_total is required when score_blocks is a callable")
        produce = score_blocks
    else:
        blocks = list(score_blocks)
        if not blocks:
            raise ValueError("score_blocks is empty")
        n_rows_total = n_rows_total or sum(b.shape[0] for b in blocks)

        def produce() -> Iterable[Tensor]:
            return blocks

    if n_iter < 1:
        raise ValueError("n_iter must be >= 1")
    g: Tensor | None = None
    f_blocks: list[Tensor] = []
    for _ in range(n_iter):
        f_blocks, partials = [], []
        for block in produce():
            block = _working(block)
            if g is None:
                g = torch.zeros(block.shape[1], dtype=block.dtype, device=block.device)
            f_block = row_potential(block, g, epsilon, n_rows_total)
            f_blocks.append(f_block)
            partials.append(column_lse(block, f_block, epsilon))
        g = column_potential(combine_column_lse(partials), epsilon)
    assert g is not None
    return torch.cat(f_blocks), g


def transport_plan(scores: Tensor, f: Tensor, g: Tensor, epsilon: float) -> Tensor:
    """The coupling P_ij = exp((R'_ij + f_i + g_j)/eps); at convergence its row sums are 1/G
    and column sums 1/J (after a g update the column sums are exact)."""
    return torch.exp((_working(scores) + f[:, None] + g[None, :]) / epsilon)


def qb_norm_statistics(querybank_scores: Tensor, beta: float = 20.0, k: int = 1) -> QBNormStats:
    """What QB-Norm needs from a block of querybank rows [Q_b, J]: LSE_q(beta*s_qj) [J] and
    the activation mask [J] (items in the top-k of at least one of these rows).

    Blocks of rows combine exactly with `combine_qb_norm_statistics`, so the querybank
    (G training queries x J texts, i.e. R') never has to be held whole.
    """
    bank = _working(querybank_scores)
    n_gallery = bank.shape[1]
    top = torch.topk(bank, min(k, n_gallery), dim=1).indices.reshape(-1)
    active = torch.zeros(n_gallery, dtype=torch.bool, device=bank.device)
    active[top] = True
    return QBNormStats(torch.logsumexp(beta * bank, dim=0), active)


def combine_qb_norm_statistics(parts: Sequence[QBNormStats]) -> QBNormStats:
    """Merge per-block statistics: log-sum-exp of the LSEs, union of the activation sets."""
    if not parts:
        raise ValueError("combine_qb_norm_statistics needs at least one block")
    lse = torch.logsumexp(torch.stack([p.lse for p in parts]), dim=0)
    active = torch.stack([p.active for p in parts]).any(dim=0)
    return QBNormStats(lse, active)


def qb_norm_apply(test_scores: Tensor, stats: QBNormStats, beta: float = 20.0) -> Tensor:
    """QB-Norm of test rows [P, J] given the querybank statistics (see `qb_norm`)."""
    if test_scores.shape[1] != stats.lse.shape[0]:
        raise ValueError(
            f"gallery sizes differ: test {tuple(test_scores.shape)} vs "
            f"querybank statistics over {stats.lse.shape[0]} items"
        )
    test = _working(test_scores)
    normalise = stats.active.to(test.device)[test.argmax(dim=1)]
    log_is = beta * test - stats.lse.to(test.device, test.dtype)
    return torch.where(normalise[:, None], log_is, test)


def qb_norm(
    test_scores: Tensor, querybank_scores: Tensor, beta: float = 20.0, k: int = 1
) -> Tensor:
    """QB-Norm with the dynamic inverted softmax (Bogolin et al., CVPR 2022, eqs 3-5).

    `test_scores` [P, J]: test queries x gallery; `querybank_scores` [Q, J]: training
    queries x the same gallery. Activation set A = gallery items that are in the top-k of at
    least one querybank query. A test row whose own top-1 item is in A is replaced by the
    inverted softmax IS_pj = exp(beta*s_pj) / sum_q exp(beta*s_qj); other rows keep their raw
    scores (that gating is what makes it "dynamic": items the querybank never retrieves are
    not hubs, and normalising them only adds noise).

    Returned normalised rows hold log IS_pj = beta*s_pj - LSE_q(beta*s_qj): the log is
    monotone, so every row ranks exactly as with the paper's value, and it cannot overflow.
    """
    if test_scores.shape[1] != querybank_scores.shape[1]:
        raise ValueError(
            f"gallery sizes differ: test {tuple(test_scores.shape)} vs "
            f"querybank {tuple(querybank_scores.shape)}"
        )
    test = _working(test_scores)
    bank = _working(querybank_scores).to(test.dtype)
    return qb_norm_apply(test, qb_norm_statistics(bank, beta, k), beta)


def dual_softmax(scores: Tensor, temperature: float = 0.01) -> Tensor:
    """Dual softmax inference (CAMoE, Cheng et al. 2021): s_pj * softmax_p(s_pj / T).

    `scores` [P, J] are test queries x gallery; the prior is a softmax over the *query* axis
    (dim 0) for each gallery item. It therefore uses all other test queries to rescore one
    query: that leaks test-set information and is reported only as a comparison point.
    """
    working = _working(scores)
    return working * torch.softmax(working / temperature, dim=0)

"""Sinkhorn text biases (GPA eq 10), its blockwise form, and the QB-Norm / DSL baselines."""

from __future__ import annotations

import math

import pytest
import torch

from gpa_ray.sinkhorn import (
    column_lse,
    column_potential,
    combine_column_lse,
    dual_softmax,
    qb_norm,
    qb_norm_statistics,
    row_potential,
    sinkhorn_potentials,
    sinkhorn_potentials_blockwise,
    transport_plan,
)
from gpa_ray.sinkhorn_fast import column_lse_fast, qb_norm_statistics_fast, row_potential_fast

R_3X4 = [[0.9, 0.1, 0.4, 0.2], [0.8, 0.3, 0.1, 0.0], [0.7, 0.2, 0.6, 0.5]]


def _lse(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def loop_sinkhorn(r: list[list[float]], eps: float, n_iter: int) -> tuple[list, list]:
    """GPA eq 10 written as plain Python loops over scalars (g starts at 0; f then g)."""
    n_rows, n_cols = len(r), len(r[0])
    f, g = [0.0] * n_rows, [0.0] * n_cols
    for _ in range(n_iter):
        f = [
            eps * math.log(1 / n_rows) - eps * _lse([(r[i][j] + g[j]) / eps for j in range(n_cols)])
            for i in range(n_rows)
        ]
        g = [
            eps * math.log(1 / n_cols) - eps * _lse([(r[i][j] + f[i]) / eps for i in range(n_rows)])
            for j in range(n_cols)
        ]
    return f, g


def test_matches_plain_loop_on_3x4() -> None:
    # Expected numbers: `loop_sinkhorn(R_3X4, eps=0.1, n_iter=10)` above, run once and
    # rounded to 1e-10. Text 0 scores high for every query (a hub) and gets the lowest bias.
    expected_f = [-0.845796025, -0.8011803723, -1.0198058874]
    expected_g = [-0.2397392504, 0.3505105556, 0.2206843489, 0.3516365821]
    loop_f, loop_g = loop_sinkhorn(R_3X4, 0.1, 10)
    assert loop_f == pytest.approx(expected_f, abs=1e-9)
    assert loop_g == pytest.approx(expected_g, abs=1e-9)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
        f, g = sinkhorn_potentials(torch.tensor(R_3X4, dtype=dtype), epsilon=0.1, n_iter=10)
        assert f.tolist() == pytest.approx(expected_f, abs=tol)
        assert g.tolist() == pytest.approx(expected_g, abs=tol)
        assert int(torch.argmin(g)) == 0


def test_defaults_are_ten_rounds_and_our_epsilon() -> None:
    # n_iter 10 is GPA's (section 3.1); epsilon 0.05 is ours: the paper gives none.
    r = torch.tensor(R_3X4, dtype=torch.float64)
    f, g = sinkhorn_potentials(r)
    loop_f, loop_g = loop_sinkhorn(R_3X4, 0.05, 10)
    assert f.tolist() == pytest.approx(loop_f, abs=1e-9)
    assert g.tolist() == pytest.approx(loop_g, abs=1e-9)


def test_plan_marginals_after_convergence() -> None:
    torch.manual_seed(0)
    r = torch.rand(7, 11, dtype=torch.float64)
    f, g = sinkhorn_potentials(r, epsilon=0.1, n_iter=500)
    plan = transport_plan(r, f, g, 0.1)
    assert plan.sum(dim=0).tolist() == pytest.approx([1 / 11] * 11, abs=1e-12)
    assert plan.sum(dim=1).tolist() == pytest.approx([1 / 7] * 7, abs=1e-9)


def test_matches_pot_sinkhorn_log() -> None:
    bregman = pytest.importorskip(
        "ot.bregman", reason="POT (independent Sinkhorn) is not installed"
    )
    torch.manual_seed(1)
    r = torch.rand(6, 9, dtype=torch.float64)
    eps = 0.1
    f, g = sinkhorn_potentials(r, epsilon=eps, n_iter=2000)
    ours = transport_plan(r, f, g, eps).numpy()
    a = torch.full((6,), 1 / 6, dtype=torch.float64).numpy()
    b = torch.full((9,), 1 / 9, dtype=torch.float64).numpy()
    # POT minimises <P, M> - eps*H(P): the cost is the negated score.
    theirs = bregman.sinkhorn_log(a, b, (-r).numpy(), eps, numItermax=5000, stopThr=1e-14)
    assert abs(ours - theirs).max() < 1e-10


def test_blockwise_equals_full() -> None:
    torch.manual_seed(2)
    r = torch.randn(23, 17)
    f_full, g_full = sinkhorn_potentials(r, epsilon=0.05, n_iter=10)
    blocks = [r[:5], r[5:6], r[6:20], r[20:]]
    f_seq, g_seq = sinkhorn_potentials_blockwise(blocks, epsilon=0.05, n_iter=10)
    f_call, g_call = sinkhorn_potentials_blockwise(
        lambda: (r[i : i + 4] for i in range(0, 23, 4)), epsilon=0.05, n_iter=10, n_rows_total=23
    )
    for f, g in ((f_seq, g_seq), (f_call, g_call)):
        assert torch.allclose(f, f_full, atol=1e-5, rtol=0)
        assert torch.allclose(g, g_full, atol=1e-5, rtol=0)


def test_driver_loop_with_the_building_blocks() -> None:
    # What the distributed job does: actors compute f for their rows and a column LSE; the
    # driver combines the J-vectors and broadcasts the new g.
    torch.manual_seed(3)
    r = torch.randn(12, 8, dtype=torch.float64)
    shards = [r[:4], r[4:9], r[9:]]
    g = torch.zeros(8, dtype=torch.float64)
    for _ in range(10):
        partials = []
        for shard in shards:
            f_shard = row_potential(shard, g, 0.05, n_rows_total=12)
            partials.append(column_lse(shard, f_shard, 0.05))
        g = column_potential(combine_column_lse(partials), 0.05)
    _, g_full = sinkhorn_potentials(r, 0.05, 10)
    assert torch.allclose(g, g_full, atol=1e-12, rtol=0)


def test_callable_blocks_need_row_count() -> None:
    with pytest.raises(ValueError, match="n_rows_total"):
        sinkhorn_potentials_blockwise(lambda: [torch.zeros(2, 2)])


def test_stable_at_extreme_scale_fp32() -> None:
    # |R| / eps = 500 / 0.05 = 1e4 in fp32: log-domain updates must stay finite.
    torch.manual_seed(4)
    r = torch.sign(torch.randn(40, 30)) * 500.0
    r[0, 0] = -500.0
    f, g = sinkhorn_potentials(r, epsilon=0.05, n_iter=10)
    assert torch.isfinite(f).all() and torch.isfinite(g).all()
    plan = transport_plan(r, f, g, 0.05)
    assert torch.isfinite(plan).all()
    assert torch.allclose(plan.sum(dim=0), torch.full((30,), 1 / 30), rtol=1e-3)
    f_b, g_b = sinkhorn_potentials_blockwise([r[:13], r[13:]], epsilon=0.05, n_iter=10)
    assert torch.isfinite(f_b).all() and torch.isfinite(g_b).all()
    # Relative fp32 precision at magnitude 500 is ~3e-5, so compare at that scale.
    assert torch.allclose(g_b, g, atol=1e-3, rtol=0)


def test_half_precision_input_is_promoted() -> None:
    r = torch.tensor(R_3X4)
    f16, g16 = sinkhorn_potentials(r.half(), epsilon=0.1, n_iter=10)
    assert f16.dtype == torch.float32 and g16.dtype == torch.float32
    assert g16.tolist() == pytest.approx(loop_sinkhorn(R_3X4, 0.1, 10)[1], abs=1e-3)


BANK = [[0.9, 0.1, 0.0], [0.8, 0.2, 0.1]]
TEST = [[0.5, 0.4, 0.1], [0.2, 0.6, 0.3], [0.7, 0.1, 0.2]]


def test_qb_norm_hand_case() -> None:
    # beta = 1, k = 1: both querybank rows retrieve item 0 first, so A = {0}. Test rows 0 and
    # 2 have top-1 item 0 and are normalised; row 1 (top-1 item 1) keeps its raw scores.
    # Normaliser N_j = log(sum_q exp(s_qj)): N_0 = 0.8 + log(1 + e^0.1) = 1.5443966601,
    # N_1 = 0.1 + log(1 + e^0.1) = 0.8443966601, N_2 = log(1 + e^0.1) = 0.7443966601;
    # normalised entries are s_pj - N_j.
    out = qb_norm(
        torch.tensor(TEST, dtype=torch.float64), torch.tensor(BANK, dtype=torch.float64), 1.0, 1
    )
    expected = [
        [0.5 - 1.5443966601, 0.4 - 0.8443966601, 0.1 - 0.7443966601],
        [0.2, 0.6, 0.3],
        [0.7 - 1.5443966601, 0.1 - 0.8443966601, 0.2 - 0.7443966601],
    ]
    for row, exp_row in zip(out.tolist(), expected, strict=True):
        assert row == pytest.approx(exp_row, abs=1e-9)
    # exp of a normalised row is the paper's inverted softmax exp(beta s) / sum_q exp(beta s_q).
    paper = math.exp(0.5) / (math.exp(0.9) + math.exp(0.8))
    assert math.exp(out[0, 0].item()) == pytest.approx(paper, rel=1e-12)


def test_qb_norm_top_k_widens_the_activation_set() -> None:
    # k = 2: both querybank rows have items {0, 1} in their top 2, so row 1 (top-1 = item 1)
    # is normalised too: [0.2 - 1.5443966601, 0.6 - 0.8443966601, 0.3 - 0.7443966601].
    out = qb_norm(
        torch.tensor(TEST, dtype=torch.float64), torch.tensor(BANK, dtype=torch.float64), 1.0, 2
    )
    assert out[1].tolist() == pytest.approx([-1.3443966601, -0.2443966601, -0.4443966601], abs=1e-9)


def test_qb_norm_is_stable_with_large_beta() -> None:
    bank = torch.tensor(BANK) * 1000
    out = qb_norm(torch.tensor(TEST) * 1000, bank, beta=20.0, k=1)
    assert torch.isfinite(out).all()


def test_dual_softmax_hand_case() -> None:
    # T = 0.1. Column 0 prior: softmax over queries of (5, 1) = (1/(1+e^-4), 1/(1+e^4))
    # = (0.9820137900, 0.0179862100); column 1: softmax of (2, 4) = (0.1192029220, 0.8807970780).
    # Output = score * prior: [[0.5*0.98201379, 0.2*0.11920292], [0.1*0.01798621, 0.4*0.88079708]].
    out = dual_softmax(torch.tensor([[0.5, 0.2], [0.1, 0.4]], dtype=torch.float64), 0.1)
    assert out[0].tolist() == pytest.approx([0.491006895, 0.0238405844], abs=1e-9)
    assert out[1].tolist() == pytest.approx([0.001798621, 0.3523188312], abs=1e-9)


@pytest.mark.parametrize("epsilon", [0.05, 1.0])
def test_fast_block_updates_equal_the_reference(epsilon: float) -> None:
    # The bias job's one-temporary log-sum-exp against row_potential / column_lse, on a
    # block with a hub column and scores whose exponents / eps reach +-1e4.
    gen = torch.Generator().manual_seed(5)
    block = torch.rand(37, 53, generator=gen) * 3 - 1
    block[:, 7] += 2.0
    g = torch.randn(53, generator=gen)
    f_ref = row_potential(block, g, epsilon, n_rows_total=1000)
    f_fast = row_potential_fast(block, g, epsilon, n_rows_total=1000)
    assert torch.allclose(f_fast, f_ref, atol=1e-6, rtol=0)
    lse_ref = column_lse(block, f_ref, epsilon)
    assert torch.allclose(column_lse_fast(block, f_ref, epsilon), lse_ref, atol=1e-4 / epsilon)
    huge = torch.sign(torch.randn(20, 30, generator=gen)) * 500.0
    f_huge = row_potential_fast(huge, torch.zeros(30), 0.05, 20)
    assert torch.isfinite(f_huge).all()
    assert torch.allclose(f_huge, row_potential(huge, torch.zeros(30), 0.05, 20), atol=1e-3)


def test_fast_block_updates_run_the_same_sinkhorn() -> None:
    torch.manual_seed(6)
    r = torch.rand(40, 25) * 2 - 1
    _, g_ref = sinkhorn_potentials(r, 0.05, 10)
    g = torch.zeros(25)
    for _ in range(10):
        partials = []
        for block in (r[:16], r[16:]):
            partials.append(column_lse_fast(block, row_potential_fast(block, g, 0.05, 40), 0.05))
        g = column_potential(combine_column_lse(partials), 0.05)
    assert torch.allclose(g, g_ref, atol=1e-6, rtol=0)


def test_fast_qb_norm_statistics_equal_the_reference() -> None:
    gen = torch.Generator().manual_seed(7)
    bank = torch.rand(19, 23, generator=gen) * 2 - 1
    for k in (1, 3):
        ref = qb_norm_statistics(bank, beta=20.0, k=k)
        fast = qb_norm_statistics_fast(bank, beta=20.0, k=k)
        assert torch.allclose(fast.lse, ref.lse, atol=1e-5, rtol=0)
        assert torch.equal(fast.active, ref.active)

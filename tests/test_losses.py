"""Losses pinned to numbers worked out by hand or by explicit Python loops over scalars."""

from __future__ import annotations

import math

import pytest
import torch

from gpa_ray.losses import (
    bce_loss,
    ce_loss,
    classification_loss,
    cwcl_loss,
    cwcl_weights,
    ft2_loss,
    info_nce_loss,
    lsep_loss,
    mlm_loss,
    mpc_loss,
    nt_xent_loss,
    triplet_sum_loss,
)

# Rows are audio, columns text; the diagonal holds the positives.
SIM = [[0.5, 0.6, 0.1], [0.2, 0.4, 0.3], [0.45, 0.1, 0.3]]
CLIPS = [0, 0, 1]  # items 0 and 1 are two captions of the same clip
TEXT_FEATURES = [[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]]


def _t(rows: list, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


def _transpose(m: list[list[float]]) -> list[list[float]]:
    return [list(col) for col in zip(*m, strict=True)]


def _excluded(i: int, k: int, clips: list[int] | None) -> bool:
    return clips is not None and k != i and clips[k] == clips[i]


def loop_ce_direction(m: list[list[float]], tau: float, clips: list[int] | None) -> float:
    """mean_i -log(exp(m_ii/tau) / sum_{k kept} exp(m_ik/tau)) with plain loops."""
    total = 0.0
    for i, row in enumerate(m):
        denom = sum(math.exp(v / tau) for k, v in enumerate(row) if not _excluded(i, k, clips))
        total += -math.log(math.exp(row[i] / tau) / denom)
    return total / len(m)


def loop_nt_xent(m: list[list[float]], tau: float, clips: list[int] | None = None) -> float:
    """GPA eq 12: -(1/B) (sum_i a2t_i + sum_i t2a_i), the two directions summed."""
    return loop_ce_direction(m, tau, clips) + loop_ce_direction(_transpose(m), tau, clips)


def loop_info_nce(audio: list[list[float]], text: list[list[float]]) -> float:
    """Eq 1 of "Good, Fast, Cheap" from embeddings: L2-normalise, then
    -mean_i log(exp(s_a,i . s_t,i) / sum_j exp(s_a,i . s_t,j)), scale 1, audio as anchor."""

    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    a = [unit(v) for v in audio]
    t = [unit(v) for v in text]
    total = 0.0
    for i in range(len(a)):
        dots = [sum(x * y for x, y in zip(a[i], t[j], strict=True)) for j in range(len(t))]
        total += -math.log(math.exp(dots[i]) / sum(math.exp(d) for d in dots))
    return total / len(a)


def loop_cwcl(m, feats, tau, clips=None) -> float:
    """CWCL with per-row normalised weights (1 + cos)/2 (1 for same-clip pairs), plain loops."""

    def cos(u, v):
        return sum(a * b for a, b in zip(u, v, strict=True)) / (
            math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v))
        )

    n = len(m)
    w = [[(1 + cos(feats[i], feats[k])) / 2 for k in range(n)] for i in range(n)]
    for i in range(n):
        for k in range(n):
            if _excluded(i, k, clips):
                w[i][k] = 1.0
        s = sum(w[i])
        w[i] = [x / s for x in w[i]]

    def direction(mat):
        total = 0.0
        for i, row in enumerate(mat):
            lse = math.log(sum(math.exp(v / tau) for v in row))
            total += -sum(w[i][k] * (row[k] / tau - lse) for k in range(n))
        return total / n

    return 0.5 * (direction(m) + direction(_transpose(m)))


def loop_mpc(views: list[list[list[float]]], tau: float, clips: list[int] | None = None) -> float:
    """AudioFormer eq 8 written from the paper with plain loops over scalars: per anchor
    clip d, log(1 + sum_{a != d} sum_{c=1..N} e^{sim(d_1, a_c)/tau} *
    sum_{c=2..N} e^{-sim(d_1, d_c)/tau}), averaged over the batch; with `clips`, another
    item of d's clip is not an "other audio" a."""

    def cos(u, v):
        return sum(a * b for a, b in zip(u, v, strict=True)) / (
            math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v))
        )

    n_clips, n_views = len(views), len(views[0])
    total = 0.0
    for d in range(n_clips):
        anchor = views[d][0]
        negatives = sum(
            math.exp(cos(anchor, views[a][c]) / tau)
            for a in range(n_clips)
            if a != d and (clips is None or clips[a] != clips[d])
            for c in range(n_views)
        )
        positives = sum(math.exp(-cos(anchor, views[d][c]) / tau) for c in range(1, n_views))
        total += math.log(1 + negatives * positives)
    return total / n_clips


def test_triplet_sum_hand_values() -> None:
    # a2t hinge sums per row (m = 0.2): row0 [.2-.5+.6]=.3, row1 [.2-.4+.3]=.1,
    # row2 [.2-.3+.45]=.35 -> mean .25; t2a per column: col0 [.2-.5+.45]=.15,
    # col1 [.2-.4+.6]=.4, col2 [.2-.3+.3]=.2 -> mean .25. Total 0.5.
    assert triplet_sum_loss(_t(SIM)).item() == pytest.approx(0.5, abs=1e-12)
    # Same-clip pairs (0,1) and (1,0) leave the negatives: a2t row0 loses .3 -> mean .45/3;
    # t2a col1 loses .4 -> mean .35/3. Total .8/3.
    value = triplet_sum_loss(_t(SIM), clip_ids=torch.tensor(CLIPS)).item()
    assert value == pytest.approx(0.8 / 3, abs=1e-12)


def test_nt_xent_pinned() -> None:
    # Expected: loop_nt_xent(SIM, tau) run once (plain Python, rounded to 1e-10).
    assert loop_nt_xent(SIM, 0.07) == pytest.approx(2.7356060628, abs=1e-9)
    assert loop_nt_xent(SIM, 0.1) == pytest.approx(2.2825497516, abs=1e-9)
    assert nt_xent_loss(_t(SIM)).item() == pytest.approx(2.7356060628, abs=1e-9)
    assert nt_xent_loss(_t(SIM), 0.1).item() == pytest.approx(2.2825497516, abs=1e-9)


def test_nt_xent_is_the_sum_of_both_directions() -> None:
    # Eq 12 adds the a2t and t2a terms (no 1/2): on a random matrix the loss equals the
    # sum of the two one-directional cross-entropies, each a plain loop.
    torch.manual_seed(3)
    m = torch.randn(4, 4, dtype=torch.float64).tolist()
    a2t, t2a = loop_ce_direction(m, 0.07, None), loop_ce_direction(_transpose(m), 0.07, None)
    assert nt_xent_loss(_t(m)).item() == pytest.approx(a2t + t2a, abs=1e-9)


def test_duplicate_masking_removes_same_clip_negatives() -> None:
    # loop_nt_xent(SIM, 0.07, CLIPS): the (0,1) and (1,0) terms leave the denominators.
    assert loop_nt_xent(SIM, 0.07, CLIPS) == pytest.approx(1.2038406642, abs=1e-9)
    masked = nt_xent_loss(_t(SIM), clip_ids=torch.tensor(CLIPS)).item()
    assert masked == pytest.approx(1.2038406642, abs=1e-9)
    # Fewer negatives can only lower a softmax cross-entropy.
    assert masked < nt_xent_loss(_t(SIM)).item()
    # Distinct clip ids change nothing.
    distinct = nt_xent_loss(_t(SIM), clip_ids=torch.tensor([7, 8, 9])).item()
    assert distinct == pytest.approx(2.7356060628, abs=1e-9)


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_info_nce_is_eq_1_of_good_fast_cheap(batch: int) -> None:
    # Eq 1 from raw embeddings by a plain loop: cosine logits at scale 1, audio anchors.
    gen = torch.Generator().manual_seed(batch)
    audio = torch.randn(batch, 5, dtype=torch.float64, generator=gen)
    text = torch.randn(batch, 5, dtype=torch.float64, generator=gen)
    sim = torch.nn.functional.normalize(audio, dim=1) @ torch.nn.functional.normalize(text, dim=1).T
    expected = loop_info_nce(audio.tolist(), text.tolist())
    assert info_nce_loss(sim).item() == pytest.approx(expected, abs=1e-12)


def test_info_nce_pinned_one_direction_scale_one() -> None:
    # loop_ce_direction(SIM, 1.0, ...) run once: one direction (rows = audio), no temperature.
    assert loop_ce_direction(SIM, 1.0, None) == pytest.approx(1.0382944607, abs=1e-9)
    assert info_nce_loss(_t(SIM)).item() == pytest.approx(1.0382944607, abs=1e-9)
    # The t2a direction is not part of eq 1: transposing the matrix changes the loss.
    assert info_nce_loss(_t(SIM).T).item() != pytest.approx(1.0382944607, abs=1e-6)
    masked = info_nce_loss(_t(SIM), clip_ids=torch.tensor(CLIPS)).item()
    assert masked == pytest.approx(loop_ce_direction(SIM, 1.0, CLIPS), abs=1e-12)


def test_info_nce_at_scale_one_is_bounded() -> None:
    # Cosine logits in [-1, 1]: no batch of 16 can exceed log(1 + 15 e^2) = 4.72, the bound
    # the info_nce docstring compares with the paper's Table 4.
    worst = torch.full((16, 16), 1.0, dtype=torch.float64)
    worst.fill_diagonal_(-1.0)
    assert info_nce_loss(worst).item() == pytest.approx(math.log(1 + 15 * math.e**2), abs=1e-12)
    assert math.log(1 + 15 * math.e**2) < 6.575


def test_cwcl_pinned() -> None:
    # Weights by hand: cos(t0,t1)=.6, cos(t0,t2)=0, cos(t1,t2)=-.8, so unnormalised
    # w = [[1, .8, .5], [.8, 1, .1], [.5, .1, 1]]; rows sum to 2.3, 1.9, 1.6.
    w = cwcl_weights(_t(TEXT_FEATURES))
    expected = [[1 / 2.3, 0.8 / 2.3, 0.5 / 2.3], [0.8 / 1.9, 1 / 1.9, 0.1 / 1.9]]
    expected.append([0.5 / 1.6, 0.1 / 1.6, 1 / 1.6])
    for row, exp_row in zip(w.tolist(), expected, strict=True):
        assert row == pytest.approx(exp_row, abs=1e-7)
    # Loss: loop_cwcl(SIM, TEXT_FEATURES, 0.07) run once.
    assert loop_cwcl(SIM, TEXT_FEATURES, 0.07) == pytest.approx(1.8834433551, abs=1e-9)
    assert cwcl_loss(_t(SIM), _t(TEXT_FEATURES)).item() == pytest.approx(1.8834433551, abs=1e-9)
    # Same-clip pairs get weight 1 before normalising: loop_cwcl(..., CLIPS) run once.
    assert loop_cwcl(SIM, TEXT_FEATURES, 0.07, CLIPS) == pytest.approx(1.8848806958, abs=1e-9)
    masked = cwcl_loss(_t(SIM), _t(TEXT_FEATURES), clip_ids=torch.tensor(CLIPS)).item()
    assert masked == pytest.approx(1.8848806958, abs=1e-9)


def test_cwcl_with_one_hot_weights_is_nt_xent() -> None:
    # Two texts with cosine -1 get cross weight (1 + (-1)) / 2 = 0: the targets are one-hot
    # and CWCL reduces to NT-Xent (CWCL averages its two directions; eq 12 sums them).
    sim = _t([[0.9, 0.2], [0.1, 0.7]])
    feats = _t([[1.0, 0.0], [-1.0, 0.0]])
    expected = 0.5 * nt_xent_loss(sim).item()
    assert cwcl_loss(sim, feats).item() == pytest.approx(expected, abs=1e-9)


def test_cwcl_targets_carry_no_gradient() -> None:
    feats = _t(TEXT_FEATURES).requires_grad_(True)
    sim = _t(SIM).requires_grad_(True)
    cwcl_loss(sim, feats).backward()
    assert feats.grad is None and sim.grad is not None


@pytest.mark.parametrize("name", ["triplet", "nt_xent", "info_nce", "cwcl"])
def test_rectangular_local_losses_average_to_the_global_loss(name: str) -> None:
    # Two "workers" with 3 local rows each against 6 global keys: the mean of their local
    # losses equals the loss of the full square matrix (every loss averages over rows).
    torch.manual_seed(0)
    sim = torch.randn(6, 6, dtype=torch.float64)
    clips = torch.tensor([0, 0, 1, 2, 2, 3])
    feats = torch.randn(6, 4, dtype=torch.float64)

    def loss(s, **kw):
        if name == "triplet":
            return triplet_sum_loss(s, **kw)
        if name == "nt_xent":
            return nt_xent_loss(s, **kw)
        if name == "info_nce":
            kw.pop("sim_t2a", None)
            return info_nce_loss(s, **kw)
        return cwcl_loss(s, feats, **kw)

    full = loss(sim, clip_ids=clips)
    local = []
    for rows in (slice(0, 3), slice(3, 6)):
        index = torch.arange(6)[rows]
        local.append(loss(sim[rows], sim_t2a=sim.T[rows], positive_index=index, clip_ids=clips))
    assert (0.5 * (local[0] + local[1])).item() == pytest.approx(full.item(), abs=1e-12)


def test_rectangular_needs_both_matrices() -> None:
    with pytest.raises(ValueError, match="positive_index"):
        nt_xent_loss(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="sim_t2a"):
        nt_xent_loss(torch.zeros(2, 4), positive_index=torch.tensor([0, 1]))


def test_retrieval_losses_finite_at_extreme_logits() -> None:
    sim = torch.tensor([[1e4, -1e4, 1e4], [-1e4, -1e4, 1e4], [1e4, 1e4, -1e4]])
    sim.requires_grad_(True)
    feats = torch.randn(3, 4)
    clips = torch.tensor([0, 0, 1])
    for value in (
        triplet_sum_loss(sim, clip_ids=clips),
        nt_xent_loss(sim, clip_ids=clips),
        info_nce_loss(sim),
        cwcl_loss(sim, feats, clip_ids=clips),
    ):
        (grad,) = torch.autograd.grad(value, sim)
        assert torch.isfinite(value) and torch.isfinite(grad).all()


def test_lsep_hand_values() -> None:
    # Sample 0: pos {0, 2}, neg {1}: log(1 + e^(-1-2) + e^(-1-0.5)) = log(1.2729172285)
    # = 0.2413112967; sample 1: pos {2}, neg {0, 1}: log(1 + e^(0-3) + e^(1-3))
    # = log(1.1851223516) = 0.1698460196; mean = 0.2055786581.
    logits = _t([[2.0, -1.0, 0.5], [0.0, 1.0, 3.0]])
    targets = _t([[1, 0, 1], [0, 0, 1]])
    expected = 0.5 * (
        math.log(1 + math.exp(-3) + math.exp(-1.5)) + math.log(1 + math.exp(-3) + math.exp(-2))
    )
    assert expected == pytest.approx(0.2055786581, abs=1e-9)
    assert lsep_loss(logits, targets).item() == pytest.approx(0.2055786581, abs=1e-9)


def test_lsep_empty_label_sets_and_extremes() -> None:
    # A sample with no positive (or all positive) contributes 0 and a zero gradient.
    logits = torch.tensor([[1e4, -1e4], [-1e4, 1e4], [3.0, 4.0], [5.0, 6.0]], requires_grad=True)
    targets = torch.tensor([[0, 1], [0, 1], [0, 0], [1, 1]])
    value = lsep_loss(logits, targets)
    (grad,) = torch.autograd.grad(value, logits)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    # Sample 0: log(1 + e^(1e4 - (-1e4))) = 2e4 (to fp32 precision); sample 1: log(1 + e^-2e4) = 0.
    assert value.item() == pytest.approx(2e4 / 4, rel=1e-6)
    assert grad[2:].abs().sum().item() == 0.0


def test_bce_and_ce_wrappers() -> None:
    logits = _t([[0.3, -1.2], [2.0, 0.5]])
    # BCE by hand: mean of -[y log sigmoid(x) + (1-y) log(1 - sigmoid(x))].
    targets = [[1, 0], [0, 1]]
    sig = [[1 / (1 + math.exp(-x)) for x in row] for row in logits.tolist()]
    terms = [
        -(y * math.log(p) + (1 - y) * math.log(1 - p))
        for prow, yrow in zip(sig, targets, strict=True)
        for p, y in zip(prow, yrow, strict=True)
    ]
    assert bce_loss(logits, _t(targets)).item() == pytest.approx(sum(terms) / 4, abs=1e-12)
    # CE by hand: mean of -log softmax at the label (labels 1, 0).
    ce_terms = [
        -(logits[0, 1].item() - math.log(math.exp(0.3) + math.exp(-1.2))),
        -(logits[1, 0].item() - math.log(math.exp(2.0) + math.exp(0.5))),
    ]
    expected_ce = sum(ce_terms) / 2
    assert ce_loss(logits, torch.tensor([1, 0])).item() == pytest.approx(expected_ce, abs=1e-12)
    assert ce_loss(logits, _t([[0, 1], [1, 0]])).item() == pytest.approx(expected_ce, abs=1e-12)
    assert classification_loss(logits, torch.tensor([1, 0]), "ce").item() == pytest.approx(
        expected_ce, abs=1e-12
    )
    with pytest.raises(ValueError, match="unknown classification loss"):
        classification_loss(logits, _t(targets), "hinge")


def test_mlm_loss_counts_masked_positions_only() -> None:
    logits = _t([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]]])
    labels = torch.tensor([[0, -100], [2, -100]])
    # Two masked tokens: -log softmax([2,0,0])[0] and -log softmax([0,0,3])[2], averaged.
    expected = 0.5 * (-(2.0 - math.log(math.exp(2) + 2)) + -(3.0 - math.log(math.exp(3) + 2)))
    assert mlm_loss(logits, labels).item() == pytest.approx(expected, abs=1e-12)
    assert mlm_loss(logits, torch.full((2, 2), -100)).item() == 0.0


VIEWS = [
    [[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]],
    [[0.0, 1.0], [-0.6, 0.8], [1.0, 1.0]],
]


def test_mpc_pinned() -> None:
    # Expected: loop_mpc(VIEWS, tau) run once (plain Python, rounded to 1e-10). By hand at
    # tau = 0.5: anchor (1, 0) has negative sum 1 + e^-1.2 + e^1.414 = 5.414 and positive
    # sum e^-1.6 + e^-1.2 = 0.503, so log(1 + 2.724) = 1.315; anchor (0, 1): 9.273 x 0.445
    # -> log(5.127) = 1.635; mean 1.475.
    assert loop_mpc(VIEWS, 0.05) == pytest.approx(2.2074185331, abs=1e-9)
    assert loop_mpc(VIEWS, 0.5) == pytest.approx(1.4746219775, abs=1e-9)
    assert mpc_loss(_t(VIEWS)).item() == pytest.approx(2.2074185331, abs=1e-9)
    assert mpc_loss(_t(VIEWS), 0.5).item() == pytest.approx(1.4746219775, abs=1e-9)


@pytest.mark.parametrize(
    ("n_clips", "n_views", "tau", "seed"),
    [(2, 2, 0.05, 0), (3, 4, 0.05, 1), (5, 3, 0.1, 2), (4, 2, 0.5, 3), (6, 4, 0.07, 4)],
)
def test_mpc_equals_eq8_loop_on_random_views(
    n_clips: int, n_views: int, tau: float, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    views = torch.randn(n_clips, n_views, 5, dtype=torch.float64, generator=generator)
    assert mpc_loss(views, tau).item() == pytest.approx(loop_mpc(views.tolist(), tau), rel=1e-10)
    clips = torch.randint(0, max(2, n_clips - 1), (n_clips,), generator=generator)
    expected = loop_mpc(views.tolist(), tau, clips.tolist())
    assert mpc_loss(views, tau, clips).item() == pytest.approx(expected, rel=1e-10, abs=1e-15)


# Three items; items 0 and 2 are the same clip drawn twice (views of item 2 near item 0's).
VIEWS_REPEAT = [
    [[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]],
    [[0.0, 1.0], [-0.6, 0.8], [1.0, 1.0]],
    [[0.9, 0.1], [0.7, 0.7], [1.0, 0.2]],
]


def test_mpc_leaves_a_repeated_clip_out_of_the_negatives() -> None:
    # Expected: loop_mpc(VIEWS_REPEAT, 0.5[, clips]) run once (plain Python, rounded to 1e-10).
    assert loop_mpc(VIEWS_REPEAT, 0.5, [7, 8, 7]) == pytest.approx(1.5269010033, abs=1e-9)
    assert loop_mpc(VIEWS_REPEAT, 0.5) == pytest.approx(2.2898576024, abs=1e-9)
    views = _t(VIEWS_REPEAT)
    repeated = mpc_loss(views, 0.5, torch.tensor([7, 8, 7]))
    assert repeated.item() == pytest.approx(1.5269010033, abs=1e-9)
    # Distinct clip ids change nothing: the plain eq 8.
    distinct = mpc_loss(views, 0.5, torch.tensor([1, 2, 3])).item()
    assert distinct == pytest.approx(mpc_loss(views, 0.5).item(), abs=1e-12)
    assert distinct == pytest.approx(2.2898576024, abs=1e-9)
    # One clip everywhere: no anchor has another audio, every sum is empty, log(1) = 0,
    # with finite gradients.
    views.requires_grad_(True)
    alone = mpc_loss(views, 0.5, torch.tensor([4, 4, 4]))
    (grad,) = torch.autograd.grad(alone, views)
    assert alone.item() == 0.0 and torch.isfinite(grad).all()
    with pytest.raises(ValueError, match="clip_ids"):
        mpc_loss(views, 0.5, torch.tensor([1, 2]))


def test_mpc_tends_to_zero_with_identical_views_and_orthogonal_clips() -> None:
    # B = 3 clips, V = 4 views; clip b's views all equal e_b. Then s_pos = 1, s_neg = 0 and
    # every anchor's loss is log(1 + (B-1) V e^0 * (V-1) e^(-1/tau)): 0 in the limit tau -> 0
    # (about 5e-8 at the paper's tau = 0.05), not a SupCon floor of log(V - 1).
    n_clips, n_views = 3, 4
    views = torch.eye(3, dtype=torch.float64)[:, None, :].repeat(1, n_views, 1)
    previous = math.inf
    for tau in (0.5, 0.1, 0.05, 0.02):
        analytic = math.log1p((n_clips - 1) * n_views * (n_views - 1) * math.exp(-1 / tau))
        value = mpc_loss(views, tau).item()
        assert value == pytest.approx(analytic, rel=1e-9)
        assert value < previous
        previous = value
    assert mpc_loss(views, 0.05).item() < 1e-7
    # Swapping one view between clips 0 and 1 makes a positive a negative: larger loss.
    swapped = views.clone()
    swapped[0, 1], swapped[1, 1] = views[1, 1], views[0, 1]
    assert mpc_loss(swapped, 0.05).item() > 1.0
    torch.manual_seed(0)
    for _ in range(5):
        assert mpc_loss(torch.randn(3, 4, 3, dtype=torch.float64), 0.05).item() > 1.0


def test_mpc_finite_and_differentiable_at_extremes() -> None:
    views = torch.tensor(VIEWS) * 1e4
    views.requires_grad_(True)
    for tau in (0.05, 1e-4):
        value = mpc_loss(views, tau)
        (grad,) = torch.autograd.grad(value, views)
        assert torch.isfinite(value) and torch.isfinite(grad).all()


def test_ft2_combination() -> None:
    logits = _t([[2.0, -1.0, 0.5], [0.0, 1.0, 3.0]])
    targets = _t([[1, 0, 1], [0, 0, 1]])
    # 0.95 * LSEP (0.2055786581, above) + 0.05 * MPC (2.2074185331, above).
    expected = 0.95 * 0.2055786581 + 0.05 * 2.2074185331
    assert ft2_loss(logits, targets, _t(VIEWS)).item() == pytest.approx(expected, abs=1e-9)
    bce_mix = 0.5 * bce_loss(logits, targets) + 0.5 * mpc_loss(_t(VIEWS))
    value = ft2_loss(logits, targets, _t(VIEWS), alpha=0.5, classification="bce")
    assert value.item() == pytest.approx(bce_mix.item(), abs=1e-12)

"""Prototype scorers (GPA eqs 2-8) against a plain Python loop and hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from gpa_ray.models.scoring import (
    LASSScorer,
    MeanPoolScorer,
    SoftmaxWeightScorer,
    build_scorer,
    prototype_similarity,
    prototype_similarity_first,
)

Linear = tuple[list[list[float]], list[float]]


def _softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    e = [math.exp(x - top) for x in xs]
    return [v / sum(e) for v in e]


def _linear(layer: Linear, v: list[float]) -> list[float]:
    w, b = layer
    return [sum(w[r][c] * v[c] for c in range(len(v))) + b[r] for r in range(len(w))]


def _weights(v: list[float], layer: Linear | None) -> list[float]:
    """softmax(v), or softmax(L(softmax(v))) with a Linear L = (W, b)."""
    return _softmax(v) if layer is None else _softmax(_linear(layer, _softmax(v)))


def lass_reference(sp: list[list[float]], l_a: Linear | None, l_t: Linear | None) -> float:
    """GPA eqs 2-8 for one pair, written as loops straight from the equations.

    sp[i][j]: i = audio prototype (row), j = text prototype (column). L_a acts on vectors
    indexed by audio prototypes (columns of sp, then s_t), L_t on text-indexed vectors.
    With l_a = l_t = None this is the softmax-weight ablation.
    """
    ka, kt = len(sp), len(sp[0])
    s_a = []
    for j in range(kt):  # eqs 2-4: per column, weights over the audio rows
        column = [sp[i][j] for i in range(ka)]
        w = _weights(column, l_a)
        s_a.append(sum(w[i] * column[i] for i in range(ka)))
    w = _weights(s_a, l_t)  # eqs 5-7
    s_a_final = sum(w[j] * s_a[j] for j in range(kt))
    s_t = []
    for i in range(ka):  # roles swapped: per row, weights over the text columns
        row = sp[i]
        w = _weights(row, l_t)
        s_t.append(sum(w[j] * row[j] for j in range(kt)))
    w = _weights(s_t, l_a)
    s_t_final = sum(w[i] * s_t[i] for i in range(ka))
    return s_a_final + s_t_final  # eq 8


def _set_linear(layer: torch.nn.Linear, params: Linear) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(params[0]))
        layer.bias.copy_(torch.tensor(params[1]))


L_A: Linear = ([[1.0, 2.0], [-1.0, 0.5]], [0.1, -0.2])
L_T: Linear = ([[0.3, -1.0], [2.0, 0.0]], [0.0, 0.5])
SP = [[0.9, 0.1], [-0.3, 0.6]]


def test_lass_2x2_with_explicit_linear_weights() -> None:
    scorer = LASSScorer(2, 2)
    _set_linear(scorer.l_a, L_A)
    _set_linear(scorer.l_t, L_T)
    with torch.no_grad():
        got = float(scorer(torch.tensor(SP)))
    # 0.4647396738565249 was printed by lass_reference(SP, L_A, L_T) (the loop above).
    assert got == pytest.approx(lass_reference(SP, L_A, L_T), abs=1e-6)
    assert got == pytest.approx(0.4647396738565249, abs=1e-6)
    # The test is sensitive to the axis L acts on: transposed weights give another number
    # (0.2889864766110564 by the same loop), so a transposed implementation would fail.
    transposed = lass_reference(
        SP,
        ([list(r) for r in zip(*L_A[0], strict=True)], L_A[1]),
        ([list(r) for r in zip(*L_T[0], strict=True)], L_T[1]),
    )
    assert abs(transposed - got) > 0.1


def test_lass_identity_weights_hand_computed() -> None:
    # s_p = I (2 x 2), L_a = L_t = identity (the initialisation). Per column, softmax over
    # rows of (1, 0) is (s, 1 - s) with s = sigmoid(1); softmax of that is
    # (sigmoid(2s - 1), 1 - sigmoid(2s - 1)), so s_a = (sigmoid(2s - 1), sigmoid(2s - 1)).
    # Equal entries give uniform second-stage weights: s'_a = sigmoid(2s - 1). By symmetry
    # s'_t is the same, so s'_p = 2 sigmoid(2 sigmoid(1) - 1) = 1.2270326...
    scorer = LASSScorer(2, 2)
    s = 1 / (1 + math.exp(-1))
    expected = 2 / (1 + math.exp(-(2 * s - 1)))
    with torch.no_grad():
        assert float(scorer(torch.eye(2))) == pytest.approx(expected, abs=1e-6)
        # A constant s_p = c makes every weight uniform: s'_p = 2c.
        assert float(scorer(torch.full((2, 2), 0.3))) == pytest.approx(0.6, abs=1e-6)
    assert expected == pytest.approx(1.2270326, abs=1e-6)


def test_lass_vectorised_over_pairs_matches_the_loop_per_pair() -> None:
    torch.manual_seed(0)
    scorer = LASSScorer(4, 4)
    for layer in (scorer.l_a, scorer.l_t):
        torch.nn.init.normal_(layer.weight)
        torch.nn.init.normal_(layer.bias)
    s_p = torch.randn(3, 5, 4, 4)
    got = scorer(s_p).detach()
    assert got.shape == (3, 5)
    l_a = (scorer.l_a.weight.tolist(), scorer.l_a.bias.tolist())
    l_t = (scorer.l_t.weight.tolist(), scorer.l_t.bias.tolist())
    for a in range(3):
        for t in range(5):
            assert float(got[a, t]) == pytest.approx(
                lass_reference(s_p[a, t].tolist(), l_a, l_t), abs=1e-5
            )


def test_softmax_weight_scorer_matches_the_loop() -> None:
    torch.manual_seed(1)
    s_p = torch.randn(2, 3, 4, 4)
    got = SoftmaxWeightScorer()(s_p)
    for a in range(2):
        for t in range(3):
            expected = lass_reference(s_p[a, t].tolist(), None, None)
            assert float(got[a, t]) == pytest.approx(expected, abs=1e-5)


def test_mean_pool_scorer_hand_computed() -> None:
    # (0.9 + 0.1 - 0.3 + 0.6) / 4 = 0.325
    assert float(MeanPoolScorer()(torch.tensor(SP))) == pytest.approx(0.325, abs=1e-7)


def test_prototype_similarity_matches_a_loop() -> None:
    torch.manual_seed(2)
    pa, pt = torch.randn(2, 3, 5), torch.randn(4, 3, 5)
    s_p = prototype_similarity(pa, pt)
    assert s_p.shape == (2, 4, 3, 3)
    for a in range(2):
        for t in range(4):
            for i in range(3):
                for j in range(3):
                    dot = sum(
                        x * y for x, y in zip(pa[a, i].tolist(), pt[t, j].tolist(), strict=True)
                    )
                    assert float(s_p[a, t, i, j]) == pytest.approx(dot, abs=1e-5)


def test_lass_linear_layers_receive_gradients() -> None:
    scorer = LASSScorer(4, 4)
    scorer(torch.randn(3, 2, 4, 4)).sum().backward()
    for name, p in scorer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_build_scorer() -> None:
    assert isinstance(build_scorer("lass", 4, 4), LASSScorer)
    assert isinstance(build_scorer("mean", 4, 4), MeanPoolScorer)
    assert isinstance(build_scorer("softmax", 4, 4), SoftmaxWeightScorer)
    assert build_scorer("none", 4, 4) is None
    with pytest.raises(ValueError, match="lass"):
        build_scorer("max", 4, 4)


def test_prototype_similarity_first_is_the_same_matrix_with_prototype_axes_first() -> None:
    torch.manual_seed(3)
    pa, pt = torch.randn(5, 3, 8), torch.randn(7, 2, 8)
    first = prototype_similarity_first(pa, pt)
    assert first.shape == (3, 2, 5, 7)
    torch.testing.assert_close(first, prototype_similarity(pa, pt).permute(2, 3, 0, 1))


@pytest.mark.parametrize("kind", ["lass", "softmax", "mean"])
def test_score_pairs_equals_the_scorer_on_s_p_forward_and_backward(kind: str) -> None:
    """The prototype-first pool path (`score_pairs`) against forward() on the plain
    [A, T, Ka, Kt] s_p: same scores and same gradients for prototypes and L_a, L_t."""
    torch.manual_seed(4)
    scorer = build_scorer(kind, 4, 4)
    for p in scorer.parameters():
        torch.nn.init.normal_(p)
    pa = torch.randn(6, 4, 16, dtype=torch.float64, requires_grad=True)
    pt = torch.randn(5, 4, 16, dtype=torch.float64, requires_grad=True)
    scorer = scorer.double()
    weights = torch.randn(6, 5, dtype=torch.float64)

    def grads(scores: torch.Tensor) -> list[torch.Tensor]:
        params = [pa, pt, *scorer.parameters()]
        return list(torch.autograd.grad((scores * weights).sum(), params))

    simple = scorer(prototype_similarity(pa, pt))
    pooled = scorer.score_pairs(pa, pt)
    # Two audio rows per step: the reduction in 3 runs.
    scorer.pairs_per_thread = 10 // torch.get_num_threads()
    stepped = scorer.score_pairs(pa, pt)
    expected_grads = grads(simple)
    for path in (pooled, stepped):
        torch.testing.assert_close(path, simple, rtol=0, atol=1e-12)
        for got, expected in zip(grads(path), expected_grads, strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)

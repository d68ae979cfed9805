"""Prototype generators: eq 1 by hand and by loop, masking, the attention ablation."""

from __future__ import annotations

import math

import pytest
import torch

from gpa_ray.models.prototypes import (
    AttentionPrototypes,
    MaskPrototypes,
    build_prototype_generator,
)


def test_mask_prototypes_hand_computed() -> None:
    # D = 2, K = 1. Linear(t) = t_x (weight (1, 0), bias 0), so the memberships are
    # relu(1) = 1 and relu(3) = 3 for the two real tokens; the padded third token is ignored.
    # p_1 = 1 * (1, 2) + 3 * (3, -1) = (10, -1); p_2 = the global feature (0.5, 0.5).
    gen = MaskPrototypes(dim=2, n_prototypes=1)
    with torch.no_grad():
        gen.membership.weight.copy_(torch.tensor([[1.0, 0.0]]))
        gen.membership.bias.zero_()
    frames = torch.tensor([[[1.0, 2.0], [3.0, -1.0], [5.0, 5.0]]])
    mask = torch.tensor([[True, True, False]])
    out = gen(frames, mask, torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(out, torch.tensor([[[10.0, -1.0], [0.5, 0.5]]]))


def test_mask_prototypes_match_a_python_loop() -> None:
    torch.manual_seed(0)
    batch, n, dim, k = 2, 5, 4, 3
    gen = MaskPrototypes(dim, k)
    frames = torch.randn(batch, n, dim)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    global_ = torch.randn(batch, dim)
    out = gen(frames, mask, global_)
    assert out.shape == (batch, k + 1, dim)
    w = gen.membership.weight.tolist()
    b = gen.membership.bias.tolist()
    for bi in range(batch):
        for ki in range(k):
            expected = [0.0] * dim
            for j in range(n):
                if not mask[bi, j]:
                    continue
                t = frames[bi, j].tolist()
                m = max(0.0, sum(w[ki][d] * t[d] for d in range(dim)) + b[ki])
                expected = [e + m * t[d] for d, e in enumerate(expected)]
            torch.testing.assert_close(out[bi, ki], torch.tensor(expected), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[bi, k], global_[bi])


@pytest.mark.parametrize("kind", ["mask", "attention"])
def test_padding_content_never_leaks(kind: str) -> None:
    torch.manual_seed(1)
    gen = build_prototype_generator(kind, dim=8, n_prototypes=3, n_heads=2)
    frames = torch.randn(2, 6, 8)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    global_ = torch.randn(2, 8)
    garbage = frames.clone()
    garbage[1, 4:] = 1e3
    torch.testing.assert_close(gen(frames, mask, global_), gen(garbage, mask, global_))
    # The short item alone (no padding at all) gets the same prototypes.
    alone = gen(frames[1:, :4], mask[1:, :4], global_[1:])
    torch.testing.assert_close(gen(frames, mask, global_)[1:], alone, atol=1e-5, rtol=1e-5)


def test_attention_prototypes_match_a_python_loop() -> None:
    # One head: p_k = W_o softmax_j(q_k . k_j / sqrt(D)) v_j + b_o over the real positions,
    # with q = W_q query_k + b_q, k_j = W_k x_j + b_k, v_j = W_v x_j + b_v.
    torch.manual_seed(2)
    dim, k, n = 4, 2, 3
    gen = AttentionPrototypes(dim, k, n_heads=1)
    frames = torch.randn(1, n, dim)
    mask = torch.tensor([[True, True, False]])
    global_ = torch.randn(1, dim)
    out = gen(frames, mask, global_)
    wq, wk, wv = gen.attention.in_proj_weight.detach().chunk(3)
    bq, bk, bv = gen.attention.in_proj_bias.detach().chunk(3)
    wo, bo = gen.attention.out_proj.weight.detach(), gen.attention.out_proj.bias.detach()

    def affine(w: torch.Tensor, b: torch.Tensor, x: list[float]) -> list[float]:
        return [sum(w[r, c].item() * x[c] for c in range(dim)) + b[r].item() for r in range(dim)]

    real = [frames[0, j].tolist() for j in range(n) if mask[0, j]]
    keys = [affine(wk, bk, x) for x in real]
    values = [affine(wv, bv, x) for x in real]
    for ki in range(k):
        q = affine(wq, bq, gen.queries[ki].tolist())
        logits = [sum(a * b for a, b in zip(q, key, strict=True)) / math.sqrt(dim) for key in keys]
        z = sum(math.exp(x) for x in logits)
        mixed = [
            sum(math.exp(lg) / z * v[d] for lg, v in zip(logits, values, strict=True))
            for d in range(dim)
        ]
        expected = affine(wo, bo, mixed)
        torch.testing.assert_close(out[0, ki], torch.tensor(expected), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0, k], global_[0])


def test_attention_item_without_valid_positions_gives_zeros_not_nan() -> None:
    gen = AttentionPrototypes(dim=4, n_prototypes=2)
    frames = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    out = gen(frames, mask, torch.ones(2, 4))
    assert torch.isfinite(out).all()
    assert (out[1, :2] == 0).all() and (out[1, 2] == 1).all()


def test_both_generators_pass_gradients_to_their_parameters() -> None:
    for kind in ("mask", "attention"):
        gen = build_prototype_generator(kind, dim=8, n_prototypes=3)
        gen(
            torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool), torch.randn(2, 8)
        ).sum().backward()
        for name, p in gen.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (kind, name)


def test_unknown_generator_is_rejected() -> None:
    with pytest.raises(ValueError, match="mask"):
        build_prototype_generator("kmeans", 8, 3)

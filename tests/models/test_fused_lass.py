"""The fused LASS kernel (the bias job's fast path) against the plain torch path, forward."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpa_ray.models import fused_lass
from gpa_ray.models.scoring import LASSScorer

TOL = 1e-6


def _prototypes(n: int, k: int, dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, k, dim, generator=gen), dim=-1)


def _trained_lass(n_audio: int, n_text: int, seed: int) -> LASSScorer:
    """LASS with non-identity L_a, L_t, as after training (identities would hide a mix-up)."""
    scorer = LASSScorer(n_audio, n_text)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (scorer.l_a, scorer.l_t):
            layer.weight.add_(torch.randn(layer.weight.shape, generator=gen))
            layer.bias.add_(torch.randn(layer.bias.shape, generator=gen))
    return scorer


@pytest.mark.parametrize(
    ("n_audio_protos", "n_text_protos", "n_audio", "n_text"),
    [(4, 4, 9, 37), (4, 4, 1, 16), (2, 3, 5, 3), (3, 2, 17, 50)],
)
def test_fused_equals_plain_forward(
    n_audio_protos: int, n_text_protos: int, n_audio: int, n_text: int
) -> None:
    # Text counts off the 16-pair vector width exercise the tail; Ka != Kt catches a
    # transposed axis or a swapped L_a / L_t.
    scorer = _trained_lass(n_audio_protos, n_text_protos, seed=n_audio)
    audio = _prototypes(n_audio, n_audio_protos, 32, seed=1)
    text = _prototypes(n_text, n_text_protos, 32, seed=2)
    assert fused_lass.available(n_audio_protos, n_text_protos)
    with torch.inference_mode():
        plain = scorer.score_pairs(audio, text)
        scorer.fused = True
        assert scorer.uses_fused(audio, text)
        fused = scorer.score_pairs(audio, text)
    assert fused.shape == plain.shape == (n_audio, n_text)
    assert torch.allclose(fused, plain, atol=TOL, rtol=0)
    assert not torch.equal(plain, torch.zeros_like(plain))


def test_fused_splits_rows_over_threads_with_the_same_result() -> None:
    scorer = _trained_lass(4, 4, seed=3)
    audio, text = _prototypes(23, 4, 64, seed=4), _prototypes(41, 4, 64, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused_lass.lass_scores(audio, text, scorer.l_a, scorer.l_t)
        torch.set_num_threads(3)
        three = fused_lass.lass_scores(audio, text, scorer.l_a, scorer.l_t)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)


def test_plain_path_where_the_kernel_does_not_apply() -> None:
    scorer = _trained_lass(4, 4, seed=6)
    scorer.fused = True
    audio, text = _prototypes(3, 4, 8, seed=7), _prototypes(5, 4, 8, seed=8)
    # Training needs gradients: the kernel has no backward.
    scores = scorer.score_pairs(audio, text)
    assert scores.grad_fn is not None
    with torch.inference_mode():
        assert not scorer.uses_fused(audio.double(), text.double())
        assert scorer.uses_fused(audio, text)
    assert not LASSScorer(4, 4).uses_fused(audio, text)  # off unless asked


def test_without_a_compiler_the_kernel_is_unavailable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fused_lass, "COMPILER", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(fused_lass, "_cache_dir", lambda: tmp_path / "kernels")
    fused_lass._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="gpa_ray.models.fused_lass"):
            assert not fused_lass.available(4, 4)
    finally:
        fused_lass._library.cache_clear()
    assert "plain path" in caplog.text
    assert not list((tmp_path / "kernels").glob("*.so"))


def test_fused_equals_plain_when_similarities_are_far_apart() -> None:
    # Unnormalised prototypes (|s_p| up to hundreds): entries more than 80 below their
    # pair's maximum take the kernel's per-column / per-row shifted softmax instead.
    scorer = _trained_lass(4, 4, seed=9)
    audio, text = 20 * _prototypes(6, 4, 16, seed=10), 20 * _prototypes(35, 4, 16, seed=11)
    with torch.inference_mode():
        plain = scorer.score_pairs(audio, text)
        scorer.fused = True
        fused = scorer.score_pairs(audio, text)
    assert float(plain.abs().max()) > 100
    assert torch.allclose(fused, plain, rtol=1e-5, atol=1e-4)

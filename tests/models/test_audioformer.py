"""AudioFormer: masking, MLM loss on masked positions, FT1 pooling, FT2 freezing."""

from __future__ import annotations

import math

import pytest
import torch

from gpa_ray.audio.codec import BOA, CODE_OFFSET, EOA, MASK, PAD, VOCAB_SIZE
from gpa_ray.config import AudioFormerConfig
from gpa_ray.losses import ft2_loss, mlm_loss
from gpa_ray.models.audioformer import (
    IGNORE_INDEX,
    AudioFormerClassifier,
    AudioFormerEncoder,
    AudioFormerFT2,
    AudioFormerMLM,
    mask_tokens,
    roformer_config,
)
from gpa_ray.testing.models import tiny_audioformer_config, tiny_audioformer_encoder, tiny_code_ids


def _specials(ids: torch.Tensor) -> torch.Tensor:
    return (ids == BOA) | (ids == EOA) | (ids == PAD)


@pytest.mark.parametrize("bert_style", [(0.8, 0.1, 0.1), None])
def test_specials_are_never_masked(bert_style) -> None:
    ids = tiny_code_ids(batch=6, n_codes=30)
    assert _specials(ids).sum() > 2 * 6  # ragged: PAD present
    masked, labels = mask_tokens(ids, mask_prob=1.0, bert_style=bert_style)
    specials = _specials(ids)
    assert torch.equal(masked[specials], ids[specials])
    assert (labels[specials] == IGNORE_INDEX).all()
    # mask_prob = 1 selects every code and labels it with the original id.
    assert torch.equal(labels[~specials], ids[~specials])
    if bert_style is None:
        assert (masked[~specials] == MASK).all()


def test_masks_a_quarter_of_codes_on_average() -> None:
    ids = tiny_code_ids(batch=400, n_codes=100, seed=1)
    gen = torch.Generator().manual_seed(0)
    masked, labels = mask_tokens(ids, mask_prob=0.25, generator=gen)
    codes = ~_specials(ids)
    selected = labels != IGNORE_INDEX
    fraction = selected.sum().item() / codes.sum().item()
    assert abs(fraction - 0.25) < 0.02
    assert not (selected & ~codes).any()
    assert torch.equal(labels[selected], ids[selected])
    # BERT style among the selected: 80% MASK, 10% random code, 10% unchanged
    # (a random code equals the original with probability 1/1024, hence "about").
    as_mask = (masked[selected] == MASK).float().mean().item()
    unchanged = (masked[selected] == ids[selected]).float().mean().item()
    assert abs(as_mask - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.02
    replaced = masked[selected & (masked != MASK)]
    assert ((replaced >= CODE_OFFSET) & (replaced < MASK)).all()
    assert torch.equal(masked[~selected], ids[~selected])


def test_masking_is_reproducible_with_a_generator() -> None:
    ids = tiny_code_ids()
    first = mask_tokens(ids, generator=torch.Generator().manual_seed(7))
    second = mask_tokens(ids, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    with pytest.raises(ValueError, match="bert_style"):
        mask_tokens(ids, bert_style=(0.5, 0.1, 0.1))


def test_mlm_shapes_and_loss_counts_masked_positions_only() -> None:
    torch.manual_seed(0)
    model = AudioFormerMLM(tiny_audioformer_config(dropout=0.0)).eval()
    ids = tiny_code_ids(batch=3, n_codes=20)
    masked, labels = mask_tokens(ids, generator=torch.Generator().manual_seed(1))
    out = model(masked, labels=labels)
    assert out.logits.shape == (3, 22, VOCAB_SIZE)
    # Cross-entropy averaged over masked positions, with a plain loop.
    terms = [
        -torch.log_softmax(out.logits[b, t], dim=-1)[labels[b, t]]
        for b in range(3)
        for t in range(22)
        if labels[b, t] != IGNORE_INDEX
    ]
    torch.testing.assert_close(out.loss, sum(terms) / len(terms))
    # Changing logits where nothing is masked leaves the loss unchanged; at a masked one, not.
    unmasked = (labels == IGNORE_INDEX).unsqueeze(-1)
    noisy = out.logits + 5.0 * torch.randn_like(out.logits) * unmasked
    torch.testing.assert_close(mlm_loss(noisy, labels), out.loss)
    b, t = (labels != IGNORE_INDEX).nonzero()[0].tolist()
    bumped = out.logits.clone()
    bumped[b, t, labels[b, t]] += 3.0
    assert mlm_loss(bumped, labels) < out.loss


def test_encoder_mask_and_mean_pool() -> None:
    encoder = tiny_audioformer_encoder().eval()
    ids = tiny_code_ids(batch=3, n_codes=20)
    out = encoder(ids)
    assert out.frames.shape == (3, 22, 32) and encoder.out_dim == 32
    assert torch.equal(out.mask, ids != PAD)
    for b in range(3):
        valid = [out.frames[b, t] for t in range(22) if ids[b, t] != PAD]
        torch.testing.assert_close(out.global_[b], sum(valid) / len(valid))


def test_encoder_ignores_content_of_padded_positions() -> None:
    encoder = tiny_audioformer_encoder().eval()
    ids = tiny_code_ids(batch=2, n_codes=20)
    mask = ids != PAD
    other = ids.masked_fill(~mask, 500)
    a, b = encoder(ids, mask), encoder(other, mask)
    torch.testing.assert_close(a.global_, b.global_)
    torch.testing.assert_close(a.frames[mask], b.frames[mask])


def test_classifier_is_linear_on_pooled_tokens() -> None:
    torch.manual_seed(0)
    mlm = AudioFormerMLM(tiny_audioformer_config())
    encoder = AudioFormerEncoder.from_mlm(mlm)
    assert encoder.roformer is mlm.backbone  # the pre-trained backbone, MLM head dropped
    model = AudioFormerClassifier(encoder, n_classes=5).eval()
    ids = tiny_code_ids()
    logits = model(ids)
    assert logits.shape == (3, 5)
    pooled = encoder(ids).global_
    torch.testing.assert_close(logits, pooled @ model.classifier.weight.T + model.classifier.bias)


def test_ft2_trains_only_the_anchor() -> None:
    torch.manual_seed(0)
    cfg = tiny_audioformer_config()
    anchor = AudioFormerClassifier(AudioFormerEncoder.from_config(cfg), n_classes=4)
    frozen = [AudioFormerEncoder.from_config(cfg) for _ in range(3)]
    model = AudioFormerFT2(anchor, frozen).train()
    assert all(not m.training for m in model.frozen.modules())
    assert anchor.training
    ids = torch.stack([tiny_code_ids(seed=s) for s in range(4)], dim=1)  # [B=3, 4 views, L]
    out = model(ids)
    assert out.logits.shape == (3, 4) and out.views.shape == (3, 4, 32)
    targets = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0]])
    ft2_loss(out.logits, targets, out.views).backward()
    assert all(p.grad is not None for p in anchor.parameters() if p.requires_grad)
    for encoder in frozen:
        assert all(not p.requires_grad and p.grad is None for p in encoder.parameters())
    model.eval()
    with torch.no_grad():
        again = model(ids)
        torch.testing.assert_close(again.views[:, 0], anchor.encoder(ids[:, 0]).global_)
        for v, encoder in enumerate(frozen, start=1):
            torch.testing.assert_close(again.views[:, v], encoder(ids[:, v]).global_)
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[:, :2])


def test_paper_scale_config() -> None:
    config = roformer_config(AudioFormerConfig())
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (
        12,
        768,
        12,
    )
    assert config.vocab_size == VOCAB_SIZE == 1028 and config.pad_token_id == PAD
    with torch.device("meta"):
        model = AudioFormerMLM(AudioFormerConfig())
    n_params = sum(p.numel() for p in model.parameters())
    assert math.isclose(n_params / 1e6, 86.5, abs_tol=0.05)

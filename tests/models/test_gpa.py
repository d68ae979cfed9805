"""GPA model: R = S_g + S'_p, chunked pool scoring parity and memory, gradient flow."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gpa_ray.models.gpa import Embeddings, GPAModel
from gpa_ray.models.outputs import EncoderOutput
from gpa_ray.testing.models import (
    tiny_audio_batch,
    tiny_audio_encoder,
    tiny_gpa_config,
    tiny_gpa_model,
    tiny_text_encoder,
)
from gpa_ray.testing.synthetic import random_unit_embeddings

TEXTS = ["a dog barks", "rain on the roof", "a siren passes", "a man speaks", "birds chirps"]


@torch.no_grad()
def _naive_scores(model: GPAModel, audio: Embeddings, text: Embeddings) -> torch.Tensor:
    """R per pair with Python loops: dot products by hand, the scorer on one s_p at a time."""
    out = torch.zeros(len(audio), len(text))
    for a in range(len(audio)):
        for t in range(len(text)):
            s_g = sum(
                x * y
                for x, y in zip(audio.global_[a].tolist(), text.global_[t].tolist(), strict=True)
            )
            s_p = 0.0
            if model.scorer is not None:
                pa, pt = audio.prototypes[a].tolist(), text.prototypes[t].tolist()
                pair = [[sum(x * y for x, y in zip(pi, pj, strict=True)) for pj in pt] for pi in pa]
                s_p = float(model.scorer(torch.tensor(pair)))
            out[a, t] = s_g + s_p
    return out


def test_embeddings_are_normalised_with_k_plus_one_prototypes() -> None:
    model = tiny_gpa_model().eval()
    with torch.no_grad():
        audio, text = model(tiny_audio_batch(3), TEXTS)
    assert audio.global_.shape == (3, 16) and text.global_.shape == (5, 16)
    assert audio.prototypes.shape == (3, 4, 16) and text.prototypes.shape == (5, 4, 16)
    for emb in (audio, text):
        torch.testing.assert_close(emb.global_.norm(dim=-1), torch.ones(len(emb)))
        torch.testing.assert_close(emb.prototypes.norm(dim=-1), torch.ones(len(emb), 4))


def test_text_from_tokens_equals_text_from_strings() -> None:
    model = tiny_gpa_model().eval()
    tokens = model.text_encoder.tokenize(TEXTS)
    with torch.no_grad():
        direct, staged = model.embed_text(TEXTS), model.embed_text(tokens)
    torch.testing.assert_close(direct.global_, staged.global_)
    torch.testing.assert_close(direct.prototypes, staged.prototypes)


@pytest.mark.parametrize("scorer", ["lass", "mean", "softmax", "none"])
@pytest.mark.parametrize("prototype", ["mask", "attention"])
def test_batch_and_chunked_scores_equal_the_per_pair_loop(scorer: str, prototype: str) -> None:
    model = tiny_gpa_model(tiny_gpa_config(scorer=scorer, prototype=prototype)).eval()
    with torch.no_grad():
        audio, text = model(tiny_audio_batch(3), TEXTS)
        batch = model.score(audio, text)
        chunked = model.score_pool(audio, text, block_size=2, text_block_size=3)
    torch.testing.assert_close(batch, _naive_scores(model, audio, text), atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked, batch, atol=1e-5, rtol=0)


def test_chunked_pool_equals_batch_on_a_larger_pool_with_ragged_blocks() -> None:
    model = tiny_gpa_model().eval()
    with torch.no_grad():
        for layer in (model.scorer.l_a, model.scorer.l_t):
            torch.nn.init.normal_(layer.weight)
        audio, text = random_unit_embeddings(23, 16, 4, 0), random_unit_embeddings(17, 16, 4, 1)
        batch = model.score(audio, text)
        torch.testing.assert_close(
            model.score_pool(audio, text, block_size=5), batch, atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            model.score_pool(audio, text, block_size=64), batch, atol=1e-5, rtol=0
        )
        seen = torch.zeros(23, 17, dtype=torch.int64)
        for block in model.iter_score_tiles(audio, text, block_size=4, text_block_size=6):
            rows, cols = block.scores.shape
            assert rows <= 4 and cols <= 6
            window = (
                slice(block.audio_start, block.audio_start + rows),
                slice(block.text_start, block.text_start + cols),
            )
            torch.testing.assert_close(block.scores, batch[window], atol=1e-5, rtol=0)
            seen[window] += 1
    assert (seen == 1).all()
    with pytest.raises(ValueError, match="positive"):
        next(model.iter_score_tiles(audio, text, block_size=0))


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces (every intermediate passes here)."""

    def __init__(self, ignore_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.ignore_shape = ignore_shape
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor) and tuple(item.shape) != self.ignore_shape:
                self.largest = max(self.largest, item.numel())
        return out


def _largest_intermediate(model: GPAModel, n: int, block: int, whole: bool) -> int:
    audio, text = random_unit_embeddings(n, 16, 4, 2), random_unit_embeddings(n, 16, 4, 3)
    with torch.no_grad():
        if whole:
            with _LargestTensor() as probe:
                model.score(audio, text)
        else:
            with _LargestTensor(ignore_shape=(n, n)) as probe:
                model.score_pool(audio, text, block_size=block)
    return probe.largest


def test_chunked_scoring_memory_does_not_grow_with_the_pool() -> None:
    # Every intermediate tensor is seen by the dispatch mode; besides the [A, T] output
    # itself, the largest one must depend on the block size only.
    model = tiny_gpa_model().eval()
    block, k1 = 8, 4
    small = _largest_intermediate(model, 16, block, whole=False)
    large = _largest_intermediate(model, 96, block, whole=False)
    assert small == large <= block * block * k1 * k1
    # The instrument does see growth: unchunked scoring of the large pool is 144x bigger.
    assert _largest_intermediate(model, 96, block, whole=True) == 96 * 96 * k1 * k1


def test_gradients_reach_every_trainable_parameter_and_no_frozen_one() -> None:
    model = tiny_gpa_model(text_trainable_layers=0).train()
    audio, text = model(tiny_audio_batch(3), TEXTS[:3])
    scores = model.score(audio, text) / 0.07
    labels = torch.arange(3)
    (F.cross_entropy(scores, labels) + F.cross_entropy(scores.T, labels)).backward()

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("text_encoder.") for n in frozen)
    assert all(p.grad is None for p in frozen.values())
    heads = (
        "audio_global_proj.",
        "text_global_proj.",
        "audio_prototypes.",
        "text_prototypes.",
        "audio_proto_proj.",
        "text_proto_proj.",
        "scorer.l_a.",
        "scorer.l_t.",
    )
    for prefix in heads:
        assert any(n.startswith(prefix) for n in trainable), prefix
    for name, p in trainable.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.startswith(heads):
            assert p.grad.abs().sum() > 0, name


def test_dp_baseline_has_no_prototype_branch() -> None:
    model = tiny_gpa_model(tiny_gpa_config(scorer="none")).eval()
    assert not model.uses_prototypes
    assert not [n for n, _ in model.named_parameters() if "proto" in n or n.startswith("scorer")]
    with torch.no_grad():
        audio, text = model(tiny_audio_batch(2), TEXTS)
    assert audio.prototypes is None and text.prototypes is None
    torch.testing.assert_close(model.score(audio, text), audio.global_ @ text.global_.T)


def test_feature_widths_and_precomputed_features() -> None:
    audio_enc, text_enc = tiny_audio_encoder(), tiny_text_encoder()
    model = GPAModel(tiny_gpa_config(), audio_enc, text_enc)
    features = EncoderOutput(
        torch.randn(2, 3, 64), torch.ones(2, 3, dtype=torch.bool), torch.randn(2, 64)
    )
    assert model.project_audio(features).prototypes.shape == (2, 4, 16)
    with pytest.raises(ValueError, match="dim"):
        GPAModel(tiny_gpa_config(), torch.nn.Linear(2, 2), text_enc)
    assert GPAModel(tiny_gpa_config(), torch.nn.Linear(2, 2), text_enc, audio_dim=8)


def test_embeddings_container() -> None:
    emb = random_unit_embeddings(5, 16, 4, 4)
    parts = [emb[:2], emb[2:]]
    assert [len(p) for p in parts] == [2, 3]
    joined = Embeddings.cat(parts)
    torch.testing.assert_close(joined.prototypes, emb.prototypes)
    assert Embeddings.cat([Embeddings(emb.global_)]).prototypes is None
    assert emb.to(dtype=torch.float16).global_.dtype == torch.float16
    with pytest.raises(ValueError):
        Embeddings.cat([])

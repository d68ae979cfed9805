"""AudioTower: last-n-blocks freezing for every encoder family, and the frozen-output
cache (hits equal what the clip got when first computed; a different input is a miss)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gpa_ray.models.aisfx_cnn import AisfxCNN
from gpa_ray.models.audio_tower import AudioTower, audio_blocks, input_keys
from gpa_ray.testing.models import (
    tiny_audio_batch,
    tiny_audio_cnn,
    tiny_audio_encoder,
    tiny_audioformer_encoder,
    tiny_spectrogram_resnet,
    tiny_spectrogram_vit,
)


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize(
    ("builder", "n_blocks"),
    [
        (tiny_audio_encoder, 7),  # bn0 + 6 conv blocks
        (lambda: tiny_audio_cnn("resnet38"), 7),  # bn0, block1, 4 stages, block_after
        (lambda: AisfxCNN(width=4), 4),
        (tiny_audioformer_encoder, 3),  # embeddings + 2 layers
        (tiny_spectrogram_resnet, 6),  # image bn0, embedder, 4 stages
        (tiny_spectrogram_vit, 4),  # image bn0, embeddings, layer 1, layer 2 + norm
    ],
)
def test_last_block_trains_and_the_rest_is_frozen(builder: object, n_blocks: int) -> None:
    encoder = builder()
    blocks = audio_blocks(encoder)
    assert len(blocks) == n_blocks
    covered = {id(p) for b in blocks for p in b.parameters()}
    assert covered >= {id(p) for p in encoder.parameters() if p.requires_grad}
    AudioTower(encoder, blocks, trainable_layers=1).train()
    assert [_trainable(b) for b in blocks] == [False] * (n_blocks - 1) + [True]
    assert not any(b.training for b in blocks[:-1]) and blocks[-1].training


def test_cache_serves_repeated_clips_with_their_first_outputs() -> None:
    torch.manual_seed(0)
    encoder = tiny_audio_encoder().eval()
    tower = AudioTower(encoder, audio_blocks(encoder), trainable_layers=0, cache_size=8)
    batch = tiny_audio_batch(batch=4, frames=96, seed=1)  # lengths 96, 64, 32, 96
    with torch.no_grad():
        plain = encoder(**batch)
    first = tower(**batch)
    assert tower.cached_clips == 4
    # A miss is computed exactly as without the cache (valid frames only are kept).
    torch.testing.assert_close(first.global_, plain.global_)
    for i in range(4):
        torch.testing.assert_close(first.frames[i][first.mask[i]], plain.frames[i][plain.mask[i]])
    # Clips 2 and 3 again, in another batch order and padding: served from the cache.
    again = {"logmel": batch["logmel"][[3, 2], :], "lengths": batch["lengths"][[3, 2]]}
    second = tower(**again)
    torch.testing.assert_close(second.global_, first.global_[[3, 2]])
    assert second.mask.sum(1).tolist() == first.mask[[3, 2]].sum(1).tolist()
    # Different content (an augmented copy of clip 0) is a new entry, never a stale hit.
    changed = {"logmel": batch["logmel"][:1] + 1.0, "lengths": batch["lengths"][:1]}
    third = tower(**changed)
    with torch.no_grad():
        torch.testing.assert_close(third.global_, encoder(**changed).global_)
    assert tower.cached_clips == 5


def test_cache_is_bounded_and_keys_ignore_padding() -> None:
    batch = tiny_audio_batch(batch=3, frames=96, seed=2)
    padded = {
        "logmel": torch.cat([batch["logmel"], torch.full((3, 32, 32), -100.0)], dim=1),
        "lengths": batch["lengths"],
    }
    assert input_keys(batch) == input_keys(padded)
    assert len(set(input_keys(batch))) == 3
    encoder = tiny_audio_encoder().eval()
    tower = AudioTower(encoder, audio_blocks(encoder), trainable_layers=0, cache_size=2)
    tower(**batch)
    assert tower.cached_clips == 2


def test_a_training_tower_never_caches() -> None:
    encoder = tiny_audio_encoder()
    tower = AudioTower(encoder, audio_blocks(encoder), trainable_layers=1, cache_size=8)
    out = tower(**tiny_audio_batch(batch=2))
    assert out.global_.requires_grad and tower.cached_clips == 0

"""An audio encoder as a GPA tower: its freezing policy and, when frozen, an output cache.

Transfer learning trains either the projections only (frozen tower) or the projections
plus the tower's last blocks ("Good, Fast, Cheap"). `AudioTower` applies that policy to
any encoder given its blocks in input-to-output order (`audio_blocks`), and keeps frozen
blocks in eval mode whatever `train()` says, so BatchNorm statistics and dropout of the
frozen part never drift while the rest trains.

A frozen tower is a fixed function of its input, so with `cache_size > 0` it remembers
the outputs of up to that many distinct clips (least recently used first out): the
projection-only setting then pays one tower pass per clip instead of one per epoch. A
clip is recognised by its actual input content (its valid spectrogram frames or code
ids), so an augmented or differently cropped input is simply a new entry and a cached
output is never served for different audio. A clip's cached output is the one computed
in the batch where it was first seen (frames beyond its valid length are dropped, which
the mask already excluded from every use).
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gpa_ray.models.outputs import EncoderOutput


def audio_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The parts of an audio encoder from input to output, the unit of `trainable_layers`."""
    from gpa_ray.models.aisfx_cnn import AisfxCNN
    from gpa_ray.models.audio_cnn import Cnn14, ResNet38
    from gpa_ray.models.audioformer import AudioFormerEncoder
    from gpa_ray.models.spectrogram_vision import SpectrogramResNet, SpectrogramViT

    if isinstance(encoder, Cnn14):
        return [encoder.bn0, *(getattr(encoder, f"conv_block{i}") for i in range(1, 7))]
    if isinstance(encoder, ResNet38):
        res = encoder.resnet
        return [
            encoder.bn0,
            encoder.conv_block1,
            res.layer1,
            res.layer2,
            res.layer3,
            res.layer4,
            encoder.conv_block_after1,
        ]
    if isinstance(encoder, AisfxCNN):
        return [getattr(encoder, f"conv_block{i}") for i in range(1, 5)]
    if isinstance(encoder, AudioFormerEncoder):
        return [encoder.roformer.embeddings, *_transformer_layers(encoder.roformer)]
    if isinstance(encoder, SpectrogramResNet):
        return [encoder.image, encoder.backbone.embedder, *encoder.backbone.encoder.stages]
    if isinstance(encoder, SpectrogramViT):
        vit = encoder.backbone
        *layers, last = _transformer_layers(vit)
        return [encoder.image, vit.embeddings, *layers, nn.ModuleList([last, vit.layernorm])]
    raise TypeError(f"no block list for audio encoder {type(encoder).__name__}")


def _transformer_layers(backbone: nn.Module) -> nn.ModuleList:
    """The list of `num_hidden_layers` blocks of a `transformers` model, wherever the
    model version keeps it (`encoder.layer` or `layers`)."""
    n_layers = int(backbone.config.num_hidden_layers)
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise TypeError(f"cannot find the {n_layers} layers of {type(backbone).__name__}")


def input_keys(inputs: Mapping[str, Tensor]) -> list[bytes]:
    """One content digest per clip of a keyword batch, ignoring its padding.

    Spectrogram batches carry `lengths` (valid frames); code batches an
    `attention_mask`; anything else is keyed by its whole rows.
    """
    tensors = {k: v for k, v in inputs.items() if isinstance(v, Tensor)}
    lengths = tensors.pop("lengths", None)
    mask = tensors.get("attention_mask")
    batch = next(iter(tensors.values())).shape[0]
    keys = []
    for i in range(batch):
        digest = hashlib.blake2b(digest_size=16)
        for name in sorted(tensors):
            row = tensors[name][i]
            if lengths is not None:
                row = row[: int(lengths[i])]
            elif mask is not None and name != "attention_mask":
                row = row[mask[i].bool()]
            digest.update(name.encode())
            digest.update(str((tuple(row.shape), row.dtype)).encode())
            digest.update(row.detach().cpu().contiguous().numpy().tobytes())
        keys.append(digest.digest())
    return keys


class AudioTower(nn.Module):
    """An audio encoder with a freezing policy (and an output cache when frozen).

    `blocks` lists the encoder's parts from input to output; the last `trainable_layers`
    of them train (-1: all parameters train, 0: none). A fully frozen tower runs without
    autograd and, with `cache_size > 0`, serves repeated inputs from its cache.
    """

    def __init__(
        self,
        encoder: nn.Module,
        blocks: list[nn.Module],
        trainable_layers: int = -1,
        cache_size: int = 0,
    ) -> None:
        super().__init__()
        if trainable_layers < -1:
            raise ValueError(f"trainable_layers must be -1, 0 or positive, got {trainable_layers}")
        self.encoder = encoder
        self.out_dim = int(encoder.out_dim)
        self.trainable_layers = trainable_layers
        self.cache_size = cache_size
        self._cache: collections.OrderedDict[bytes, tuple[Tensor, Tensor]] = (
            collections.OrderedDict()
        )
        self._frozen_blocks: list[nn.Module] = []
        if trainable_layers >= 0:
            encoder.requires_grad_(False)
            n_train = min(trainable_layers, len(blocks))
            split = len(blocks) - n_train
            for block in blocks[split:]:
                block.requires_grad_(True)
            self._frozen_blocks = [encoder] if n_train == 0 else list(blocks[:split])
        self.train(self.training)

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.encoder.parameters())

    @property
    def cached_clips(self) -> int:
        return len(self._cache)

    def train(self, mode: bool = True) -> AudioTower:
        super().train(mode)
        for block in self._frozen_blocks:
            block.eval()
        return self

    def forward(self, *args: Tensor, **inputs: Any) -> EncoderOutput:
        if not self.frozen:
            return self.encoder(*args, **inputs)
        with torch.no_grad():
            if self.cache_size <= 0 or args:
                return self.encoder(*args, **inputs)
            return self._cached(inputs)

    def _cached(self, inputs: Mapping[str, Any]) -> EncoderOutput:
        keys = input_keys(inputs)
        misses = [i for i, key in enumerate(keys) if key not in self._cache]
        fresh: dict[bytes, tuple[Tensor, Tensor]] = {}
        if misses:
            index = torch.tensor(misses)
            sub = {
                k: v[index.to(v.device)] if isinstance(v, Tensor) else v for k, v in inputs.items()
            }
            out = self.encoder(**sub)
            for j, i in enumerate(misses):
                fresh[keys[i]] = (out.frames[j][out.mask[j]], out.global_[j])
        entries = [fresh.get(key) or self._cache[key] for key in keys]
        for key in keys:
            if key in fresh:
                self._cache[key] = fresh[key]
            self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return _assemble(entries)


def _assemble(entries: list[tuple[Tensor, Tensor]]) -> EncoderOutput:
    """Per-clip (valid frames [n_i, D], global [D]) -> a padded `EncoderOutput`."""
    width = max(1, max(frames.shape[0] for frames, _ in entries))
    first = entries[0][0]
    frames = first.new_zeros(len(entries), width, first.shape[-1])
    mask = torch.zeros(len(entries), width, dtype=torch.bool, device=first.device)
    for i, (valid, _) in enumerate(entries):
        frames[i, : valid.shape[0]] = valid
        mask[i, : valid.shape[0]] = True
    return EncoderOutput(frames=frames, mask=mask, global_=torch.stack([g for _, g in entries]))

"""AudioFormer: a RoFormer over EnCodec codes, pre-trained by masked-LM, then fine-tuned.

The whole model family in one file (nanoGPT style):

- Input: one sequence per codebook row, `[BOA] c_1+3 ... c_T+3 [EOA]` padded with PAD
  (ids from `gpa_ray.audio.codec`: BOA 0, PAD 1, EOA 2, codes 3..1026, MASK 1027; a
  vocabulary of 1028 as the paper states). One model is trained per codebook.
- Backbone: `transformers` RoFormer (rotary position embeddings), built from a config with
  no pretrained parameters; 12 layers x 768 x 12 heads at paper scale.
- Pre-training (`AudioFormerMLM`): `mask_tokens` selects 25% of the code positions
  (never BOA, EOA or PAD), the model predicts the original codes there; the loss
  (`gpa_ray.losses.mlm_loss`) counts masked positions only.
- FT1 (`AudioFormerClassifier`): the MLM head is dropped, token outputs are mean-pooled
  over non-pad positions, a linear layer gives class logits (LSEP/BCE/CE in `losses`).
- FT2 (`AudioFormerFT2`): the codebook-1 model (anchor, trainable) classifies; the
  codebook-2..N models are frozen and only embed their view of the same clip, so the
  multi-positive contrastive loss (`losses.mpc_loss`) can pull the anchor's embedding
  towards the other codebooks of its clip. Loss: alpha * MLC + (1 - alpha) * MPC.
- `AudioFormerEncoder` is the backbone as a GPA audio tower: token features, the
  non-pad mask and their mean (the FT1 pooling) as the global feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import RoFormerConfig, RoFormerForMaskedLM, RoFormerModel

from gpa_ray.audio.codec import CODE_OFFSET, CODEBOOK_SIZE, MASK, PAD, VOCAB_SIZE
from gpa_ray.config import AudioFormerConfig
from gpa_ray.losses import mlm_loss
from gpa_ray.models.outputs import EncoderOutput

IGNORE_INDEX = -100
BERT_STYLE = (0.8, 0.1, 0.1)
"""Selected codes become MASK / a random code / stay unchanged with these probabilities."""


def roformer_config(cfg: AudioFormerConfig) -> RoFormerConfig:
    """The `transformers` RoFormer config for an `AudioFormerConfig` (vocab 1028, PAD = 1)."""
    return RoFormerConfig(
        vocab_size=VOCAB_SIZE,
        embedding_size=cfg.hidden_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_positions,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        pad_token_id=PAD,
        type_vocab_size=1,
    )


def code_positions(input_ids: Tensor) -> Tensor:
    """True where a token is an audio code (not BOA, PAD, EOA or MASK)."""
    return (input_ids >= CODE_OFFSET) & (input_ids < CODE_OFFSET + CODEBOOK_SIZE)


def mask_tokens(
    input_ids: Tensor,
    mask_prob: float = 0.25,
    generator: torch.Generator | None = None,
    bert_style: tuple[float, float, float] | None = BERT_STYLE,
) -> tuple[Tensor, Tensor]:
    """Corrupt codes for MLM; returns (masked_ids, labels).

    Each code position is selected independently with probability `mask_prob` (so 25% of
    the codes on average); BOA, EOA and PAD are never selected. `labels` holds the
    original id at selected positions and `IGNORE_INDEX` (-100) elsewhere. With
    `bert_style = (p_mask, p_random, p_keep)` a selected code becomes MASK, a uniformly
    random code, or stays as it is; with None every selected code becomes MASK.
    `generator` (on the ids' device) makes the corruption reproducible.
    """
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must lie in [0, 1], got {mask_prob}")
    device = input_ids.device
    draw = torch.rand(input_ids.shape, generator=generator, device=device)
    selected = code_positions(input_ids) & (draw < mask_prob)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    if bert_style is None:
        return input_ids.masked_fill(selected, MASK), labels
    p_mask, p_random, p_keep = bert_style
    if min(bert_style) < 0 or abs(p_mask + p_random + p_keep - 1.0) > 1e-6:
        raise ValueError(f"bert_style must be three probabilities summing to 1, got {bert_style}")
    choice = torch.rand(input_ids.shape, generator=generator, device=device)
    random_codes = torch.randint(
        CODE_OFFSET,
        CODE_OFFSET + CODEBOOK_SIZE,
        input_ids.shape,
        generator=generator,
        device=device,
        dtype=input_ids.dtype,
    )
    masked = input_ids.masked_fill(selected & (choice < p_mask), MASK)
    to_random = selected & (choice >= p_mask) & (choice < p_mask + p_random)
    masked = torch.where(to_random, random_codes, masked)
    return masked, labels


def padding_mask(input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Bool [B, L], True on real tokens: the given mask, else every non-PAD id."""
    if attention_mask is not None:
        return attention_mask.bool()
    return input_ids != PAD


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean of `tokens` [B, L, D] over the positions where `mask` [B, L] is True."""
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


@dataclass(frozen=True)
class MLMOutput:
    """Logits [B, L, 1028] and, when labels were given, the masked-position loss."""

    logits: Tensor
    loss: Tensor | None


class AudioFormerMLM(nn.Module):
    """RoFormer with its masked-LM head (`RoFormerForMaskedLM`), for pre-training."""

    def __init__(self, cfg: AudioFormerConfig) -> None:
        super().__init__()
        self.mlm = RoFormerForMaskedLM(roformer_config(cfg))

    @property
    def backbone(self) -> RoFormerModel:
        """The RoFormer without the head (what FT1/FT2 and the audio tower start from)."""
        return self.mlm.roformer

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None
    ) -> MLMOutput:
        mask = padding_mask(input_ids, attention_mask)
        logits = self.mlm(input_ids=input_ids, attention_mask=mask.long()).logits
        loss = None if labels is None else mlm_loss(logits, labels, IGNORE_INDEX)
        return MLMOutput(logits=logits, loss=loss)


class AudioFormerEncoder(nn.Module):
    """The RoFormer backbone as an audio tower: token features, mask, mean-pooled global."""

    def __init__(self, backbone: RoFormerModel) -> None:
        super().__init__()
        self.roformer = backbone
        self.out_dim = backbone.config.hidden_size

    @classmethod
    def from_config(cls, cfg: AudioFormerConfig) -> AudioFormerEncoder:
        """A randomly initialised backbone."""
        return cls(RoFormerModel(roformer_config(cfg)))

    @classmethod
    def from_mlm(cls, mlm: AudioFormerMLM) -> AudioFormerEncoder:
        """The pre-trained backbone of an MLM model (shared, not copied), head dropped."""
        return cls(mlm.backbone)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> EncoderOutput:
        mask = padding_mask(input_ids, attention_mask)
        tokens = self.roformer(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        return EncoderOutput(frames=tokens, mask=mask, global_=masked_mean(tokens, mask))


class AudioFormerClassifier(nn.Module):
    """FT1: mean of all non-pad token outputs -> linear classifier (logits [B, C])."""

    def __init__(self, encoder: AudioFormerEncoder, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.out_dim, n_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.classifier(self.encoder(input_ids, attention_mask).global_)


@dataclass(frozen=True)
class FT2Output:
    """Anchor logits [B, C] and per-view pooled embeddings [B, N_views, D] (view 0 = C1)."""

    logits: Tensor
    views: Tensor


class AudioFormerFT2(nn.Module):
    """FT2: trainable codebook-1 classifier plus frozen codebook-2..N encoders.

    `forward(input_ids [B, N, L])` takes all N codebook sequences of each clip (the same
    length, since the codebooks share the frame rate). The anchor (view 0) gives the class
    logits and the first view embedding; the frozen encoders run without gradient and in
    eval mode (no dropout) even while the module trains, so only C1 and its classifier
    learn, as in the paper.
    """

    def __init__(
        self, anchor: AudioFormerClassifier, frozen: list[AudioFormerEncoder] | nn.ModuleList
    ) -> None:
        super().__init__()
        if len(frozen) < 1:
            raise ValueError("FT2 needs at least one frozen codebook encoder (N >= 2 views)")
        self.anchor = anchor
        self.frozen = nn.ModuleList(frozen)
        self.frozen.requires_grad_(False)
        self.frozen.eval()

    @property
    def n_views(self) -> int:
        return 1 + len(self.frozen)

    def train(self, mode: bool = True) -> AudioFormerFT2:
        super().train(mode)
        self.frozen.eval()
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> FT2Output:
        if input_ids.dim() != 3 or input_ids.shape[1] != self.n_views:
            raise ValueError(
                f"expected input_ids [B, {self.n_views}, L], got {tuple(input_ids.shape)}"
            )
        masks = [
            None if attention_mask is None else attention_mask[:, v] for v in range(self.n_views)
        ]
        anchor = self.anchor.encoder(input_ids[:, 0], masks[0]).global_
        views = [anchor]
        with torch.no_grad():
            for v, encoder in enumerate(self.frozen, start=1):
                views.append(encoder(input_ids[:, v], masks[v]).global_)
        return FT2Output(logits=self.anchor.classifier(anchor), views=torch.stack(views, dim=1))

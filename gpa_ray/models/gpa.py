"""GPA: global + prototype alignment of an audio encoder and a text encoder.

Each side's encoder yields an `EncoderOutput` (`gpa_ray.models.outputs`: frame/token
features, padding mask, global feature). GPA projects the global feature with an MLP into
the shared space (global score S_g = cosine) and builds K+1 prototypes per item (K from
the sequence, the last one is the global feature), projects them with a second MLP and
scores every audio x text pair with a prototype scorer (LASS by default,
`gpa_ray.models.scoring`). The retrieval score is R = S_g + S'_p (GPA eq 9). With scorer
"none" the prototype branch is not built at all and R = S_g: the plain dual-encoder (DP)
baseline.

Scoring a whole pool is done in audio x text tiles (`iter_score_tiles`, `score_pool`)
so that the largest intermediate is [a_block, t_block, K+1, K+1] whatever the pool size.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpa_ray.config import GPAConfig
from gpa_ray.models.outputs import EncoderOutput
from gpa_ray.models.prototypes import build_prototype_generator
from gpa_ray.models.scoring import build_scorer


@dataclass(frozen=True)
class Embeddings:
    """Items in the shared space: `global_` [B, E] and `prototypes` [B, K+1, E] (None for the
    DP baseline), both L2 normalised along E."""

    global_: Tensor
    prototypes: Tensor | None = None

    def __len__(self) -> int:
        return int(self.global_.shape[0])

    def __getitem__(self, index: slice | Tensor) -> Embeddings:
        protos = None if self.prototypes is None else self.prototypes[index]
        return Embeddings(self.global_[index], protos)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Embeddings:
        protos = None if self.prototypes is None else self.prototypes.to(device, dtype)
        return Embeddings(self.global_.to(device, dtype), protos)

    def detach(self) -> Embeddings:
        protos = None if self.prototypes is None else self.prototypes.detach()
        return Embeddings(self.global_.detach(), protos)

    @staticmethod
    def cat(parts: Sequence[Embeddings]) -> Embeddings:
        """Concatenate along the item axis (e.g. batches of an index build)."""
        if not parts:
            raise ValueError("Embeddings.cat needs at least one part")
        global_ = torch.cat([p.global_ for p in parts])
        if parts[0].prototypes is None:
            return Embeddings(global_)
        return Embeddings(global_, torch.cat([p.prototypes for p in parts]))


class ScoreTile(NamedTuple):
    """Scores of audio items [audio_start, audio_start + rows) x texts [text_start, ...)."""

    audio_start: int
    text_start: int
    scores: Tensor


class ProjectionMLP(nn.Sequential):
    """Linear -> ReLU -> Linear into the shared space (applied to the last axis)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(nn.Linear(in_dim, out_dim), nn.ReLU(), nn.Linear(out_dim, out_dim))


PROJECTIONS = ("mlp", "linear")


def build_projection(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """`gpa.projection`: "mlp" (`ProjectionMLP`, GPA's and the DP baseline's) or "linear"
    (one fully connected layer, the projection head of "Good, Fast, Cheap" section 3)."""
    if kind == "mlp":
        return ProjectionMLP(in_dim, out_dim)
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    raise ValueError(f"unknown gpa.projection {kind!r}; choose one of {PROJECTIONS}")


def _feature_dim(encoder: nn.Module) -> int:
    """An encoder's feature width, from its `dim` or `out_dim` attribute."""
    for name in ("dim", "out_dim"):
        value = getattr(encoder, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(
        f"{type(encoder).__name__} has no `dim`/`out_dim`: pass audio_dim/text_dim to GPAModel"
    )


class GPAModel(nn.Module):
    """Audio and text towers, prototype generators, projections and the scorer.

    `audio_encoder(audio)` (or `audio_encoder(**audio)` for a mapping) and
    `text_encoder(texts)` / `text_encoder.encode_tokens(input_ids, attention_mask)` must
    return an `EncoderOutput` (or anything with `frames`, `mask`, `global_`). Feature widths
    come from the encoders' `dim` (or `out_dim`) attribute unless given.
    """

    def __init__(
        self,
        cfg: GPAConfig,
        audio_encoder: nn.Module,
        text_encoder: nn.Module,
        *,
        audio_dim: int | None = None,
        text_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.audio_encoder = audio_encoder
        self.text_encoder = text_encoder
        audio_dim = _feature_dim(audio_encoder) if audio_dim is None else audio_dim
        text_dim = _feature_dim(text_encoder) if text_dim is None else text_dim
        k, e = cfg.n_prototypes, cfg.embed_dim
        self.audio_global_proj = build_projection(cfg.projection, audio_dim, e)
        self.text_global_proj = build_projection(cfg.projection, text_dim, e)
        self.scorer = build_scorer(cfg.scorer, k + 1, k + 1)
        self.audio_prototypes: nn.Module | None = None
        self.text_prototypes: nn.Module | None = None
        self.audio_proto_proj: nn.Module | None = None
        self.text_proto_proj: nn.Module | None = None
        if self.scorer is not None:
            heads = cfg.attention_heads
            self.audio_prototypes = build_prototype_generator(cfg.prototype, audio_dim, k, heads)
            self.text_prototypes = build_prototype_generator(cfg.prototype, text_dim, k, heads)
            self.audio_proto_proj = ProjectionMLP(audio_dim, e)
            self.text_proto_proj = ProjectionMLP(text_dim, e)

    @property
    def uses_prototypes(self) -> bool:
        return self.scorer is not None

    def _project(
        self,
        out: EncoderOutput,
        global_proj: nn.Module,
        generator: nn.Module | None,
        proto_proj: nn.Module | None,
    ) -> Embeddings:
        global_ = F.normalize(global_proj(out.global_), dim=-1)
        if generator is None or proto_proj is None:
            return Embeddings(global_)
        prototypes = generator(out.frames, out.mask, out.global_)
        return Embeddings(global_, F.normalize(proto_proj(prototypes), dim=-1))

    def project_audio(self, out: EncoderOutput) -> Embeddings:
        """Embeddings from precomputed audio encoder features."""
        return self._project(
            out, self.audio_global_proj, self.audio_prototypes, self.audio_proto_proj
        )

    def project_text(self, out: EncoderOutput) -> Embeddings:
        """Embeddings from precomputed text encoder features."""
        return self._project(out, self.text_global_proj, self.text_prototypes, self.text_proto_proj)

    def embed_audio(self, audio: Tensor | Mapping[str, Any]) -> Embeddings:
        """Encode audio inputs (a tensor, or a mapping of keyword arguments) and project."""
        out = (
            self.audio_encoder(**audio) if isinstance(audio, Mapping) else self.audio_encoder(audio)
        )
        return self.project_audio(out)

    def embed_text(self, text: Sequence[str] | Mapping[str, Tensor]) -> Embeddings:
        """Encode raw texts, or a mapping with `input_ids` and `attention_mask`, and project."""
        if isinstance(text, Mapping):
            out = self.text_encoder.encode_tokens(text["input_ids"], text["attention_mask"])
        else:
            out = self.text_encoder(list(text))
        return self.project_text(out)

    def forward(
        self, audio: Tensor | Mapping[str, Any], text: Sequence[str] | Mapping[str, Tensor]
    ) -> tuple[Embeddings, Embeddings]:
        """Both sides' embeddings in one call (what a DDP-wrapped training step invokes)."""
        return self.embed_audio(audio), self.embed_text(text)

    def prototype_score(self, audio_emb: Embeddings, text_emb: Embeddings) -> Tensor:
        """S'_p for every pair, [A, T] (zeros for the DP baseline)."""
        if self.scorer is None:
            return audio_emb.global_.new_zeros(len(audio_emb), len(text_emb))
        if audio_emb.prototypes is None or text_emb.prototypes is None:
            raise ValueError("this GPA model scores prototypes but the embeddings have none")
        return self.scorer.score_pairs(audio_emb.prototypes, text_emb.prototypes)

    def score(self, audio_emb: Embeddings, text_emb: Embeddings) -> Tensor:
        """R = S_g + S'_p (eq 9) for every audio x text pair, [A, T], in one batch."""
        global_score = audio_emb.global_ @ text_emb.global_.T
        if self.scorer is None:
            return global_score
        return global_score + self.prototype_score(audio_emb, text_emb)

    def iter_score_tiles(
        self,
        audio_emb: Embeddings,
        text_emb: Embeddings,
        block_size: int = 1024,
        text_block_size: int | None = None,
        device: torch.device | str | None = None,
    ) -> Iterator[ScoreTile]:
        """Yield R in audio-major tiles of at most block_size x text_block_size, never
        holding the full [A, T] matrix; tiles are computed on `device` (default: where the
        embeddings are) and yielded there."""
        if block_size <= 0 or (text_block_size is not None and text_block_size <= 0):
            raise ValueError("block sizes must be positive")
        t_block = text_block_size or block_size
        for a0 in range(0, len(audio_emb), block_size):
            audio_part = audio_emb[a0 : a0 + block_size].to(device)
            for t0 in range(0, len(text_emb), t_block):
                text_part = text_emb[t0 : t0 + t_block].to(device)
                yield ScoreTile(a0, t0, self.score(audio_part, text_part))

    def score_pool(
        self,
        audio_emb: Embeddings,
        text_emb: Embeddings,
        block_size: int = 1024,
        text_block_size: int | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """R for a whole pool, [A, T] on the embeddings' device, computed block by block so
        the working memory beyond the output is bounded by the tile sizes. Wrap in
        `torch.no_grad()` for inference: with autograd every block's graph is kept."""
        out = audio_emb.global_.new_empty(len(audio_emb), len(text_emb))
        for tile in self.iter_score_tiles(audio_emb, text_emb, block_size, text_block_size, device):
            rows, cols = tile.scores.shape
            out[
                tile.audio_start : tile.audio_start + rows,
                tile.text_start : tile.text_start + cols,
            ] = tile.scores.to(out.device)
        return out

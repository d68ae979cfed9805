"""Two-stage search over a loaded index: inner-product shortlist, then the full GPA score.

Stage 1 ranks the whole pool by the inner product of global embeddings (S_g, cheap, and
what ANN libraries index); stage 2 rescores only the `shortlist` best with the model's
own R = S_g + S'_p (prototype scorer, LASS by default) and keeps the top k. With a
shortlist as large as the pool, stage 2 sees every item and the result equals exhaustive
full scoring.

Audio-to-text adds the Sinkhorn text bias b_j (GPA eq 10: R*_ij = R_ij + b_j). It is
folded into stage 1 so the shortlist is ranked by S_g + b_j: every text vector gets b_j
appended and the query gets a 1 (or a 0 to search without the bias), so one inner
product index serves both.

Stage 1 backends: "exact" (a torch matmul and top-k), "flat" (faiss IndexFlatIP, the
same result through faiss), "ivf" (faiss IndexIVFFlat on inner product: approximate,
sub-linear; `nprobe` of `nlist` lists are scanned).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gpa_ray.config import IndexConfig
from gpa_ray.index.store import IndexSide, LoadedIndex
from gpa_ray.models.gpa import Embeddings, GPAModel

ANN_KINDS = ("exact", "flat", "ivf")


class InnerProductIndex:
    """Top-n by inner product over fixed vectors [N, D] (float32), exact or with faiss."""

    def __init__(
        self, vectors: torch.Tensor, kind: str = "exact", nlist: int = 0, nprobe: int = 16
    ) -> None:
        if kind not in ANN_KINDS:
            raise ValueError(f"index.ann must be one of {ANN_KINDS}, got {kind!r}")
        self.kind = kind
        self.vectors = vectors.to(torch.float32).contiguous()
        self.nlist = 0
        self._faiss: Any = None
        n, dim = self.vectors.shape
        if kind == "exact" or n == 0:
            return
        import faiss

        data = np.ascontiguousarray(self.vectors.numpy())
        if kind == "flat":
            self._faiss = faiss.IndexFlatIP(dim)
        else:
            # faiss wants >= 39 training points per list; ~4 sqrt(N) lists is its usual advice.
            self.nlist = nlist or max(1, min(n // 39, int(4 * math.sqrt(n))))
            self.nlist = min(self.nlist, n)
            quantizer = faiss.IndexFlatIP(dim)
            self._faiss = faiss.IndexIVFFlat(quantizer, dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
            self._faiss.train(data)
            self._faiss.nprobe = min(nprobe, self.nlist)
            self._quantizer = quantizer  # the IVF index uses it but does not own it
        self._faiss.add(data)

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def top(self, queries: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and ids [B, n'] of the best n' = min(n, N) items per query, best first.

        IVF may find fewer than n' items for a query when its probed lists hold fewer;
        those slots have id -1 and score -inf.
        """
        n = min(n, len(self))
        queries = queries.to(torch.float32)
        if n == 0:
            empty = torch.empty(queries.shape[0], 0)
            return empty, empty.long()
        if self._faiss is None:
            return torch.topk(queries @ self.vectors.T, n, dim=1)
        scores, ids = self._faiss.search(np.ascontiguousarray(queries.numpy()), n)
        scores = torch.from_numpy(scores)
        ids = torch.from_numpy(ids)
        return scores.masked_fill(ids < 0, -math.inf), ids


@dataclass(frozen=True)
class Hit:
    """One result: `position` in the searched side of the index and its scores.

    `score` = `global_score` + `prototype_score` + `bias` (R, or R* for audio-to-text with
    the bias); `stage1_score` is what the shortlist was ranked by (S_g, + b_j with bias).
    """

    position: int
    score: float
    global_score: float
    prototype_score: float
    bias: float
    stage1_score: float


class IndexSearcher:
    """Two-stage text-to-audio and audio-to-text search over one loaded index version."""

    def __init__(
        self,
        index: LoadedIndex,
        model: GPAModel,
        *,
        ann: str = "exact",
        shortlist: int = 100,
        ivf_nlist: int = 0,
        ivf_nprobe: int = 16,
    ) -> None:
        if shortlist <= 0:
            raise ValueError(f"shortlist must be positive, got {shortlist}")
        if model.uses_prototypes != bool(index.manifest.n_prototypes):
            raise ValueError(
                f"index {index.version} has {index.manifest.n_prototypes} prototypes per item "
                f"but the model {'uses' if model.uses_prototypes else 'has no'} prototypes"
            )
        self.index = index
        self.model = model.eval()
        self.shortlist = shortlist
        self.clips_stage1 = InnerProductIndex(
            index.clips.embeddings.global_, ann, ivf_nlist, ivf_nprobe
        )
        text_vectors = index.texts.embeddings.global_
        if index.text_bias is not None:
            text_vectors = torch.cat([text_vectors, index.text_bias[:, None]], dim=1)
        self.texts_stage1 = InnerProductIndex(text_vectors, ann, ivf_nlist, ivf_nprobe)

    @classmethod
    def from_config(cls, index: LoadedIndex, model: GPAModel, cfg: IndexConfig) -> IndexSearcher:
        return cls(
            index,
            model,
            ann=cfg.ann,
            shortlist=cfg.shortlist,
            ivf_nlist=cfg.ivf_nlist,
            ivf_nprobe=cfg.ivf_nprobe,
        )

    @property
    def has_bias(self) -> bool:
        return self.index.text_bias is not None

    def _candidates(self, shortlist: int | None, k: int) -> int:
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        return max(shortlist or self.shortlist, k)

    @torch.no_grad()
    def text_to_audio(
        self, queries: Embeddings, k: int, shortlist: int | None = None
    ) -> list[list[Hit]]:
        """Best k clips for each text query (embeddings from `model.embed_text`)."""
        queries = queries.to(dtype=torch.float32)
        stage1, ids = self.clips_stage1.top(queries.global_, self._candidates(shortlist, k))
        return [
            self._rerank(
                self.index.clips, ids[b], stage1[b], queries[b : b + 1], k, query_is_audio=False
            )
            for b in range(len(queries))
        ]

    @torch.no_grad()
    def audio_to_text(
        self, queries: Embeddings, k: int, shortlist: int | None = None, use_bias: bool = True
    ) -> list[list[Hit]]:
        """Best k captions for each audio query; with `use_bias` (and a bias in the index)
        every score includes the text's Sinkhorn bias, stage 1 included."""
        queries = queries.to(dtype=torch.float32)
        vectors = queries.global_
        bias = self.index.text_bias if use_bias else None
        if self.has_bias:
            flag = 1.0 if use_bias else 0.0
            vectors = torch.cat([vectors, vectors.new_full((len(queries), 1), flag)], dim=1)
        stage1, ids = self.texts_stage1.top(vectors, self._candidates(shortlist, k))
        return [
            self._rerank(self.index.texts, ids[b], stage1[b], queries[b : b + 1], k, True, bias)
            for b in range(len(queries))
        ]

    def _rerank(
        self,
        side: IndexSide,
        ids: torch.Tensor,
        stage1: torch.Tensor,
        query: Embeddings,
        k: int,
        query_is_audio: bool,
        bias: torch.Tensor | None = None,
    ) -> list[Hit]:
        """Stage 2: the model's full score on the shortlist of one query, top k."""
        keep = ids >= 0
        ids, stage1 = ids[keep], stage1[keep]
        candidates = side.embeddings[ids]
        audio, text = (query, candidates) if query_is_audio else (candidates, query)
        global_score = (audio.global_ @ text.global_.T).reshape(-1)
        proto_score = self.model.prototype_score(audio, text).reshape(-1)
        extra = bias[ids] if bias is not None else torch.zeros_like(global_score)
        total = global_score + proto_score + extra
        order = torch.argsort(total, descending=True, stable=True)[:k]
        return [
            Hit(
                position=int(ids[i]),
                score=float(total[i]),
                global_score=float(global_score[i]),
                prototype_score=float(proto_score[i]),
                bias=float(extra[i]),
                stage1_score=float(stage1[i]),
            )
            for i in order.tolist()
        ]

    def clip_results(self, hits: Sequence[Hit]) -> list[dict[str, Any]]:
        """Text-to-audio hits as result records (rank, scores, clip metadata)."""
        return [
            {"rank": r + 1, **_scores(h), **self.index.clips.metadata[h.position]}
            for r, h in enumerate(hits)
        ]

    def text_results(self, hits: Sequence[Hit]) -> list[dict[str, Any]]:
        """Audio-to-text hits as result records (rank, scores, caption, its clip's metadata)."""
        out = []
        for r, h in enumerate(hits):
            text = self.index.texts.metadata[h.position]
            clip_pos = self.index.clips.positions.get(text["clip_id"])
            clip = self.index.clips.metadata[clip_pos] if clip_pos is not None else {}
            out.append(
                {
                    "rank": r + 1,
                    **_scores(h),
                    "text_id": text["text_id"],
                    "text": text["text"],
                    "clip_id": text["clip_id"],
                    "labels": clip.get("labels", []),
                    "has_audio": bool(clip.get("has_audio", False)),
                }
            )
        return out


def _scores(hit: Hit) -> dict[str, float]:
    return {
        "score": hit.score,
        "global_score": hit.global_score,
        "prototype_score": hit.prototype_score,
        "bias": hit.bias,
        "stage1_score": hit.stage1_score,
    }

"""Two-stage search over index shards: ANN shortlist, then the full GPA score, then merge.

Stage 1 ranks a shard's side by the inner product of global embeddings (S_g) with the
version's stored ANN (`gpa_ray.index.ann`); stage 2 rescores the candidates with the
model's own R = S_g + S'_p (prototype scorer, LASS by default), reading their float16
vectors from the mapped files. `merge` combines the candidates of any number of shards
into the top k, in three steps that reproduce a single shard exactly:

1. the best `candidates` by ANN score (`refine` x the shortlist for IVF-PQ, whose scores
   are approximate; the shortlist itself otherwise),
2. of those, the best `shortlist` by exact S_g (+ b_j),
3. of those, the best k by the full score, a clip's other segments left out (a long
   file embedded as windows ranks by its best segment, which the result names).

Each shard returns its own top `candidates` with all three scores; since every shard
shares one trained ANN (same lists, same codes), the union holds every item the global
top lists hold, and each step keeps the same items a single shard would. Ties are broken
by id, whatever the number of shards. With a shortlist as large as the pool and an exact
ANN, stage 2 sees every item and the result equals exhaustive full scoring.

Audio-to-text adds the Sinkhorn text bias b_j (GPA eq 10: R*_ij = R_ij + b_j). It is
folded into stage 1 so the shortlist is ranked by S_g + b_j: every stored text vector has
b_j appended and the query gets a 1 (or a 0 to search without the bias).

Filters (`ClipFilter`) act inside stage 1: faiss skips items that fail them while it
scans, so the candidates are the best passing items. An IVF search that finds fewer
than k passing items in its probed lists probes twice as many lists, up to all of them,
so k is met whenever k items pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from gpa_ray.config import IndexConfig
from gpa_ray.index import ann
from gpa_ray.index.mapped import MappedShard, MappedSide
from gpa_ray.models.gpa import Embeddings, GPAModel

CLIP_RECORD = [
    "segment_id",
    "clip_id",
    "segment",
    "segment_start_s",
    "segment_end_s",
    "corpus",
    "split",
    "duration_s",
    "captions",
    "labels",
    "has_audio",
]
"""A clip result: the clip, the segment that scored (its start and end in the file:
`index.segments`), and the clip's metadata. The first column is the side's id."""
TEXT_RECORD = ["text_id", "text", "clip_id", "labels", "has_audio"]


@dataclass(frozen=True)
class ClipFilter:
    """Which clips (or captions of which clips) a search may return; empty means any."""

    corpus: tuple[str, ...] = ()
    split: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    min_duration_s: float | None = None
    max_duration_s: float | None = None

    @property
    def empty(self) -> bool:
        return self == ClipFilter()

    def mask(self, meta: pa.Table) -> np.ndarray:
        """Rows of `meta` (clip or caption metadata) that pass, as a bool array."""
        keep = np.ones(meta.num_rows, bool)
        for name in ("corpus", "split"):
            values = getattr(self, name)
            if values:
                keep &= pc.is_in(meta.column(name), pa.array(values)).to_numpy(False)
        if self.labels:
            labels = meta.column("labels").combine_chunks()
            hits = pc.is_in(pc.list_flatten(labels), pa.array(self.labels)).to_numpy(False)
            parents = pc.list_parent_indices(labels).to_numpy()
            keep &= np.bincount(parents[hits], minlength=meta.num_rows) > 0
        duration = meta.column("duration_s")
        if self.min_duration_s is not None:
            keep &= pc.greater_equal(duration, self.min_duration_s).to_numpy(False)
        if self.max_duration_s is not None:
            keep &= pc.less_equal(duration, self.max_duration_s).to_numpy(False)
        return keep


@dataclass
class Candidates:
    """One query's stage-1 candidates in one shard, with every score `merge` needs, and
    their result records (rows of the side's metadata)."""

    ids: list[str]
    ann_score: np.ndarray
    stage1_score: np.ndarray
    global_score: np.ndarray
    prototype_score: np.ndarray
    bias: np.ndarray
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def score(self) -> np.ndarray:
        return self.global_score + self.prototype_score + self.bias

    @classmethod
    def concat(cls, parts: Sequence[Candidates]) -> Candidates:
        return cls(
            ids=[i for p in parts for i in p.ids],
            ann_score=_cat([p.ann_score for p in parts]),
            stage1_score=_cat([p.stage1_score for p in parts]),
            global_score=_cat([p.global_score for p in parts]),
            prototype_score=_cat([p.prototype_score for p in parts]),
            bias=_cat([p.bias for p in parts]),
            records=[r for p in parts for r in p.records],
        )


def _cat(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, np.float32)


def _best(scores: np.ndarray, ids: Sequence[str], rows: Sequence[int], n: int) -> list[int]:
    """The n best of `rows` by score, ties by id."""
    return sorted(rows, key=lambda r: (-float(scores[r]), ids[r]))[:n]


def _best_per_clip(c: Candidates, ranked: Sequence[int], k: int) -> list[int]:
    """The first k of `ranked` with a clip's other segments left out: a file ranks by
    its best segment (captions are their own items)."""
    seen: set[str] = set()
    out: list[int] = []
    for r in ranked:
        record = c.records[r]
        key = record["clip_id"] if "segment_id" in record else c.ids[r]
        if key not in seen:
            seen.add(key)
            out.append(r)
            if len(out) == k:
                break
    return out


def merge(
    parts: Sequence[Candidates], k: int, shortlist: int, candidates: int
) -> list[dict[str, Any]]:
    """The top k result records over the candidates of every shard (see the module doc)."""
    c = Candidates.concat(parts)
    rows = _best(c.ann_score, c.ids, range(len(c.ids)), candidates)
    rows = _best(c.stage1_score, c.ids, rows, shortlist)
    rows = _best_per_clip(c, _best(c.score, c.ids, rows, len(rows)), k)
    return [
        {
            "rank": rank + 1,
            "score": float(c.score[r]),
            "global_score": float(c.global_score[r]),
            "prototype_score": float(c.prototype_score[r]),
            "bias": float(c.bias[r]),
            "stage1_score": float(c.stage1_score[r]),
            **c.records[r],
        }
        for rank, r in enumerate(rows)
    ]


def merge_shards(
    per_shard: Sequence[list[Candidates]], k: int, shortlist: int, settings: ann.AnnSettings
) -> list[list[dict[str, Any]]]:
    """`merge` for every query of a batch: `per_shard[s][b]` is shard s's candidates for
    query b (what each shard's searcher returns for the batch)."""
    n, short = candidate_sizes(settings, k, shortlist)
    return [merge(parts, k, short, n) for parts in zip(*per_shard, strict=True)]


def windows_as_one(per_shard: Sequence[list[Candidates]]) -> list[list[Candidates]]:
    """Per shard, the candidates of every window of one audio query as one query's: `merge`
    then ranks a caption by its best window (a caption found by two windows appears once)."""
    return [[Candidates.concat(windows)] for windows in per_shard]


def candidate_sizes(settings: ann.AnnSettings, k: int, shortlist: int) -> tuple[int, int]:
    """(ANN candidates, shortlist) for a query asking for k results: the shortlist widens
    to k, and IVF-PQ takes `refine` x it from the ANN."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    short = max(shortlist, k)
    return settings.candidates(short), short


class ShardSearcher:
    """Stage 1 and stage 2 of text-to-audio and audio-to-text search on one shard."""

    def __init__(
        self, shard: MappedShard, model: GPAModel, settings: ann.AnnSettings, shortlist: int
    ) -> None:
        if shortlist <= 0:
            raise ValueError(f"index.shortlist must be positive, got {shortlist}")
        n_protos = shard.manifest.n_prototypes
        if model.uses_prototypes != bool(n_protos):
            raise ValueError(
                f"index {shard.version} has {n_protos} prototypes per item but the model "
                f"{'uses' if model.uses_prototypes else 'has no'} prototypes"
            )
        self.shard = shard
        self.model = model.eval()
        self.settings = settings
        self.shortlist = shortlist

    @property
    def has_bias(self) -> bool:
        return self.shard.texts.bias is not None

    def sizes(self, k: int, shortlist: int | None = None) -> tuple[int, int]:
        """(ANN candidates, shortlist) for a query asking for k results."""
        return candidate_sizes(self.settings, k, shortlist or self.shortlist)

    @torch.no_grad()
    def text_to_audio(
        self,
        queries: Embeddings,
        k: int,
        shortlist: int | None = None,
        where: ClipFilter | None = None,
    ) -> list[Candidates]:
        """Candidate clips for each text query (embeddings from `model.embed_text`)."""
        queries = queries.to(dtype=torch.float32)
        side = self.shard.clips
        n, _ = self.sizes(k, shortlist)
        scores, rows = self._stage1(side, queries.global_.numpy(), n, k, where)
        return [
            self._stage2(side, rows[b], scores[b], queries[b : b + 1], None, CLIP_RECORD)
            for b in range(len(queries))
        ]

    @torch.no_grad()
    def audio_to_text(
        self,
        queries: Embeddings,
        k: int,
        shortlist: int | None = None,
        use_bias: bool = True,
        where: ClipFilter | None = None,
    ) -> list[Candidates]:
        """Candidate captions for each audio query; with `use_bias` (and a bias in the
        index) every score includes the caption's Sinkhorn bias, stage 1 included."""
        queries = queries.to(dtype=torch.float32)
        side = self.shard.texts
        vectors = queries.global_.numpy()
        if side.bias is not None:
            flag = np.full((len(vectors), 1), 1.0 if use_bias else 0.0, np.float32)
            vectors = np.hstack([vectors, flag])
        bias = side.bias if use_bias else None
        n, _ = self.sizes(k, shortlist)
        scores, rows = self._stage1(side, vectors, n, k, where)
        return [
            self._stage2(side, rows[b], scores[b], queries[b : b + 1], bias, TEXT_RECORD)
            for b in range(len(queries))
        ]

    @torch.no_grad()
    def similar_clips(
        self, query: torch.Tensor, k: int, exclude: str = "", where: ClipFilter | None = None
    ) -> Candidates:
        """ "More like this": clips by the inner product of global audio embeddings (the
        prototype scorer scores audio against text, so it has no part here)."""
        side = self.shard.clips
        n, _ = self.sizes(k + 1)
        scores, rows = self._stage1(side, query.reshape(1, -1).numpy(), n, k + 1, where)
        keep = rows[0] >= 0
        rows_, ann_scores = rows[0][keep], scores[0][keep]
        records = side.records(rows_.tolist(), CLIP_RECORD)
        exact = side.embeddings(rows_).global_.numpy() @ query.reshape(-1).numpy()
        chosen = [i for i, r in enumerate(records) if r["clip_id"] != exclude]
        zeros = np.zeros(len(chosen), np.float32)
        return Candidates(
            ids=[records[i]["segment_id"] for i in chosen],
            ann_score=ann_scores[chosen],
            stage1_score=exact[chosen],
            global_score=exact[chosen],
            prototype_score=zeros,
            bias=zeros,
            records=[records[i] for i in chosen],
        )

    def _stage1(
        self, side: MappedSide, vectors: np.ndarray, n: int, k: int, where: ClipFilter | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """ANN scores and rows [B, n'] (-1: no item); under a filter, more lists are probed
        until k passing items are found or every list was probed."""
        n = min(n, len(side))
        if n == 0:
            return np.zeros((len(vectors), 0), np.float32), np.zeros((len(vectors), 0), np.int64)
        queries = ann.pad(vectors)
        if where is None or where.empty:
            return side.ann.search(queries, n)
        mask = where.mask(side.meta)
        bitmap = np.packbits(mask, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap))
        is_ivf = isinstance(side.ann, faiss.IndexIVF)
        nprobe = side.ann.nprobe if is_ivf else 0
        wanted = min(k, int(mask.sum()))
        while True:
            if is_ivf:
                params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
            else:
                params = faiss.SearchParameters(sel=selector)
            scores, rows = side.ann.search(queries, n, params=params)
            found = (rows >= 0).sum(axis=1).min()
            if not is_ivf or found >= wanted or nprobe >= side.ann.nlist:
                return scores, rows
            nprobe = min(2 * nprobe, side.ann.nlist)

    def _stage2(
        self,
        side: MappedSide,
        rows: np.ndarray,
        ann_scores: np.ndarray,
        query: Embeddings,
        bias: np.ndarray | None,
        record_columns: list[str],
    ) -> Candidates:
        """The full score of one query's candidates (rows -1 dropped)."""
        keep = rows >= 0
        rows, ann_scores = rows[keep], ann_scores[keep]
        found = side.embeddings(rows)
        query_is_audio = side.side == "texts"
        audio, text = (query, found) if query_is_audio else (found, query)
        global_score = (audio.global_ @ text.global_.T).reshape(-1).numpy()
        proto = self.model.prototype_score(audio, text).reshape(-1).numpy()
        extra = bias[rows].astype(np.float32) if bias is not None else np.zeros_like(proto)
        exact = ann_scores if self.settings.kind != "ivfpq" else global_score + extra
        records = side.records(rows.tolist(), record_columns)
        id_column = record_columns[0]
        return Candidates(
            ids=[r[id_column] for r in records],
            ann_score=ann_scores.astype(np.float32),
            stage1_score=np.asarray(exact, np.float32),
            global_score=global_score.astype(np.float32),
            prototype_score=proto.astype(np.float32),
            bias=extra,
            records=records,
        )


class IndexSearcher:
    """Every shard of one version in one process: fan out to each shard, then `merge`
    (what a single searcher replica does; Serve does the same across replicas)."""

    def __init__(
        self,
        shards: Sequence[MappedShard],
        model: GPAModel,
        settings: ann.AnnSettings,
        shortlist: int,
    ) -> None:
        if not shards:
            raise ValueError("an index searcher needs at least one shard")
        self.shards = [ShardSearcher(s, model, settings, shortlist) for s in shards]
        self.settings = settings

    @classmethod
    def from_config(
        cls, shards: Sequence[MappedShard], model: GPAModel, cfg: IndexConfig
    ) -> IndexSearcher:
        return cls(shards, model, ann.AnnSettings.from_config(cfg), cfg.shortlist)

    @property
    def version(self) -> str:
        return self.shards[0].shard.version

    @property
    def has_bias(self) -> bool:
        return self.shards[0].has_bias

    def merge(
        self, per_shard: Sequence[list[Candidates]], k: int, shortlist: int | None = None
    ) -> list[list[dict[str, Any]]]:
        """Top k records per query from per-shard candidate lists (of any shards)."""
        return merge_shards(per_shard, k, shortlist or self.shards[0].shortlist, self.settings)

    def text_candidates(
        self,
        queries: Embeddings,
        k: int,
        shortlist: int | None = None,
        where: ClipFilter | None = None,
    ) -> list[list[Candidates]]:
        """Per shard, per query: text-to-audio candidates."""
        return [s.text_to_audio(queries, k, shortlist, where) for s in self.shards]

    def audio_candidates(
        self,
        queries: Embeddings,
        k: int,
        shortlist: int | None = None,
        use_bias: bool = True,
        where: ClipFilter | None = None,
    ) -> list[list[Candidates]]:
        """Per shard, per query: audio-to-text candidates."""
        return [s.audio_to_text(queries, k, shortlist, use_bias, where) for s in self.shards]

    def similar_candidates(
        self, query: torch.Tensor, k: int, exclude: str, where: ClipFilter | None = None
    ) -> list[list[Candidates]]:
        """Per shard: "more like this" candidates for one clip embedding."""
        return [[s.similar_clips(query, k, exclude, where)] for s in self.shards]

    def text_to_audio(
        self,
        queries: Embeddings,
        k: int,
        shortlist: int | None = None,
        where: ClipFilter | None = None,
    ) -> list[list[dict[str, Any]]]:
        """Top k clip records for each text query."""
        return self.merge(self.text_candidates(queries, k, shortlist, where), k, shortlist)

    def audio_to_text(
        self,
        queries: Embeddings,
        k: int,
        shortlist: int | None = None,
        use_bias: bool = True,
        where: ClipFilter | None = None,
    ) -> list[list[dict[str, Any]]]:
        """Top k caption records for each audio query (R* with the bias, see the module)."""
        found = self.audio_candidates(queries, k, shortlist, use_bias, where)
        return self.merge(found, k, shortlist)

    def audio_to_audio(
        self,
        windows: Embeddings,
        starts: Sequence[float],
        k: int,
        where: ClipFilter | None = None,
    ) -> list[dict[str, Any]]:
        """Top k clips for an audio query embedded as windows (`AudioInputs.windows`;
        one window for a short query), by the inner product of global audio embeddings:
        every window searches, a clip ranks by its best (query window, segment) pair, and
        each result names its segment and `query_start_s`, where in the query the
        matching window starts."""
        if len(windows) != len(starts):
            raise ValueError(f"{len(windows)} query windows but {len(starts)} starts")
        parts = []
        for w, start in enumerate(starts):
            for found in self.similar_candidates(windows.global_[w], k, "", where):
                (part,) = found
                part.records = [{**r, "query_start_s": float(start)} for r in part.records]
                parts.append(part)
        n, short = candidate_sizes(self.settings, k, self.shards[0].shortlist)
        return merge(parts, k, len(parts) * short, len(parts) * n)

    def find_clip(self, clip_id: str) -> tuple[MappedShard, int] | None:
        """The shard (of those here) holding a clip, and its row there."""
        for searcher in self.shards:
            row = searcher.shard.clips.position(clip_id)
            if row is not None:
                return searcher.shard, row
        return None

    def clip_embedding(self, clip_id: str) -> Embeddings | None:
        found = self.find_clip(clip_id)
        return None if found is None else found[0].clips.embeddings(np.array([found[1]]))

    def similar_clips(
        self, clip_id: str, k: int, where: ClipFilter | None = None
    ) -> list[dict[str, Any]] | None:
        """ "More like this" for an indexed clip (None: no such clip here)."""
        emb = self.clip_embedding(clip_id)
        if emb is None:
            return None
        return self.merge(self.similar_candidates(emb.global_[0], k, clip_id, where), k)[0]

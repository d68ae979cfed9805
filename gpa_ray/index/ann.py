"""Stage-1 ANN structures: trained once at build time, stored with faiss, memory-mapped.

Kinds (`index.ann`), all on inner product:

- "flat": `IndexFlatIP`, exact; 4 D bytes per item.
- "ivf": `IndexIVFFlat` with `nlist` lists, `nprobe` probed per query; 4 D + 8 bytes.
- "ivfpq": `IndexIVFPQ`, `pq_bytes` one-byte sub-quantiser codes per item (+ 8 for the id);
  its scores are approximate, so the searcher takes `refine` x the shortlist from it and
  re-scores them exactly from the stored float16 vectors.

The coarse quantiser and the PQ codebooks are trained once per version, on a sample of
the whole side (at most `train_points` vectors, the way autofaiss trains under a memory
budget), and every shard adds its own vectors to a copy of that one trained index. Every
item therefore gets the same list and code it would get in a single-shard index, and the
lists a query probes are the same in every shard: S shards together find exactly what one
shard would find, which is what makes the sharded search equal the unsharded one.

Vectors are padded with zeros to a multiple of 8 dimensions (PQ needs the dimension to be
a multiple of its sub-quantisers; zeros change no inner product).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import faiss
import numpy as np

from gpa_ray.config import IndexConfig

ANN_KINDS = ("flat", "ivf", "ivfpq")
DIM_MULTIPLE = 8
MIN_POINTS_PER_LIST = 39
"""faiss warns below 39 training points per list; fewer lists are used instead."""


@dataclass(frozen=True)
class AnnSettings:
    """How stage 1 of one side is built and searched (see `IndexConfig`)."""

    kind: str = "ivf"
    nlist: int = 0
    nprobe: int = 32
    pq_bytes: int = 0
    refine: int = 4
    train_memory_mb: float = 128.0

    def __post_init__(self) -> None:
        if self.kind not in ANN_KINDS:
            raise ValueError(f"index.ann must be one of {ANN_KINDS}, got {self.kind!r}")
        for name in ("nprobe", "refine", "train_memory_mb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"index.ann_{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, cfg: IndexConfig) -> AnnSettings:
        """The ANN settings of `index.*` (the build and the searchers read the same keys)."""
        return cls(
            kind=cfg.ann,
            nlist=cfg.ann_nlist,
            nprobe=cfg.ann_nprobe,
            pq_bytes=cfg.ann_pq_bytes,
            refine=cfg.ann_refine,
            train_memory_mb=cfg.ann_train_memory_mb,
        )

    def train_points(self, n_items: int, dim: int) -> int:
        """Training sample size: as many vectors as `train_memory_mb` holds (all if fewer)."""
        if self.kind == "flat":
            return 0
        budget = int(self.train_memory_mb * 2**20) // (4 * padded_dim(dim))
        return max(1, min(n_items, budget))

    def lists_for(self, n_items: int, dim: int) -> int:
        """`nlist`, else about 4 sqrt(N); never more than the sample has 39 points for."""
        if self.kind == "flat":
            return 0
        wanted = self.nlist or int(4 * math.sqrt(max(n_items, 1)))
        return max(1, min(wanted, self.train_points(n_items, dim) // MIN_POINTS_PER_LIST))

    def candidates(self, shortlist: int) -> int:
        """How many items stage 1 takes from the ANN for a shortlist of `shortlist`."""
        return shortlist * self.refine if self.kind == "ivfpq" else shortlist


def padded_dim(dim: int) -> int:
    return DIM_MULTIPLE * math.ceil(dim / DIM_MULTIPLE)


def pad(vectors: np.ndarray) -> np.ndarray:
    """float32, C-contiguous, zero-padded to `padded_dim` columns (what faiss is given)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    extra = padded_dim(vectors.shape[1]) - vectors.shape[1]
    if extra:
        vectors = np.hstack([vectors, np.zeros((len(vectors), extra), np.float32)])
    return np.ascontiguousarray(vectors)


def pq_subquantizers(settings: AnnSettings, dim: int) -> int:
    """Bytes per PQ code: `pq_bytes`, else one per 8 dimensions; must divide the dim."""
    m = settings.pq_bytes or padded_dim(dim) // DIM_MULTIPLE
    if padded_dim(dim) % m:
        raise ValueError(f"index.pq_bytes={m} must divide the padded dimension {padded_dim(dim)}")
    return m


def bytes_per_item(settings: AnnSettings, dim: int) -> int:
    """Resident bytes the ANN structure keeps per item (the README's memory formula)."""
    d = padded_dim(dim)
    if settings.kind == "flat":
        return 4 * d
    if settings.kind == "ivf":
        return 4 * d + 8
    return pq_subquantizers(settings, dim) + 8


def train(sample: np.ndarray, dim: int, n_items: int, settings: AnnSettings) -> faiss.Index:
    """An empty index of `settings.kind` for `dim`-dimensional vectors, trained on `sample`
    (rows of the side's vectors, `sample_rows`) for a side of `n_items` items."""
    d = padded_dim(dim)
    if settings.kind == "flat":
        return faiss.IndexFlatIP(d)
    nlist = settings.lists_for(n_items, dim)
    if settings.kind == "ivf":
        spec = f"IVF{nlist},Flat"
    else:
        # 8-bit codes need 256 training points per codebook; a tiny side gets fewer bits.
        bits = max(1, min(8, int(math.log2(max(len(sample), 2)))))
        # "np": no polysemous training (a simulated annealing that takes minutes and
        # serves Hamming filtering, which inner-product search does not use).
        spec = f"IVF{nlist},PQ{pq_subquantizers(settings, dim)}x{bits}np"
    index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = 1234  # k-means initialisation: the same sample trains the same lists
    if len(sample):
        index.train(pad(sample))
    return index


def fill(trained: faiss.Index, chunks: Iterable[np.ndarray]) -> faiss.Index:
    """A copy of `trained` holding the vectors of `chunks` (ids 0.. in order)."""
    index = faiss.clone_index(trained)
    for chunk in chunks:
        index.add(pad(chunk))
    return index


def write(index: faiss.Index, path: str) -> None:
    faiss.write_index(index, path)


def read_mapped(path: str, kind: str, nprobe: int) -> faiss.Index:
    """Load a stored index memory-mapped (no copy into anonymous memory, no training):
    faiss maps a flat index's codes with IO_FLAG_MMAP_IFC and an IVF's lists with
    IO_FLAG_MMAP (the two flags do not combine)."""
    flag = faiss.IO_FLAG_MMAP_IFC if kind == "flat" else faiss.IO_FLAG_MMAP
    index = faiss.read_index(path, flag | faiss.IO_FLAG_READ_ONLY)
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = min(nprobe, index.nlist)
    return index


def sample_rows(n_items: int, settings: AnnSettings, dim: int) -> np.ndarray:
    """Sorted row numbers of the training sample: every row if the budget holds them,
    else a seeded draw (the same side gives the same sample on every build)."""
    points = settings.train_points(n_items, dim)
    if n_items == 0:
        return np.zeros(0, np.int64)
    if points >= n_items:
        return np.arange(points)
    rng = np.random.default_rng(n_items * 31 + dim)
    return np.sort(rng.choice(n_items, points, replace=False))

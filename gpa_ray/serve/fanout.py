"""Sharded search on Serve: what the ingress asks every searcher and how it merges.

An index version of S shards is served by S searcher deployments, one shard each. A
search embeds the query once, sends the same `ShardRequest` to every shard, and merges
their candidates with `gpa_ray.index.search.merge_shards`, the rule that makes S shards
return exactly what one shard would. Every shard answers with the version it searched;
answers from two versions (a reload under way) are refused rather than mixed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gpa_ray.index.search import Candidates, ClipFilter, IndexSearcher, windows_as_one


class ShardVersionError(RuntimeError):
    """Shards answered from different index versions (a reload is in progress)."""


@dataclass(frozen=True)
class TextQuery:
    """One text query for a searcher that encodes it itself."""

    text: str
    k: int
    where: ClipFilter | None = None


@dataclass(frozen=True)
class ShardRequest:
    """One search, as sent to every shard: `kind` "text" (query embeddings of texts,
    ranked against clips), "audio" (the embedding rows of one audio query's windows,
    against captions: a caption ranks by its best window) or "similar" (a clip's global
    embedding against clips, excluding `exclude`)."""

    kind: str
    query: Any  # Embeddings for "text" and "audio", a [E] tensor for "similar"
    k: int
    use_bias: bool = True
    exclude: str = ""
    where: ClipFilter | None = None

    def run(self, searcher: IndexSearcher) -> list[list[Candidates]]:
        """The candidates of the searcher's own shards (per shard, per query)."""
        if self.kind == "text":
            return searcher.text_candidates(self.query, self.k, where=self.where)
        if self.kind == "audio":
            return windows_as_one(
                searcher.audio_candidates(
                    self.query, self.k, use_bias=self.use_bias, where=self.where
                )
            )
        return searcher.similar_candidates(self.query, self.k, self.exclude, self.where)


def gather(answers: Sequence[tuple[str, list[list[Candidates]]]]) -> tuple[str, list[Any]]:
    """One version and the per-shard candidate lists of every searcher's answer."""
    versions = sorted({version for version, _ in answers})
    if len(versions) != 1:
        raise ShardVersionError(
            f"index shards answered from versions {versions}: a reload is in progress, retry"
        )
    return versions[0], [lists for _, per_shard in answers for lists in per_shard]

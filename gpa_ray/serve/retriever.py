"""What the retrieval service computes, without Ray: query encoding and the index service.

The Serve deployments (`gpa_ray.serve.app`) wrap these classes one per deployment; the
in-process backend and the load test's baseline use them directly, so the service and
its baseline run the very same code.

- `TextQueryEncoder`: captions -> query embeddings (batch in, one row per text out).
- `AudioQueryEncoder`: uploaded bytes -> tower inputs (`prepare`, per request: decoding
  errors stay with their request) -> embeddings (`encode`, per batch).
- `SearchService`: the index version being served, two-stage search, result records,
  clip metadata and audio, and the switch to a newer version when `LATEST` moves.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import soundfile as sf
import torch

from gpa_ray.config import Config, resolve_stage_uris
from gpa_ray.data.schema import text_id
from gpa_ray.index.mapped import drop_cached, open_shards
from gpa_ray.index.search import CLIP_RECORD, ClipFilter, IndexSearcher, windows_as_one
from gpa_ray.index.store import IndexManifest, read_manifest, resolve_version
from gpa_ray.models.factory import LoadedGPA, load_gpa_checkpoint
from gpa_ray.models.gpa import Embeddings, GPAModel
from gpa_ray.storage import is_s3

logger = logging.getLogger(__name__)


class QueryError(ValueError):
    """A query the service cannot answer because of what the client sent (a 4xx)."""


class IndexMismatchError(RuntimeError):
    """An index version that the running service cannot serve (built with another model)."""


def index_uri(cfg: Config) -> str:
    """The index root (or version) Serve follows: `serve.index_uri`, else `index.output`."""
    return resolve_stage_uris(cfg).serve.index_uri


def load_model(cfg: Config, checkpoint: str) -> LoadedGPA:
    """The GPA checkpoint an index was built with, in eval mode on CPU, with its digest."""
    return load_gpa_checkpoint(checkpoint, cfg.storage, "cpu")


def served_manifest(cfg: Config) -> IndexManifest:
    """The manifest of the index version the service would serve now."""
    return read_manifest(resolve_version(index_uri(cfg), cfg.storage), cfg.storage)


def index_checkpoint(cfg: Config) -> str:
    """The checkpoint named by the manifest of the index version being served."""
    return served_manifest(cfg).checkpoint


class TextQueryEncoder:
    """Query texts -> one `Embeddings` row each."""

    def __init__(self, model: GPAModel) -> None:
        self.model = model.eval()

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> list[Embeddings]:
        emb = self.model.embed_text(list(texts))
        return [emb[i : i + 1] for i in range(len(texts))]


class AudioQueryEncoder:
    """Uploaded audio -> tower inputs (through `AudioInputs`, like the index build) ->
    one `Embeddings` row each."""

    def __init__(
        self, model: GPAModel, model_cfg: Config, max_seconds: float, windows: bool = False
    ) -> None:
        from gpa_ray.audio.inputs import AudioInputs

        self.model = model.eval()
        self.inputs = AudioInputs.from_config(model_cfg)
        self.max_seconds = max_seconds
        window = model_cfg.audio.max_seconds
        self.window = (window, window / 2) if windows else None

    def prepare(self, data: bytes, source: str) -> list[dict[str, torch.Tensor]]:
        """Decode and preprocess one upload: its tower inputs, one per window (one unless
        `serve.query_windows` and the upload is longer than the model's window);
        `QueryError` says why it is not usable audio.

        The duration is read from the header first, so a small compressed file that would
        expand to hours of samples is refused before it is decoded.
        """
        from gpa_ray.audio.inputs import AudioInputError
        from gpa_ray.audio.io import AudioDecodeError, decode_audio

        if not data:
            raise QueryError("the upload is empty: send the audio file as the request body")
        try:
            info = sf.info(io.BytesIO(data))
        except (sf.SoundFileError, RuntimeError, ValueError, TypeError, EOFError) as exc:
            reason = getattr(exc, "error_string", "") or str(exc)
            raise QueryError(
                f"the upload is not audio in a supported format (wav, flac, ogg, mp3): {reason}"
            ) from exc
        seconds = info.frames / info.samplerate if info.samplerate > 0 else 0.0
        if seconds > self.max_seconds:
            raise QueryError(
                f"the audio is {seconds:.1f} s long; queries are limited to {self.max_seconds:g} s"
            )
        try:
            wave, sr = decode_audio(data, source)
            if self.window is None:
                return [self.inputs.from_waveform(wave, sr)]
            return [item for _, _, item in self.inputs.windows(wave, sr, *self.window)]
        except (AudioDecodeError, AudioInputError) as exc:
            raise QueryError(str(exc)) from exc

    @torch.no_grad()
    def encode(self, items: Sequence[list[dict[str, torch.Tensor]]]) -> list[Embeddings]:
        """Each upload's windows (from `prepare`) embedded in one batch; one `Embeddings`
        per upload, a row per window."""
        emb = self.model.embed_audio(self.inputs.collate([w for item in items for w in item]))
        bounds = np.cumsum([0, *(len(item) for item in items)])
        return [emb[int(a) : int(b)] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class SearchService:
    """Serves some shards (all, or the listed ones) of one index version at a time and
    moves to a newer version when asked to.

    A version is memory-mapped (`gpa_ray.index.mapped`): opening one copies nothing into
    anonymous memory, so a reload maps the new version, swaps it in and lets the old one
    be unmapped; a replica never holds two versions in its own memory. A version built
    with other weights than the ones being served is refused (its embeddings would not
    match the query encoders), and the current version stays up. Weights are compared by
    the SHA-256 of the `model.pt` bytes the model was loaded from, not by URI: a run folder
    that trained further, or a checkpoint overwritten in place, has another digest.
    """

    def __init__(self, cfg: Config, loaded: LoadedGPA, shards: Sequence[int] | None = None) -> None:
        self.cfg = cfg
        self.uri = index_uri(cfg)
        self.model = loaded.model.eval()
        self.checkpoint = loaded.checkpoint
        self.digest = loaded.digest
        self.shard_ids = None if shards is None else list(shards)
        self._lock = threading.Lock()
        self.searcher = self._load(self.uri)

    def _check_version(self, manifest: IndexManifest) -> None:
        if manifest.checkpoint_digest:
            same = manifest.checkpoint_digest == self.digest
            built = (
                f"checkpoint {manifest.checkpoint} (weights sha256 "
                f"{manifest.checkpoint_digest[:12]})"
            )
        else:  # a version written without a digest: only its checkpoint URI is known
            same = manifest.checkpoint == self.checkpoint
            built = f"checkpoint {manifest.checkpoint}"
        if not same:
            raise IndexMismatchError(
                f"index version {manifest.version} was built with {built}, but this service "
                f"encodes queries with {self.checkpoint} (weights sha256 {self.digest[:12]}): "
                "redeploy to serve it"
            )
        shards = manifest.search.get("shards", 0)
        if self.shard_ids is not None and max(self.shard_ids) >= shards:
            raise IndexMismatchError(
                f"index version {manifest.version} has {shards} shards but this service was "
                f"deployed for shard {max(self.shard_ids)}: redeploy to serve it"
            )

    def _load(self, uri: str) -> IndexSearcher:
        started = time.perf_counter()
        layout = resolve_version(uri, self.cfg.storage)
        manifest = read_manifest(layout, self.cfg.storage)  # checked before mapping shards
        self._check_version(manifest)
        shards = open_shards(
            layout,
            manifest,
            nprobe=self.cfg.index.ann_nprobe,
            cache_dir=self.cfg.serve.cache_dir,
            shards=self.shard_ids,
            storage_cfg=self.cfg.storage,
        )
        logger.info(
            "serving index %s shards %s (%d clips, %d texts)",
            manifest.version,
            [s.shard for s in shards],
            sum(len(s.clips) for s in shards),
            sum(len(s.texts) for s in shards),
        )
        self.load_s = time.perf_counter() - started
        return IndexSearcher.from_config(shards, self.model, self.cfg.index)

    @property
    def version(self) -> str:
        return self.searcher.version

    def latest_version(self) -> str:
        return resolve_version(self.uri, self.cfg.storage).version

    def reload(self) -> dict[str, Any]:
        """Switch to the version the index URI names now, if it differs; report both."""
        with self._lock:
            before = self.version
            old_dir = self.searcher.shards[0].shard.layout.dir
            latest = self.latest_version()
            if latest != before:
                self.searcher = self._load(self.uri)  # the old one is unmapped when unused
                if is_s3(old_dir):
                    drop_cached(self.cfg.serve.cache_dir, old_dir)
            return {
                "previous_version": before,
                "index_version": self.version,
                "changed": latest != before,
            }

    def search_text(
        self, query: Embeddings, k: int, where: ClipFilter | None = None
    ) -> dict[str, Any]:
        searcher = self.searcher
        results = searcher.text_to_audio(query, k, where=where)[0]
        return {"index_version": searcher.version, "results": results}

    def search_audio(
        self, query: Embeddings, k: int, use_bias: bool = True, where: ClipFilter | None = None
    ) -> dict[str, Any]:
        """Captions for an audio query: one embedding row, or one per window of a long
        upload (a caption then ranks by its best window)."""
        searcher = self.searcher
        found = searcher.audio_candidates(query, k, use_bias=use_bias, where=where)
        return {
            "index_version": searcher.version,
            "bias_applied": use_bias and searcher.has_bias,
            "results": searcher.merge(windows_as_one(found), k)[0],
        }

    def similar(
        self, clip_id: str, k: int, where: ClipFilter | None = None
    ) -> dict[str, Any] | None:
        searcher = self.searcher
        results = searcher.similar_clips(clip_id, k, where)
        return None if results is None else {"index_version": searcher.version, "results": results}

    def clip(self, clip_id: str) -> dict[str, Any] | None:
        """A clip's record and its captions (None: not in the shards served here)."""
        found = self.searcher.find_clip(clip_id)
        if found is None:
            return None
        shard, row = found
        (record,) = shard.clips.records([row], CLIP_RECORD)
        text_rows = [
            shard.texts.position(text_id(clip_id, i)) for i in range(len(record["captions"]))
        ]
        texts = shard.texts.records([r for r in text_rows if r is not None], ["text_id", "text"])
        return {"index_version": shard.version, **record, "texts": texts}

    def clip_audio(self, clip_id: str) -> tuple[bytes, int] | None:
        found = self.searcher.find_clip(clip_id)
        return None if found is None else found[0].clip_audio(clip_id)

    def health(self) -> dict[str, Any]:
        shards = [s.shard for s in self.searcher.shards]
        return {
            "status": "ok",
            "index_version": self.version,
            "shards": [s.shard for s in shards],
            "clips": sum(len(s.clips) for s in shards),
            "texts": sum(len(s.texts) for s in shards),
            "has_bias": self.searcher.has_bias,
            "ann": shards[0].manifest.search["ann"]["kind"],
            "shortlist": self.cfg.index.shortlist,
            "load_s": self.load_s,
        }

    def manifest(self) -> dict[str, Any]:
        return self.searcher.shards[0].shard.manifest.summary()

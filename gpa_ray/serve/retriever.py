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
from collections.abc import Sequence
from typing import Any

import soundfile as sf
import torch

from gpa_ray.config import Config, resolve_stage_uris
from gpa_ray.data.schema import text_id
from gpa_ray.index.search import IndexSearcher
from gpa_ray.index.store import (
    IndexManifest,
    LoadedIndex,
    load_index,
    read_manifest,
    resolve_version,
)
from gpa_ray.models.factory import LoadedGPA, load_gpa_checkpoint
from gpa_ray.models.gpa import Embeddings, GPAModel

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


def index_checkpoint(cfg: Config) -> str:
    """The checkpoint named by the manifest of the index version being served."""
    return read_manifest(resolve_version(index_uri(cfg), cfg.storage), cfg.storage).checkpoint


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

    def __init__(self, model: GPAModel, model_cfg: Config, max_seconds: float) -> None:
        from gpa_ray.audio.inputs import AudioInputs

        self.model = model.eval()
        self.inputs = AudioInputs.from_config(model_cfg)
        self.max_seconds = max_seconds

    def prepare(self, data: bytes, source: str) -> dict[str, torch.Tensor]:
        """Decode and preprocess one upload; `QueryError` says why it is not usable audio.

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
            return self.inputs.from_waveform(wave, sr)
        except (AudioDecodeError, AudioInputError) as exc:
            raise QueryError(str(exc)) from exc

    @torch.no_grad()
    def encode(self, items: Sequence[dict[str, torch.Tensor]]) -> list[Embeddings]:
        emb = self.model.embed_audio(self.inputs.collate(list(items)))
        return [emb[i : i + 1] for i in range(len(items))]


class SearchService:
    """Serves one index version at a time and moves to a newer one when asked to.

    A new version replaces the current one only after it loaded completely; a version
    built with other weights than the ones being served is refused (its embeddings would
    not match the query encoders), and the current version stays up. Weights are compared
    by the SHA-256 of the `model.pt` bytes the model was loaded from, not by URI: a run
    folder that trained further, or a checkpoint overwritten in place, has another digest.
    """

    def __init__(self, cfg: Config, loaded: LoadedGPA) -> None:
        self.cfg = cfg
        self.uri = index_uri(cfg)
        self.model = loaded.model.eval()
        self.checkpoint = loaded.checkpoint
        self.digest = loaded.digest
        self._lock = threading.Lock()
        self.searcher = self._load(self.uri)

    def _check_weights(self, manifest: IndexManifest) -> None:
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

    def _load(self, uri: str) -> IndexSearcher:
        layout = resolve_version(uri, self.cfg.storage)
        manifest = read_manifest(layout, self.cfg.storage)  # checked before loading shards
        self._check_weights(manifest)
        index = load_index(layout.dir, self.cfg.storage)
        logger.info(
            "serving index %s (%d clips, %d texts)",
            index.version,
            len(index.clips),
            len(index.texts),
        )
        return IndexSearcher.from_config(index, self.model, self.cfg.index)

    @property
    def index(self) -> LoadedIndex:
        return self.searcher.index

    def latest_version(self) -> str:
        return resolve_version(self.uri, self.cfg.storage).version

    def reload(self) -> dict[str, Any]:
        """Switch to the version the index URI names now, if it differs; report both."""
        with self._lock:
            before = self.index.version
            latest = self.latest_version()
            if latest != before:
                self.searcher = self._load(self.uri)
            return {
                "previous_version": before,
                "index_version": self.index.version,
                "changed": latest != before,
            }

    def search_text(self, query: Embeddings, k: int) -> dict[str, Any]:
        searcher = self.searcher
        hits = searcher.text_to_audio(query, k)[0]
        return {"index_version": searcher.index.version, "results": searcher.clip_results(hits)}

    def search_audio(self, query: Embeddings, k: int, use_bias: bool = True) -> dict[str, Any]:
        searcher = self.searcher
        hits = searcher.audio_to_text(query, k, use_bias=use_bias)[0]
        return {
            "index_version": searcher.index.version,
            "bias_applied": use_bias and searcher.has_bias,
            "results": searcher.text_results(hits),
        }

    def clip(self, clip_id: str) -> dict[str, Any] | None:
        index = self.index
        pos = index.clips.positions.get(clip_id)
        if pos is None:
            return None
        texts = [
            {"text_id": t, "text": index.texts.metadata[index.texts.positions[t]]["text"]}
            for t in _caption_ids(index, clip_id)
        ]
        return {"index_version": index.version, **index.clips.metadata[pos], "texts": texts}

    def clip_audio(self, clip_id: str) -> tuple[bytes, int] | None:
        return self.index.clip_audio(clip_id)

    def health(self) -> dict[str, Any]:
        index = self.index
        return {
            "status": "ok",
            "index_version": index.version,
            "clips": len(index.clips),
            "texts": len(index.texts),
            "has_bias": index.text_bias is not None,
            "ann": self.cfg.index.ann,
            "shortlist": self.cfg.index.shortlist,
        }

    def manifest(self) -> dict[str, Any]:
        return self.index.manifest.summary()


def _caption_ids(index: LoadedIndex, clip_id: str) -> list[str]:
    pos = index.clips.positions[clip_id]
    n = len(index.clips.metadata[pos]["captions"])
    return [t for t in (text_id(clip_id, i) for i in range(n)) if t in index.texts.positions]

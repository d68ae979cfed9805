"""The test pool's embeddings an evaluation computed, kept at its output for a rerun.

Embedding the test clips and captions is the costly part of an evaluation (a Ray Data
job on actor pools); scoring and the table are seconds. So the embeddings are written
under `<eval.output>/embeddings/` (`clips.parquet`, `texts.parquet`, float32 in the
`gpa_ray.embedding_table` layout) and, last, `settings.json`: what they depend on
(`gpa_ray.embedding_inputs`: the checkpoint's weights and config by content, the test
split's clip shards with their sizes, the embedding batch size).

A rerun whose settings equal the stored ones loads the embeddings and runs no Ray job;
any difference (or a missing or half-written folder) recomputes them and overwrites the
folder, the settings file again last, so a reader never pairs a settings file with
embeddings it does not describe. Clips are kept sorted by clip id, so the pool's order
never depends on which Ray task finished first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import pyarrow as pa
import torch

from gpa_ray import storage
from gpa_ray.config import Config
from gpa_ray.embedding_inputs import embedding_inputs
from gpa_ray.embedding_table import embedding_table, embeddings_from_table
from gpa_ray.models.gpa import Embeddings

logger = logging.getLogger(__name__)

EMBEDDINGS_DIR = "embeddings"
SETTINGS_FILE = "settings.json"
CLIPS_FILE = "clips.parquet"
TEXTS_FILE = "texts.parquet"
FORMAT_VERSION = 2


@dataclasses.dataclass(frozen=True)
class PoolEmbeddings:
    """The embedded test pool: clip ids (sorted) with their embeddings, the caption
    embeddings in caption order, and whether they were read from a previous run."""

    clip_ids: list[str]
    audio: Embeddings
    texts: Embeddings
    reused: bool


def embeddings_dir(cfg: Config) -> str:
    return storage.join(cfg.eval.output, EMBEDDINGS_DIR)


def embedding_settings(cfg: Config, checkpoint: str) -> dict[str, Any]:
    """Everything the test pool's embeddings depend on (see the module docstring)."""
    ev = cfg.eval
    pool = {"pool": (ev.data, ev.split, ev.corpus)}
    return {
        "format": FORMAT_VERSION,
        **embedding_inputs(checkpoint, pool, ev.embed_pool.batch_size, cfg.storage),
    }


def _stored_settings(cfg: Config) -> dict[str, Any] | None:
    uri = storage.join(embeddings_dir(cfg), SETTINGS_FILE)
    if not storage.exists(uri, cfg.storage):
        return None
    stored = json.loads(storage.read_bytes(uri, cfg.storage))
    return {k: v for k, v in stored.items() if k != "checkpoint"}


def _read(cfg: Config, text_ids: list[str]) -> PoolEmbeddings | None:
    """The stored embeddings, or None if they do not cover exactly these captions."""
    root = embeddings_dir(cfg)
    clips = storage.read_parquet(storage.join(root, CLIPS_FILE), cfg.storage)
    texts = storage.read_parquet(storage.join(root, TEXTS_FILE), cfg.storage)
    if texts.column("text_id").to_pylist() != text_ids:
        return None
    return PoolEmbeddings(
        clips.column("clip_id").to_pylist(),
        embeddings_from_table(clips),
        embeddings_from_table(texts),
        reused=True,
    )


def _write(cfg: Config, pool: PoolEmbeddings, text_ids: list[str], settings: dict) -> None:
    root = embeddings_dir(cfg)
    settings_uri = storage.join(root, SETTINGS_FILE)
    if storage.exists(settings_uri, cfg.storage):
        storage.delete(settings_uri, cfg.storage)
    clips = embedding_table(pool.clip_ids, "clip_id", pool.audio)
    storage.write_parquet(storage.join(root, CLIPS_FILE), clips, cfg.storage)
    texts = embedding_table(text_ids, "text_id", pool.texts)
    storage.write_parquet(storage.join(root, TEXTS_FILE), texts, cfg.storage)
    storage.write_bytes(settings_uri, json.dumps(settings, indent=2).encode(), cfg.storage)


def _embed(cfg: Config, checkpoint: str, captions: pa.Table) -> PoolEmbeddings:
    """The Ray Data embedding job: captions in table order, clips sorted by id."""
    from gpa_ray.ray_embedding import embed_captions, embed_clips, fetch_embeddings

    ev = cfg.eval
    texts = embed_captions(checkpoint, captions, pool=ev.embed_pool, storage_cfg=cfg.storage)
    clips = embed_clips(
        checkpoint, ev.data, ev.split, corpus=ev.corpus, pool=ev.embed_pool, storage_cfg=cfg.storage
    )
    clip_ids, audio = fetch_embeddings(clips, "clip_id")
    order = sorted(range(len(clip_ids)), key=clip_ids.__getitem__)
    audio = audio[torch.tensor(order, dtype=torch.long)]
    return PoolEmbeddings([clip_ids[i] for i in order], audio, texts, reused=False)


def _changed(stored: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    return sorted(k for k in settings.keys() | stored.keys() if stored.get(k) != settings.get(k))


def pool_embeddings(cfg: Config, checkpoint: str, captions: pa.Table) -> PoolEmbeddings:
    """The test pool's embeddings: those stored under `eval.output` if their settings
    match, else freshly computed on Ray Data and stored (see the module docstring)."""
    settings = embedding_settings(cfg, checkpoint)
    text_ids = captions.column("text_id").to_pylist()
    root = embeddings_dir(cfg)
    stored = _stored_settings(cfg)
    if stored == settings:
        pool = _read(cfg, text_ids)
        if pool is not None:
            logger.info(
                "reusing the embeddings of %d clips and %d captions at %s (same weights "
                "%s..., data and settings): no embedding job",
                len(pool.clip_ids),
                len(text_ids),
                root,
                settings["weights_sha256"][:12],
            )
            return pool
    if stored is not None:
        logger.info(
            "embeddings at %s were made with other %s: recomputing",
            root,
            ", ".join(_changed(stored, settings)) or "captions",
        )
    pool = _embed(cfg, checkpoint, captions)
    _write(cfg, pool, text_ids, {**settings, "checkpoint": checkpoint})
    return pool

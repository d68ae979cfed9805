"""Batch index build on Ray Data: clip shards -> GPA embeddings -> an index version.

1. **Units.** Every clip shard under `index.input` (local or `s3://`; an ingest output,
   whose `clips/` are read, or a folder of shards; default `ingest.output`) is one work
   unit, numbered in sorted order. The list of shards and the settings that shape the
   output (the concrete checkpoint `index.checkpoint` resolves to, with the SHA-256 of its
   weights; dtype, splits, audio, bias) are stored as `build.json` in the
   version folder; the version name defaults to a hash of them, so rerunning the same
   command resumes the same version, and a rerun with other settings under an explicit
   `index.version` is refused rather than mixing outputs.
2. **Skip committed units.** A unit is done iff `_commits/unit-N.json` exists.
3. **Embed on an actor pool.** `map_batches(IndexEmbedder, compute=ActorPoolStrategy)`
   with fractional CPUs; each actor loads the GPA checkpoint once, runs torch on one
   thread, and per unit reads the shard's rows (filtered to `index.splits`), turns each
   clip into tower inputs through `AudioInputs` (the same path training and the audio
   query endpoint use), embeds clips and their captions in batches of `index.embed_pool.batch_size`
   (identical caption strings once), and writes the unit's clips and texts shards (each
   atomic) and then its commit marker. A clip that cannot be embedded (no audio, an
   undecodable FLAC) is recorded in the marker and the summary, never silently dropped,
   and never stops the job.
4. **Commit the version.** The driver gathers the markers, joins the Sinkhorn text bias
   when `index.bias` names one (it must cover every indexed caption), writes the search
   files in one streaming pass (`index.shards` shards, each with its ANN trained once for
   all of them: `gpa_ray.index.shard_files`), writes `manifest.json` and then points
   `LATEST` at the version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from gpa_ray import storage
from gpa_ray.bias_file import read_bias
from gpa_ray.checkpoints import CheckpointError, resolve_checkpoint, weights_digest
from gpa_ray.config import Config, resolve_stage_uris
from gpa_ray.config_loading import config_from_dict, config_to_dict
from gpa_ray.data.loaders import shard_split
from gpa_ray.embedding_table import DTYPES
from gpa_ray.index import store
from gpa_ray.index.ann import AnnSettings
from gpa_ray.index.reuse import EarlierVersion, deleted_ids
from gpa_ray.index.shard_files import write_shards
from gpa_ray.models.gpa import Embeddings
from gpa_ray.ray_embedding import check_cpu_pool

logger = logging.getLogger(__name__)

META_COLUMNS = [f.name for f in store.CLIP_META_FIELDS]
SHARD_COLUMNS = [*META_COLUMNS, "audio", "audio_sample_rate"]
"""Columns every clip shard must have for the build (plus `codes` for an AudioFormer tower)."""


class IndexBuildError(RuntimeError):
    """The build cannot proceed as configured (per-clip failures are recorded instead)."""


def source_uri(cfg: Config) -> str:
    """The folder of clip shards to index: `index.input`, which may be an ingest output
    (the URI `train.data`, `sinkhorn.queries` and `eval.data` take: its `clips/` are
    read, never its manifest) or a folder of shards."""
    if not cfg.index.input:
        raise IndexBuildError("index.input is empty: set it to an ingest output or its clips/")
    clips = storage.join(cfg.index.input, "clips")
    return clips if storage.exists(clips, cfg.storage) else cfg.index.input


def check_clip_shard(uri: str, storage_cfg: Any = None) -> None:
    """Refuse a parquet file that is not a clip shard before any actor starts, naming the
    file and the columns it lacks (rather than a scanner error deep inside an actor)."""
    fs, path = storage.resolve(uri, storage_cfg)
    names = set(pq.read_schema(path, filesystem=fs).names)
    missing = [c for c in SHARD_COLUMNS if c not in names]
    if missing:
        raise IndexBuildError(
            f"{uri} is not a clip shard (no column {', '.join(missing)}): point index.input "
            "at an ingest output or its clips/ folder"
        )


def check_bias_split(cfg: Config, source: str, files: Sequence[str]) -> None:
    """A text bias covers the captions of the split it was computed on (the bias job's
    `sinkhorn.texts_split`). Refuse an index over other splits before embedding anything,
    saying which `index.splits` to set (the join at commit time would fail after all the
    work)."""
    if not cfg.index.bias:
        return
    _, metadata = read_bias(cfg.index.bias, cfg.storage)
    bias_split = (metadata.get("texts") or {}).get("split")
    indexed = set(cfg.index.splits) or {shard_split(source, uri) for uri in files}
    if bias_split and None not in indexed and indexed != {bias_split}:
        raise IndexBuildError(
            f"the text bias at {cfg.index.bias} covers the captions of split "
            f"{bias_split!r} only, but the index would hold {sorted(indexed)}: set "
            f"index.splits=[{bias_split}] (or index without index.bias)"
        )


def build_settings(
    cfg: Config, source: str, files: Sequence[str], checkpoint: dict[str, str]
) -> dict[str, Any]:
    """What must not change between runs that write one version. `checkpoint` is the
    concrete checkpoint's identity (absolute URI and weights digest), so a run folder
    that trained further names a new version instead of resuming the old one."""
    return {
        "source": source,
        "files": [f[len(source) :].lstrip("/") for f in files],
        "checkpoint": checkpoint,
        "dtype": cfg.index.dtype,
        "splits": sorted(cfg.index.splits),
        "store_audio": cfg.index.store_audio,
        "bias": cfg.index.bias,
        "delete": cfg.index.delete,
        "search": {
            "shards": cfg.index.shards,
            "ann": dataclasses.asdict(AnnSettings.from_config(cfg.index)),
        },
        # Only when set, so versions built without segments keep their names.
        **({"segments": segment_settings(cfg.index)} if cfg.index.segments else {}),
    }


def segment_settings(index: Any) -> dict[str, float]:
    """`index.segment_s` / `segment_hop_s` as given (0: resolved from the model's window
    by each embedder, `IndexEmbedder.window`)."""
    return {"segment_s": index.segment_s, "segment_hop_s": index.segment_hop_s}


def resolve_window(index: Any, model_max_seconds: float) -> tuple[float, float] | None:
    """(window, hop) seconds of the long-file windows, or None without `index.segments`."""
    if not index.segments:
        return None
    window = index.segment_s or model_max_seconds
    hop = index.segment_hop_s or window / 2
    if window <= 0 or hop <= 0 or hop > window:
        raise IndexBuildError(
            f"index.segment_s={index.segment_s} / index.segment_hop_s={index.segment_hop_s}: "
            f"need 0 < hop <= window (window {window} s, hop {hop} s)"
        )
    return window, hop


def version_name(cfg: Config, settings: dict[str, Any]) -> str:
    """`index.version`, else a name derived from the build settings (stable across reruns)."""
    if cfg.index.version:
        return cfg.index.version
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return f"v-{digest[:12]}"


def read_clip_rows(
    uri: str, columns: list[str], splits: Sequence[str], storage_cfg: Any = None
) -> list[dict[str, Any]]:
    """The rows of one clip shard, only `columns`, only the given splits (all if empty)."""
    fs, path = storage.resolve(uri, storage_cfg)
    filters = [("split", "in", list(splits))] if splits else None
    return pq.read_table(path, filesystem=fs, columns=columns, filters=filters).to_pylist()


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class IndexEmbedder:
    """Ray Data callable class: embeds and commits whole units (one per batch row).

    Constructed once per actor, so the checkpoint is loaded once per actor.
    """

    def __init__(self, cfg: dict[str, Any], version: str, files: list[str]) -> None:
        from gpa_ray.audio.inputs import AudioInputs
        from gpa_ray.models.factory import load_gpa

        torch.set_num_threads(1)
        self.cfg = config_from_dict(cfg)
        self.model, model_cfg = load_gpa(self.cfg.index.checkpoint, self.cfg.storage, "cpu")
        self.model.eval()
        self.inputs = AudioInputs.from_config(model_cfg)
        self.window = resolve_window(self.cfg.index, model_cfg.audio.max_seconds)
        self.layout = store.IndexLayout(self.cfg.index.output, version)
        self.files = files
        index, storage_cfg = self.cfg.index, self.cfg.storage
        self.earlier = (
            EarlierVersion(index.reuse, self.cfg.serve.cache_dir, storage_cfg)
            if index.reuse
            else None
        )
        self.deleted = deleted_ids(index.delete, storage_cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        stats = [self.run_unit(int(unit)) for unit in batch["unit"]]
        return {key: [s[key] for s in stats] for key in ("unit", "clips", "texts", "failed")}

    def segments(self, row: dict[str, Any]) -> list[tuple[float, float, dict[str, Any]]]:
        """A clip's (start, end, tower inputs) per segment: one, or with `index.segments`
        one per window of a clip longer than the window."""
        if self.window is None:
            return [(0.0, float(row.get("duration_s") or 0.0), self.inputs.from_row(row))]
        return self.inputs.windows_from_row(row, *self.window)

    @torch.no_grad()
    def embed_clips(
        self, rows: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], Embeddings | None, list[list[tuple[float, float]]], list[Any]]:
        """The clips that can be embedded, their segments' embeddings (clip by clip),
        each clip's segment spans, and a failure row for the others."""
        from gpa_ray.audio.inputs import AudioInputError
        from gpa_ray.audio.io import AudioDecodeError

        ok: list[dict[str, Any]] = []
        spans: list[list[tuple[float, float]]] = []
        parts: list[Embeddings] = []
        failed: list[dict[str, str]] = []
        for chunk in _chunks(rows, self.cfg.index.embed_pool.batch_size):
            items = []
            for row in chunk:
                try:
                    found = self.segments(row)
                except (AudioInputError, AudioDecodeError) as exc:
                    failed.append(
                        {"clip_id": row["clip_id"], "error": f"{type(exc).__name__}: {exc}"}
                    )
                    continue
                ok.append(row)
                spans.append([(start, end) for start, end, _ in found])
                items.extend(item for _, _, item in found)
            for batch in _chunks(items, self.cfg.index.embed_pool.batch_size):
                parts.append(self.model.embed_audio(self.inputs.collate(batch)))
        return ok, (Embeddings.cat(parts) if parts else None), spans, failed

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> Embeddings:
        """Embeddings of `texts`, each distinct string encoded once."""
        distinct = list(dict.fromkeys(texts))
        parts = [
            self.model.embed_text(list(chunk))
            for chunk in _chunks(distinct, 4 * self.cfg.index.embed_pool.batch_size)
        ]
        where = {t: i for i, t in enumerate(distinct)}
        return Embeddings.cat(parts)[torch.tensor([where[t] for t in texts], dtype=torch.long)]

    def embed_unit(
        self, rows: list[dict[str, Any]]
    ) -> tuple[
        list[dict[str, Any]],
        list[dict[str, Any]],
        Embeddings | None,
        Embeddings | None,
        list[Any],
        int,
    ]:
        """(clips kept in row order, their segment rows, the segments' embeddings, the
        captions' embeddings, failure rows, how many clips were reused from `index.reuse`
        instead of embedded)."""
        found = {}
        if self.earlier is not None:
            for row in rows:
                stored = self.earlier.find(row)
                if stored is not None:
                    found[row["clip_id"]] = stored
        todo = [r for r in rows if r["clip_id"] not in found]
        fresh, fresh_emb, fresh_spans, failed = self.embed_clips(todo)
        if fresh_emb is not None:
            texts = store.caption_rows(fresh)
            fresh_texts = (
                self.embed_texts([t["text"] for t in texts]) if texts else _empty_like(fresh_emb)
            )
            start, first = 0, 0
            for row, spans in zip(fresh, fresh_spans, strict=True):
                n = len(row["captions"])
                segments = fresh_emb[first : first + len(spans)]
                found[row["clip_id"]] = (segments, fresh_texts[start : start + n], spans)
                start += n
                first += len(spans)
        ok = [r for r in rows if r["clip_id"] in found]
        if not ok:
            return ok, [], None, None, failed, 0
        segment_rows = [
            {**r, "segment": i, "segment_start_s": start, "segment_end_s": end}
            for r in ok
            for i, (start, end) in enumerate(found[r["clip_id"]][2])
        ]
        clip_emb = Embeddings.cat([found[r["clip_id"]][0] for r in ok])
        text_emb = Embeddings.cat([found[r["clip_id"]][1] for r in ok])
        return ok, segment_rows, clip_emb, text_emb, failed, len(ok) - len(fresh)

    def run_unit(self, unit: int) -> dict[str, Any]:
        """Embed one unit and commit it: clips shard, texts shard, then the marker."""
        cfg, layout = self.cfg, self.layout
        columns = list(SHARD_COLUMNS)
        if self.inputs.needs_codes:
            columns.append("codes")
        rows = read_clip_rows(self.files[unit], columns, cfg.index.splits, cfg.storage)
        kept = [r for r in rows if r["clip_id"] not in self.deleted]
        ok, segment_rows, clip_emb, text_emb, failed, reused = self.embed_unit(kept)
        marker: dict[str, Any] = {
            "unit": unit,
            "clips": len(ok),
            "segments": len(segment_rows),
            "window": None if self.window is None else list(self.window),
            "texts": 0,
            "failed": failed,
            "reused": reused,
            "deleted": len(rows) - len(kept),
        }
        if clip_emb is not None:
            texts = store.caption_rows(ok)
            dtype = cfg.index.dtype
            clips_table = store.index_clips_table(
                segment_rows, clip_emb, dtype, cfg.index.store_audio
            )
            store.write_table(layout.clips_file(unit), clips_table, cfg.storage)
            store.write_table(
                layout.texts_file(unit),
                store.index_texts_table(texts, text_emb, dtype),
                cfg.storage,
            )
            marker.update(
                texts=len(texts),
                with_audio=int(pc.sum(pc.is_valid(clips_table["audio"])).as_py() or 0),
                embed_dim=int(clip_emb.global_.shape[1]),
                n_prototypes=0
                if clip_emb.prototypes is None
                else int(clip_emb.prototypes.shape[1]),
            )
        storage.write_bytes(layout.commit_marker(unit), json.dumps(marker).encode(), cfg.storage)
        return {**marker, "failed": len(failed)}


def _empty_like(emb: Embeddings) -> Embeddings:
    return emb[torch.zeros(0, dtype=torch.long)]


def _committed(cfg: Config, layout: store.IndexLayout) -> dict[int, dict[str, Any]]:
    markers = storage.list_files(layout.commits_dir, ".json", cfg.storage)
    out = {}
    for uri in markers:
        marker = json.loads(storage.read_bytes(uri, cfg.storage))
        out[int(marker["unit"])] = marker
    return out


def _check_settings(cfg: Config, layout: store.IndexLayout, settings: dict[str, Any]) -> None:
    """Refuse to resume a version built with other settings; record them on a first run."""
    if storage.exists(layout.build_settings, cfg.storage):
        stored = json.loads(storage.read_bytes(layout.build_settings, cfg.storage))
        if stored != settings:
            changed = sorted(k for k in settings if stored.get(k) != settings[k])
            raise IndexBuildError(
                f"index version {layout.version} at {layout.root} was started with other "
                f"settings ({', '.join(changed)} differ); choose another index.version"
            )
        return
    storage.write_bytes(layout.build_settings, json.dumps(settings, indent=2).encode(), cfg.storage)
    storage.dump_config(cfg, storage.join(layout.dir, "config.yaml"))


def _bias(
    cfg: Config, layout: store.IndexLayout, text_files: list[str]
) -> tuple[dict[str, Any], pa.Table] | None:
    """Copy the bias of the indexed captions into the version: its provenance for the
    manifest and the stored table."""
    if not cfg.index.bias:
        return None
    bias_table, metadata = read_bias(cfg.index.bias, cfg.storage)
    text_ids: list[str] = []
    for name in text_files:
        fs, path = storage.resolve(storage.join(layout.dir, name), cfg.storage)
        text_ids += pq.read_table(path, filesystem=fs, columns=["text_id"]).column(0).to_pylist()
    try:
        stored = store.write_bias(layout, text_ids, bias_table, cfg.storage)
    except store.IndexFormatError as exc:
        raise IndexBuildError(f"bias {cfg.index.bias}: {exc}") from exc
    return {"uri": cfg.index.bias, "metadata": metadata}, stored


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """One build: its source shards (unit i = files[i]), the version it writes, and the
    concrete checkpoint (absolute URI, SHA-256 of its weights) every actor embeds with."""

    source: str
    files: list[str]
    layout: store.IndexLayout
    checkpoint: str
    checkpoint_digest: str


def plan_build(cfg: Config) -> BuildPlan:
    """Check the config, list the shards, name the version and record its settings."""
    if not cfg.index.checkpoint:
        raise IndexBuildError("index.checkpoint is required: the GPA checkpoint URI to embed with")
    if cfg.index.dtype not in DTYPES:
        raise IndexBuildError(f"index.dtype must be one of {sorted(DTYPES)}")
    source = source_uri(cfg)
    files = storage.list_files(source, ".parquet", cfg.storage)
    if not files:
        raise IndexBuildError(f"no clip shards (*.parquet) under {source}")
    check_clip_shard(files[0], cfg.storage)
    check_bias_split(cfg, source, files)
    try:
        found = resolve_checkpoint(cfg.index.checkpoint, "best", cfg.storage)
        checkpoint = storage.absolute_uri(found)
        digest = weights_digest(checkpoint, cfg.storage)
    except (CheckpointError, storage.StorageError) as exc:
        raise IndexBuildError(f"index.checkpoint={cfg.index.checkpoint}: {exc}") from exc
    _check_reuse(cfg, digest)
    identity = {"uri": checkpoint, "digest": digest}
    settings = build_settings(cfg, source, files, identity)
    layout = store.IndexLayout(cfg.index.output, version_name(cfg, settings))
    _check_settings(cfg, layout, settings)
    logger.info("index version %s embeds with %s (sha256 %s)", layout.version, checkpoint, digest)
    return BuildPlan(source, files, layout, checkpoint, digest)


def _check_reuse(cfg: Config, digest: str) -> None:
    """Embeddings are reused only from a version built with the very same weights."""
    if not cfg.index.reuse:
        return
    try:
        layout = store.resolve_version(cfg.index.reuse, cfg.storage)
        earlier = store.read_manifest(layout, cfg.storage)
    except store.IndexFormatError as exc:
        raise IndexBuildError(f"index.reuse={cfg.index.reuse}: {exc}") from exc
    if earlier.segments.get("settings") != (
        segment_settings(cfg.index) if cfg.index.segments else None
    ):
        raise IndexBuildError(
            f"index.reuse={cfg.index.reuse} cut long files into other segments "
            f"({earlier.segments or 'none'}): set the same index.segments, segment_s and "
            "segment_hop_s, or build without index.reuse"
        )
    if earlier.checkpoint_digest != digest:
        raise IndexBuildError(
            f"index.reuse={cfg.index.reuse} was built with weights sha256 "
            f"{earlier.checkpoint_digest[:12] or '(none)'}, this build embeds with "
            f"{digest[:12]}: its embeddings cannot be reused"
        )


def _with_checkpoint(cfg: Config, checkpoint: str) -> Config:
    return dataclasses.replace(cfg, index=dataclasses.replace(cfg.index, checkpoint=checkpoint))


def embed_units(cfg: Config, plan: BuildPlan, units: Sequence[int]) -> int:
    """Embed and commit `units` on a Ray Data actor pool; the number of clips embedded."""
    import ray

    workers = max(1, min(cfg.index.embed_pool.actors, len(units)))
    dataset = ray.data.from_items(
        [{"unit": u} for u in units], override_num_blocks=len(units)
    ).map_batches(
        IndexEmbedder,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers),
        fn_constructor_kwargs={
            "cfg": config_to_dict(_with_checkpoint(cfg, plan.checkpoint)),
            "version": plan.layout.version,
            "files": plan.files,
        },
        num_cpus=cfg.index.embed_pool.cpus_per_actor,
    )
    clips = 0
    for stats in dataset.iter_rows():
        clips += stats["clips"]
        logger.info(
            "committed unit %d: %d clips, %d texts, %d failed",
            stats["unit"],
            stats["clips"],
            stats["texts"],
            stats["failed"],
        )
    return clips


def commit_version(cfg: Config, plan: BuildPlan, build: dict[str, Any]) -> store.IndexManifest:
    """Once every unit is committed: join the text bias, write the manifest, move LATEST."""
    layout = plan.layout
    markers = _committed(cfg, layout)
    missing = sorted(set(range(len(plan.files))) - set(markers))
    if missing:
        raise IndexBuildError(f"units {missing[:10]} of version {layout.version} are not committed")
    filled = [m for _, m in sorted(markers.items()) if m["clips"] > 0]
    if not filled:
        raise IndexBuildError(f"no clip of {plan.source} could be embedded (see the markers)")
    dims = {(m["embed_dim"], m["n_prototypes"]) for m in filled}
    if len(dims) != 1:
        raise IndexBuildError(f"units disagree on embedding dimensions: {sorted(dims)}")
    ((embed_dim, n_prototypes),) = dims
    clip_files = [layout.clips_name(m["unit"]) for m in filled]
    text_files = [layout.texts_name(m["unit"]) for m in filled]
    failures = [f for _, m in sorted(markers.items()) for f in m["failed"]]
    bias = _bias(cfg, layout, text_files)
    started = time.perf_counter()
    search = write_shards(
        layout.dir,
        clip_files,
        text_files,
        n_shards=cfg.index.shards,
        settings=AnnSettings.from_config(cfg.index),
        bias=None if bias is None else bias[1],
        storage_cfg=cfg.storage,
    )
    logger.info(
        "wrote %d search shards (%s) in %.1f s",
        cfg.index.shards,
        cfg.index.ann,
        time.perf_counter() - started,
    )
    manifest = store.IndexManifest(
        version=layout.version,
        created_at=store.utc_now(),
        checkpoint=plan.checkpoint,
        checkpoint_digest=plan.checkpoint_digest,
        embed_dim=embed_dim,
        n_prototypes=n_prototypes,
        dtype=cfg.index.dtype,
        n_clips=sum(m["clips"] for m in filled),
        n_texts=sum(m["texts"] for m in filled),
        clips_with_audio=sum(m["with_audio"] for m in filled),
        clip_files=clip_files,
        text_files=text_files,
        source=plan.source,
        splits=sorted(cfg.index.splits),
        bias=None if bias is None else bias[0],
        search=search,
        segments=(
            {
                "settings": segment_settings(cfg.index),
                "window_s": filled[0]["window"][0],
                "hop_s": filled[0]["window"][1],
                "n_segments": sum(m["segments"] for m in filled),
            }
            if cfg.index.segments
            else {}
        ),
        build={
            "units": len(plan.files),
            "reused_clips": sum(m.get("reused", 0) for m in markers.values()),
            "deleted_clips": sum(m.get("deleted", 0) for m in markers.values()),
            "failed_clips": len(failures),
            "failures": failures[:100],
            **build,
        },
    )
    store.write_manifest(layout.root, manifest, cfg.storage)
    return manifest


def run_build_index(cfg: Config) -> dict[str, Any]:
    """Build (or resume) the index version the config describes; return its summary.

    Needs a running Ray (see `gpa_ray.jobs_cli.init_ray`).
    """
    started = time.perf_counter()
    cfg = resolve_stage_uris(cfg)
    check_cpu_pool(cfg.index.embed_pool, "index.embed_pool")
    plan = plan_build(cfg)
    layout = plan.layout
    if storage.exists(layout.manifest, cfg.storage):
        logger.info("index version %s is already complete", layout.version)
        manifest = store.read_manifest(layout, cfg.storage)
        return _summary(manifest, layout, units=0, clips=0, wall=time.perf_counter() - started)
    done = _committed(cfg, layout)
    todo = [u for u in range(len(plan.files)) if u not in done]
    if done:
        logger.info("resuming: %d of %d units already committed", len(done), len(plan.files))
    clips = embed_units(cfg, plan, todo) if todo else 0
    wall = time.perf_counter() - started
    build = {"last_run_units": len(todo), "last_run_clips": clips, "last_run_wall_s": wall}
    manifest = commit_version(cfg, plan, build)
    return _summary(manifest, layout, units=len(todo), clips=clips, wall=wall)


def _summary(
    manifest: store.IndexManifest, layout: store.IndexLayout, units: int, clips: int, wall: float
) -> dict[str, Any]:
    return {
        "index": layout.dir,
        "version": manifest.version,
        "checkpoint": manifest.checkpoint,
        "clips": manifest.n_clips,
        "texts": manifest.n_texts,
        "clips_with_audio": manifest.clips_with_audio,
        "failed_clips": manifest.build.get("failed_clips", 0),
        "reused_clips": manifest.build.get("reused_clips", 0),
        "embedded_clips": manifest.n_clips - manifest.build.get("reused_clips", 0),
        "deleted_clips": manifest.build.get("deleted_clips", 0),
        "has_bias": manifest.bias is not None,
        "units_this_run": units,
        "clips_this_run": clips,
        "wall_time_s": wall,
        "clips_per_second": clips / wall if wall > 0 else 0.0,
    }

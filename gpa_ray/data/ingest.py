"""Ingest on Ray Data: corpus manifest -> EnCodec codes (+ FLAC audio) -> parquet shards.

Design (streaming, resumable, correct; in the order a run does it):

1. **Manifest -> work units** (`gpa_ray.data.work_units`). The corpus reader's rows are
   streamed once into a stored manifest, grouped into numbered work units of one split;
   the unit plan is committed last and reused by every rerun on the output.
2. **Skip what is committed.** A unit is done iff its commit marker exists. Only the
   other units become the rows of a Ray Dataset (one unit per block), handed to actors
   one at a time so no actor hoards queued units while another idles.
3. **Encode on an actor pool.** `map_batches(UnitEncoder, compute=ActorPoolStrategy)`
   with fractional CPUs (0.5 by default: two actors at 1 CPU each would starve Ray Data's
   own tasks on a 2-core machine and deadlock without an error). Each actor loads the
   EnCodec model once, runs torch on one thread (or its GPU), and for each unit reads
   that unit's manifest rows, fetches the bytes through `gpa_ray.storage` on a few
   threads while it encodes, then decodes, resamples, tokenises and FLAC-encodes clip by
   clip (EnCodec batches of `ingest.encode_pool.batch_size` on a GPU). A failure of one
   clip becomes an error row (stage locate | read | decode | encode) and never stops the
   unit or the job. Units, not clips, are the dataset rows because a unit must be written as one
   file by one writer to commit atomically: regrouping clip rows into units after a
   distributed map would need a shuffle (a barrier) or would funnel every byte through
   the driver.
4. **Commit a unit atomically.** The actor writes `units/<corpus>/<split>/part-N.parquet`
   (staging) and `errors/<corpus>/part-N.parquet` (each atomic: temporary name + rename
   locally, a single upload on S3), then the commit marker, which also carries the unit's
   counts and file size. A run killed mid-unit leaves no partial file (at worst a whole
   file of an uncommitted unit); the rerun redoes that unit and rewrites the same names
   with the same rows, so the result has neither duplicates nor gaps. One run at a time
   per output.
5. **Compact** (`gpa_ray.data.compaction`), once every unit is committed: the units of
   each split are rewritten as `clips/<corpus>/<split>/part-N.parquet` shards of about
   `target_shard_mb`, the files readers see, under the same discipline (a stored plan,
   atomic shards, a marker per shard, unit files deleted only after the last marker).
6. **Summarise.** The driver logs a line per committed unit (Ray Data shows progress
   bars), then writes `summary.json` (clips ok, failures per stage, audio hours,
   audio-seconds per second, wall time) beside `config.yaml` (the resolved config,
   written at the start).

Memory stays bounded at any corpus size: the driver holds the unit table (a few numbers
per unit) and never the manifest rows (while building the manifest, one hash per clip
to drop duplicate ids); an actor holds one unit (<= `target_shard_mb`) plus a few
prefetched files; a compaction task one unit plus one shard being built; Ray Data passes
only per-unit counts back to the driver.

Outputs are folders, not hive `key=value` partitions, because every file also carries
its `corpus` and `split` columns (each file is self-describing) and a hive reader would
clash with them.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gpa_ray import storage
from gpa_ray.config import Config
from gpa_ray.config_loading import config_from_dict, config_to_dict
from gpa_ray.data import hf_dataset, schema
from gpa_ray.data.compaction import compact
from gpa_ray.data.corpora import corpus_name
from gpa_ray.data.failure_report import commonest_errors, failure_message
from gpa_ray.data.work_units import (
    Layout,
    committed_units,
    load_or_build_manifest,
    read_unit_rows,
    remove_stale_temporaries,
)

logger = logging.getLogger(__name__)


class ClipFailure(Exception):
    """One clip failed at `stage`; `error` is the readable "Type: message" text."""

    def __init__(self, stage: str, exc: BaseException | str) -> None:
        self.stage = stage
        self.error = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        super().__init__(f"{stage}: {self.error}")


# --------------------------------------------------------------------------- encoding


class ClipEncoder:
    """Bytes of one clip -> a clip-shard row, or a `ClipFailure` naming the stage.

    Pure (no Ray): the pipeline's actors and the single-process benchmark loop run the
    very same code, so their throughputs compare like with like.
    """

    def __init__(self, cfg: Config, device: str | None = None) -> None:
        from gpa_ray.audio.codec import EncodecTokenizer

        if cfg.ingest.pad_to_max_seconds and cfg.ingest.max_seconds is None:
            raise ValueError(
                "ingest.pad_to_max_seconds=true needs ingest.max_seconds: the length to pad to"
            )
        self.cfg = cfg
        self.dataset_rows = hf_dataset.RowAudio(cfg.corpus.audio_column)
        self.tokenizer = (
            EncodecTokenizer(
                weights=cfg.codec.weights,
                bandwidth=cfg.codec.bandwidth,
                device=device or cfg.codec.device,
                storage_cfg=cfg.storage,
                chunk_s=cfg.codec.chunk_s,
                chunk_overlap_s=cfg.codec.chunk_overlap_s,
            )
            if cfg.ingest.codes
            else None
        )

    def fetch(self, row: dict[str, Any]) -> bytes:
        """The clip's bytes. A missing file fails at `locate`; an unreadable local file at
        `read`. An S3 read that still fails after the client's retries (throttling, resets:
        transient) is never an error row: it fails the whole unit, which Ray Data retries
        (`ingest.unit_retries`) and a rerun redoes."""
        uri = row["source_uri"]
        if not uri:
            raise ClipFailure("locate", "FileNotFoundError: the corpus index names no audio file")
        if hf_dataset.is_row_uri(uri):
            try:
                return self.dataset_rows.read(uri)
            except FileNotFoundError as exc:
                raise ClipFailure("locate", exc) from exc
            except OSError as exc:
                raise ClipFailure("read", exc) from exc
        try:
            return storage.read_bytes(uri, self.cfg.storage)
        except Exception as exc:
            try:
                missing = not storage.exists(uri, self.cfg.storage)
            except Exception:
                missing = False
            if missing:
                raise ClipFailure("locate", f"FileNotFoundError: no such file {uri}") from exc
            if storage.is_s3(uri):
                raise storage.StorageError(
                    f"cannot read {uri} after {self.cfg.storage.max_attempts} attempts: {exc}"
                ) from exc
            raise ClipFailure("read", exc) from exc

    def decode(self, row: dict[str, Any], data: bytes) -> tuple[np.ndarray, int]:
        """Mono waveform of the clip's segment at its original rate."""
        from gpa_ray.audio.io import decode_audio

        try:
            wave, sr = decode_audio(data, row["source_uri"])
        except Exception as exc:
            raise ClipFailure("decode", exc) from exc
        start = int(round(row["start_s"] * sr))
        length = row["duration_s"]
        if self.cfg.ingest.max_seconds is not None:
            length = min(length or np.inf, self.cfg.ingest.max_seconds)
        stop = wave.shape[0] if length in (None, np.inf) else start + int(round(length * sr))
        segment = wave[start:stop]
        if segment.shape[0] == 0:
            raise ClipFailure(
                "decode",
                f"EmptySegment: segment at {row['start_s']} s of {wave.shape[0] / sr:.3f} s "
                "of audio holds no samples",
            )
        if self.cfg.ingest.pad_to_max_seconds:
            target = int(round(self.cfg.ingest.max_seconds * sr))
            segment = np.pad(segment, (0, max(0, target - segment.shape[0])))
        return segment, sr

    def encode(
        self, items: list[tuple[dict[str, Any], np.ndarray, int]]
    ) -> list[dict[str, Any] | ClipFailure]:
        """EnCodec codes (24 kHz) and optional FLAC audio for decoded (row, wave, rate) items.

        The items are tokenised in one EnCodec batch; if that batch fails, each item is
        retried alone so only the clip at fault becomes an `encode` failure.
        """
        from gpa_ray.audio.codec import CODEC_SAMPLE_RATE
        from gpa_ray.audio.io import resample

        if not items:
            return []
        if self.tokenizer is None:  # ingest.codes=false: no EnCodec at all
            return [self._finish(item, None) for item in items]
        if len(items) > 1:
            try:
                waves = [resample(w, sr, CODEC_SAMPLE_RATE) for _, w, sr in items]
                codes = self.tokenizer.encode(waves)
            except Exception:
                return [out for item in items for out in self.encode([item])]
            return [self._finish(item, c) for item, c in zip(items, codes, strict=True)]
        ((row, wave, sr),) = items
        try:
            codes = self.tokenizer.encode_one(resample(wave, sr, CODEC_SAMPLE_RATE))
        except Exception as exc:
            return [ClipFailure("encode", exc)]
        return [self._finish(items[0], codes)]

    def _finish(
        self, item: tuple[dict[str, Any], np.ndarray, int], codes: np.ndarray | None
    ) -> dict[str, Any] | ClipFailure:
        """The clip-shard row: codes plus the FLAC audio at the feature rate if stored."""
        from gpa_ray.audio.io import encode_flac, resample

        row, wave, sr = item
        audio = None
        if self.cfg.ingest.store_audio:
            rate = self.cfg.ingest.audio_sample_rate
            try:
                audio = encode_flac(resample(wave, sr, rate), rate)
            except Exception as exc:
                return ClipFailure("encode", exc)
        return {
            **row,
            "duration_s": wave.shape[0] / sr,
            "n_samples": wave.shape[0],
            "sample_rate": sr,
            "codes": codes,
            "audio": audio,
            "audio_sample_rate": self.cfg.ingest.audio_sample_rate if audio is not None else None,
        }

    def process(self, row: dict[str, Any], data: bytes) -> dict[str, Any]:
        """One clip end to end (decode -> codes -> FLAC); raises `ClipFailure`."""
        wave, sr = self.decode(row, data)
        (out,) = self.encode([(row, wave, sr)])
        if isinstance(out, ClipFailure):
            raise out
        return out


def _prefetch(
    fn: Callable[[dict[str, Any]], bytes],
    rows: Iterable[dict[str, Any]],
    pool: ThreadPoolExecutor,
    window: int,
) -> Iterator[tuple[dict[str, Any], Future[bytes]]]:
    """Yield (row, future of fn(row)) in order, keeping at most `window` fetches in flight."""
    queue: collections.deque[tuple[dict[str, Any], Future[bytes]]] = collections.deque()
    for row in rows:
        queue.append((row, pool.submit(fn, row)))
        if len(queue) >= window:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def clip_shard_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Clip rows -> a table with `schema.CLIP_SCHEMA` (codes built without a per-code loop)."""
    arrays = []
    for field in schema.CLIP_SCHEMA:
        values = [r[field.name] for r in rows]
        if field.name == "codes" and all(v is not None for v in values):
            arrays.append(schema.codes_array(values))
        else:
            arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema.CLIP_SCHEMA)


def errors_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema.ERROR_SCHEMA)


STAT_KEYS = (
    "unit",
    "split",
    "ok",
    "failed",
    *(f"failed_{s}" for s in schema.STAGES),
    "audio_seconds",
    "bytes",
)


class UnitEncoder:
    """Ray Data callable class: encodes and commits whole work units (one per batch row).

    Constructed once per actor, so the EnCodec model is loaded once per actor.
    """

    def __init__(self, cfg: dict[str, Any], corpus: str) -> None:
        import torch

        torch.set_num_threads(1)
        self.cfg = config_from_dict(cfg)
        device = self.cfg.codec.device
        if self.cfg.ingest.encode_pool.gpus_per_actor > 0 and device == "cpu":
            device = "cuda"
        self.encoder = ClipEncoder(self.cfg, device=device)
        # Batching pays on a GPU; on CPU EnCodec is no faster batched and padding to the
        # longest clip of a batch would only add work.
        self.encode_batch = max(1, self.cfg.ingest.encode_pool.batch_size) if device != "cpu" else 1
        self.layout = Layout(self.cfg.ingest.output, corpus)
        self.pool = ThreadPoolExecutor(max(1, self.cfg.ingest.read_threads))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        stats = [
            self.run_unit(int(unit), str(split), int(file_index))
            for unit, split, file_index in zip(
                batch["unit"], batch["split"], batch["file"], strict=True
            )
        ]
        return {key: [s[key] for s in stats] for key in STAT_KEYS}

    def run_unit(self, unit: int, split: str, file_index: int) -> dict[str, Any]:
        """Encode one unit and commit it: clips file, errors file, then the marker."""
        cfg, layout = self.cfg, self.layout
        rows = read_unit_rows(cfg, layout, unit, file_index)
        ok: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []

        def fail(row: dict[str, Any], failure: ClipFailure) -> None:
            failed.append(
                {
                    "clip_id": row["clip_id"],
                    "corpus": row["corpus"],
                    "split": row["split"],
                    "source_uri": row["source_uri"],
                    "stage": failure.stage,
                    "error": failure.error,
                }
            )

        def flush(batch: list[tuple[dict[str, Any], np.ndarray, int]]) -> None:
            for item, out in zip(batch, self.encoder.encode(batch), strict=True):
                if isinstance(out, ClipFailure):
                    fail(item[0], out)
                else:
                    ok.append(out)
            batch.clear()

        batch: list[tuple[dict[str, Any], np.ndarray, int]] = []
        window = 2 * max(1, cfg.ingest.read_threads)
        for row, future in _prefetch(self.encoder.fetch, rows, self.pool, window):
            try:
                batch.append((row, *self.encoder.decode(row, future.result())))
            except ClipFailure as failure:
                fail(row, failure)
            if len(batch) >= self.encode_batch:
                flush(batch)
        flush(batch)
        size = _write_or_delete(layout.unit_file(split, unit), ok, clip_shard_table, cfg)
        _write_or_delete(layout.errors_file(unit), failed, errors_table, cfg)
        by_stage = collections.Counter(f["stage"] for f in failed)
        stats = {
            "unit": unit,
            "split": split,
            "ok": len(ok),
            "failed": len(failed),
            **{f"failed_{s}": by_stage.get(s, 0) for s in schema.STAGES},
            "audio_seconds": float(sum(r["duration_s"] for r in ok)),
            "bytes": size,
        }
        storage.write_bytes(layout.commit_marker(unit), json.dumps(stats).encode(), cfg.storage)
        return stats


def _write_or_delete(
    uri: str,
    rows: list[dict[str, Any]],
    to_table: Callable[[list[dict[str, Any]]], pa.Table],
    cfg: Config,
) -> int:
    """Write a unit's file (returning its size), or make sure none is left from an earlier,
    different attempt."""
    if not rows:
        storage.delete(uri, cfg.storage)
        return 0
    sink = io.BytesIO()
    pq.write_table(to_table(rows), sink, compression="zstd")
    storage.write_bytes(uri, sink.getvalue(), cfg.storage)
    return sink.tell()


# --------------------------------------------------------------------------- driver


def _read_stats(cfg: Config, layout: Layout, units: list[int]) -> list[dict[str, Any]]:
    """Counts of already-committed units, read from their markers (a few threads: S3)."""
    with ThreadPoolExecutor(8) as pool:
        return list(
            pool.map(
                lambda u: json.loads(storage.read_bytes(layout.commit_marker(u), cfg.storage)),
                units,
            )
        )


def _totals(stats: Iterable[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"units": 0, "ok": 0, "failed": 0, "audio_seconds": 0.0}
    total.update({f"failed_{s}": 0 for s in schema.STAGES})
    for s in stats:
        total["units"] += 1
        for key in total:
            if key != "units":
                total[key] += s[key]
    return total


def run_ingest(cfg: Config) -> dict[str, Any]:
    """Run (or resume) the ingest the config describes; return the summary it also writes.

    Needs a running Ray (see `gpa_ray.jobs_cli.init_ray`).
    """
    import ray

    started = time.perf_counter()
    output = cfg.ingest.output
    layout = Layout(output, corpus_name(cfg.corpus))
    remove_stale_temporaries(cfg, output)
    storage.dump_config(cfg, storage.join(output, "config.yaml"))
    plan = load_or_build_manifest(cfg, layout)
    done = committed_units(cfg, layout)
    todo = [u for u in plan["units"] if u["unit"] not in done]
    skipped = [u["unit"] for u in plan["units"] if u["unit"] in done]
    if skipped:
        logger.info("resuming: %d of %d units already committed", len(skipped), len(plan["units"]))
    new_stats: list[dict[str, Any]] = []
    if todo:
        items = [{"unit": u["unit"], "split": u["split"], "file": u["file"]} for u in todo]
        encoders = max(1, min(cfg.ingest.encode_pool.actors, len(items)))
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            UnitEncoder,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=encoders, max_tasks_in_flight_per_actor=1),
            fn_constructor_kwargs={"cfg": config_to_dict(cfg), "corpus": layout.corpus},
            num_cpus=cfg.ingest.encode_pool.cpus_per_actor,
            num_gpus=cfg.ingest.encode_pool.gpus_per_actor or None,
            max_task_retries=cfg.ingest.unit_retries,
        )
        # A unit whose storage access outlasted the client's retries is redone whole.
        dataset.context.actor_task_retry_on_errors = [storage.StorageError]
        for stats in dataset.iter_rows():
            new_stats.append(stats)
            logger.info(
                "committed unit %d (%s): %d ok, %d failed, %.1f audio-s [%d/%d units this run]",
                stats["unit"],
                stats["split"],
                stats["ok"],
                stats["failed"],
                stats["audio_seconds"],
                len(new_stats),
                len(todo),
            )
    all_stats = [*_read_stats(cfg, layout, skipped), *new_stats]
    shards = compact(cfg, layout, plan["units"], {int(s["unit"]): s for s in all_stats})
    wall = time.perf_counter() - started
    this_run = _totals(new_stats)
    total = _totals(all_stats)
    failure = failure_message(total["ok"], total["failed"], cfg.ingest.max_failed_share)
    failing_units = [layout.errors_file(s["unit"]) for s in all_stats if s["failed"]]
    summary = {
        "corpus": layout.corpus,
        "output": output,
        "clips_in_manifest": plan["n_rows"],
        "duplicates_dropped": plan["duplicates_dropped"],
        "units": len(plan["units"]),
        "clips_ok": total["ok"],
        "clips_failed": total["failed"],
        "failed_by_stage": {s: total[f"failed_{s}"] for s in schema.STAGES},
        "audio_hours": total["audio_seconds"] / 3600.0,
        "compaction": shards,
        "this_run": {
            "units_committed": this_run["units"],
            "units_skipped": len(skipped),
            "clips_ok": this_run["ok"],
            "clips_failed": this_run["failed"],
            "audio_seconds": this_run["audio_seconds"],
        },
        "wall_time_s": wall,
        "audio_seconds_per_second": this_run["audio_seconds"] / wall if wall > 0 else 0.0,
        "failure": failure,
        "commonest_errors": commonest_errors(failing_units, cfg.storage) if failing_units else [],
    }
    storage.write_bytes(
        storage.join(output, "summary.json"), json.dumps(summary, indent=2).encode(), cfg.storage
    )
    if failure:
        logger.error("ingest failed: %s (commonest errors in summary.json)", failure)
    return summary

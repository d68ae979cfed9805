"""Compaction: committed work units -> clip shards of `ingest.target_shard_mb` for readers.

Work units stay small (`ingest.rows_per_commit` clips: the resume granularity, ~0.4 MB at
AudioSet's 64 clips of codes), so an ingest of 2M clips commits ~32k unit files. Readers
want few large files (128-512 MB suit S3 and Ray Data). So encoder actors commit units to
a staging folder, `<output>/units/<corpus>/<split>/`, and once every unit is committed the
job compacts them into `<output>/clips/<corpus>/<split>/part-N.parquet`, the only clip
files readers see (the entry point `loaders.split_files` lists is unchanged).

The commit protocol, each step resumable (a rerun redoes only what has no marker):

1. **Plan.** From the units' commit markers (clips and bytes per unit), each split's rows,
   in unit order, are cut into shards of about `target_shard_mb` (`plan_shards`; a shard
   may end inside a unit: it is a list of row slices `[unit, start, stop]`). The plan is
   written once as `_compaction/<corpus>/plan.json` and reused by every rerun, so shard N
   always holds the same rows.
2. **Shards.** One Ray task per shard streams its slices (one unit read at a time) into
   row groups of about `ingest.row_group_mb` of Arrow data and commits the file
   atomically (temporary name + rename locally; one upload on S3), then its marker
   `_compaction/<corpus>/<split>/shard-N.json`. A killed task leaves no visible partial
   file; a rerun rewrites the same rows under the same name.
3. **Clean up.** Only when every shard has its marker are the unit files deleted (a split
   at a time; deleting again is a no-op). Units' commit markers stay: they carry the
   counts the summary adds up and tell a rerun that no unit needs encoding again.

So at every step `clips/` holds whole shards only, and after step 2 exactly every
committed row once. Memory per task: one row group being built plus one unit (and on S3
the shard, uploaded in one piece); the driver holds the plan (a few numbers per shard).

`GPA_RAY_INGEST_KILL_AT=<step>:<n>` (`compact` or `cleanup`) makes the driver SIGKILL
itself after the n-th shard committed or split cleaned in this run: a fault-injection
hook for the tests that kill an ingest inside compaction and resume it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gpa_ray import storage
from gpa_ray.config import Config, StorageConfig
from gpa_ray.config_loading import config_from_dict, config_to_dict
from gpa_ray.data import schema
from gpa_ray.data.work_units import IngestError, Layout

logger = logging.getLogger(__name__)

MB = 1024 * 1024
KILL_HOOK = "GPA_RAY_INGEST_KILL_AT"

Slice = list[int]
"""`[unit, start, stop]`: rows start..stop-1 of a unit's clips file."""


def plan_shards(units: list[dict[str, Any]], target_bytes: float) -> list[list[Slice]]:
    """Cut one split's committed units (`unit`, `ok` rows, `bytes` of their file, in unit
    order) into shards of about `target_bytes`.

    A unit's bytes are spread evenly over its rows; a shard closes at the row that brings
    it nearest the target, so every shard but the last is within half a row of it (a
    single row bigger than that makes a shard of its own). A last shard under half the
    target joins the one before if that stays <= 1.5x.
    """
    shards: list[list[Slice]] = []
    sizes: list[float] = []
    current: list[Slice] = []
    size = 0.0
    for unit in units:
        rows, start = int(unit["ok"]), 0
        per_row = unit["bytes"] / rows if rows else 0.0
        while start < rows:
            take = min(rows - start, round((target_bytes - size) / per_row) if per_row else rows)
            if take > 0 or not current:
                take = max(take, 1)
                current.append([int(unit["unit"]), start, start + take])
                size += take * per_row
                start += take
            if take == 0 or size >= target_bytes - per_row / 2:
                shards.append(current)
                sizes.append(size)
                current, size = [], 0.0
    if current:
        if shards and size < target_bytes / 2 and sizes[-1] + size <= 1.5 * target_bytes:
            shards[-1].extend(current)
        else:
            shards.append(current)
    return shards


def compaction_plan(
    cfg: Config, layout: Layout, units: list[dict[str, Any]], stats: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    """The stored compaction plan of this output, else a new one from the unit markers."""
    if storage.exists(layout.compaction_plan_file, cfg.storage):
        return json.loads(storage.read_bytes(layout.compaction_plan_file, cfg.storage))
    by_split: dict[str, list[dict[str, Any]]] = {}
    for unit in units:
        marker = stats[unit["unit"]]
        by_split.setdefault(unit["split"], []).append(
            {"unit": unit["unit"], "ok": int(marker["ok"]), "bytes": int(marker["bytes"])}
        )
    target = int(cfg.ingest.target_shard_mb * MB)
    plan = {
        "target_bytes": target,
        "row_group_bytes": int(cfg.ingest.row_group_mb * MB),
        "splits": {split: plan_shards(members, target) for split, members in by_split.items()},
    }
    storage.write_bytes(layout.compaction_plan_file, json.dumps(plan).encode(), cfg.storage)
    return plan


@contextlib.contextmanager
def _atomic_output(uri: str, storage_cfg: StorageConfig) -> Iterator[Any]:
    """A sink whose bytes become visible at `uri` all at once, only if the block succeeds:
    locally a temporary file renamed into place, on S3 one upload of the buffered file."""
    fs, path = storage.resolve(uri, storage_cfg)
    if not isinstance(fs, pafs.LocalFileSystem):
        sink = pa.BufferOutputStream()
        yield sink
        storage.write_bytes(uri, memoryview(sink.getvalue()), storage_cfg)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_shard(
    cfg_dict: dict[str, Any],
    corpus: str,
    split: str,
    index: int,
    slices: list[Slice],
    row_group_bytes: int,
) -> dict[str, Any]:
    """Stream a shard's slices into `clips/<corpus>/<split>/part-<index>.parquet` in row
    groups of about `row_group_bytes` (Arrow, decoded), then commit its marker."""
    cfg = config_from_dict(cfg_dict)
    layout = Layout(cfg.ingest.output, corpus)
    uri = layout.clips_file(split, index)
    rows = groups = 0
    with _atomic_output(uri, cfg.storage) as sink:
        writer = pq.ParquetWriter(sink, schema.CLIP_SCHEMA, compression="zstd")
        pending: list[pa.Table] = []
        for number, (unit, start, stop) in enumerate(slices):
            table = storage.read_parquet(layout.unit_file(split, unit), cfg.storage)
            if table.num_rows < stop:
                raise IngestError(
                    f"{layout.unit_file(split, unit)} holds {table.num_rows} clips, the "
                    f"compaction plan needs {stop}"
                )
            pending.append(table.slice(start, stop - start).cast(schema.CLIP_SCHEMA))
            last = number == len(slices) - 1
            pending, written, n_groups = _write_row_groups(writer, pending, row_group_bytes, last)
            rows, groups = rows + written, groups + n_groups
        writer.close()
    fs, path = storage.resolve(uri, cfg.storage)
    marker = {
        "split": split,
        "shard": index,
        "rows": rows,
        "row_groups": groups,
        "bytes": fs.get_file_info(path).size,
        "units": [slices[0][0], slices[-1][0]],
    }
    storage.write_bytes(layout.shard_marker(split, index), json.dumps(marker).encode(), cfg.storage)
    return marker


def _write_row_groups(
    writer: pq.ParquetWriter, pending: list[pa.Table], row_group_bytes: int, last: bool
) -> tuple[list[pa.Table], int, int]:
    """Write the whole row groups `pending` holds (all of it if `last`); return what is
    left, the rows written and the row groups written."""
    table = pa.concat_tables(pending)
    if not table.num_rows:
        return [], 0, 0
    per_group = max(1, round(row_group_bytes / (table.nbytes / table.num_rows)))
    start = groups = 0
    while table.num_rows - start >= per_group or (last and start < table.num_rows):
        piece = table.slice(start, per_group)
        writer.write_table(piece, row_group_size=piece.num_rows)
        start += piece.num_rows
        groups += 1
    rest = [table.slice(start).combine_chunks()] if start < table.num_rows else []
    return rest, start, groups


def _kill_point(step: str, count: int) -> None:
    """SIGKILL this process at the `KILL_HOOK` point, if one is set (tests only)."""
    if os.environ.get(KILL_HOOK) == f"{step}:{count}":
        logger.warning("%s=%s: killing the driver", KILL_HOOK, os.environ[KILL_HOOK])
        os.kill(os.getpid(), signal.SIGKILL)


def _shard_markers(cfg: Config, layout: Layout) -> dict[tuple[str, int], str]:
    """(split, shard) -> marker URI of every committed shard."""
    markers = storage.list_files(layout.compaction_dir, ".json", cfg.storage)
    out = {}
    for uri in markers:
        split, _, name = uri[len(layout.compaction_dir) + 1 :].rpartition("/")
        if split and name.startswith("shard-"):
            out[(split, int(name[len("shard-") : -len(".json")]))] = uri
    return out


def compact(
    cfg: Config, layout: Layout, units: list[dict[str, Any]], stats: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    """Run (or resume) the compaction of a fully committed ingest; return shard figures."""
    import ray

    plan = compaction_plan(cfg, layout, units, stats)
    done = _shard_markers(cfg, layout)
    todo = [
        (split, index, slices)
        for split, shards in plan["splits"].items()
        for index, slices in enumerate(shards)
        if (split, index) not in done
    ]
    total = sum(len(shards) for shards in plan["splits"].values())
    if todo:
        logger.info("compacting: %d of %d shards to write", len(todo), total)
    task = ray.remote(write_shard).options(
        num_cpus=cfg.ingest.encode_pool.cpus_per_actor,
        memory=int(2 * plan["target_bytes"] + plan["row_group_bytes"]),
        max_retries=cfg.ingest.unit_retries,
        retry_exceptions=[storage.StorageError],
    )
    config = config_to_dict(cfg)
    pending = [
        task.remote(config, layout.corpus, split, index, slices, plan["row_group_bytes"])
        for split, index, slices in todo
    ]
    committed = 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        marker = ray.get(ready[0])
        committed += 1
        logger.info(
            "committed shard %s/%d: %d clips, %.1f MB, %d row groups [%d/%d shards this run]",
            marker["split"],
            marker["shard"],
            marker["rows"],
            marker["bytes"] / MB,
            marker["row_groups"],
            committed,
            len(todo),
        )
        _kill_point("compact", committed)
    for number, split in enumerate(plan["splits"], start=1):
        _delete_dir(layout.units_split_dir(split), cfg.storage)
        _kill_point("cleanup", number)
    _delete_dir(layout.units_dir, cfg.storage)
    return _shard_figures(cfg, layout, plan, committed)


def _delete_dir(uri: str, storage_cfg: StorageConfig) -> None:
    fs, path = storage.resolve(uri, storage_cfg)
    if fs.get_file_info(path).type == pafs.FileType.Directory or storage.is_s3(uri):
        fs.delete_dir_contents(path, missing_dir_ok=True)
        with contextlib.suppress(FileNotFoundError, OSError):
            fs.delete_dir(path)


def _shard_figures(
    cfg: Config, layout: Layout, plan: dict[str, Any], committed: int
) -> dict[str, Any]:
    """Shard count and sizes from the markers, for the summary."""
    markers = sorted(_shard_markers(cfg, layout).items())
    with ThreadPoolExecutor(8) as pool:
        shards = list(
            pool.map(lambda m: json.loads(storage.read_bytes(m[1], cfg.storage)), markers)
        )
    sizes = [s["bytes"] / MB for s in shards]
    return {
        "shards": len(shards),
        "shards_this_run": committed,
        "target_shard_mb": plan["target_bytes"] / MB,
        "row_group_mb": plan["row_group_bytes"] / MB,
        "shard_mb_min": min(sizes, default=0.0),
        "shard_mb_max": max(sizes, default=0.0),
        "shard_mb_mean": sum(sizes) / len(sizes) if sizes else 0.0,
        "row_groups": sum(s["row_groups"] for s in shards),
        "rows": sum(s["rows"] for s in shards),
    }

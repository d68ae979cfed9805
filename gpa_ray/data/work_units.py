"""The work-unit plan of an ingest output and where its files live.

An ingest streams the corpus reader's rows once into parquet manifest files under
`<output>/manifest/<corpus>/`, grouped into numbered *work units* of at most
`rows_per_commit` clips (fewer if `target_shard_mb` says so) of one split, in reader
order, so the assignment is deterministic. The unit plan (the unit table, the unit size
and the settings that shape the output) is committed last as `_manifest.json`; every
later run on that output reuses it (and refuses other corpus/codec settings), so a
resumed run encodes the same units even if the corpus folder changed in the meantime.
A unit is done iff its commit marker `<output>/_commits/<corpus>/unit-N.json` exists.

Driver memory is the unit table (a few numbers per unit) plus, while the plan is built,
one hash per clip (to drop duplicate ids) and one unit of rows per split.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gpa_ray import storage
from gpa_ray.config import Config
from gpa_ray.data import schema
from gpa_ray.data.corpora import iter_manifest

logger = logging.getLogger(__name__)

# Size model used to cap a unit at `target_shard_mb`: a nominal 10 s clip.
_NOMINAL_CLIP_S = 10.0
_FLAC_RATIO = 0.6
_BYTES_PER_CODE = 2


class IngestError(RuntimeError):
    """The run cannot proceed as configured (not a per-clip failure: those are error rows)."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where everything of one corpus lives under an ingest output."""

    output: str
    corpus: str

    @property
    def manifest_dir(self) -> str:
        return storage.join(self.output, "manifest", self.corpus)

    @property
    def unit_plan_file(self) -> str:
        return storage.join(self.manifest_dir, "_manifest.json")

    @property
    def commits_dir(self) -> str:
        return storage.join(self.output, "_commits", self.corpus)

    def manifest_file(self, index: int) -> str:
        return storage.join(self.manifest_dir, f"part-{index:05d}.parquet")

    def clips_file(self, split: str, unit: int) -> str:
        return storage.join(self.output, "clips", self.corpus, split, f"part-{unit:06d}.parquet")

    def errors_file(self, unit: int) -> str:
        return storage.join(self.output, "errors", self.corpus, f"part-{unit:06d}.parquet")

    def commit_marker(self, unit: int) -> str:
        return storage.join(self.commits_dir, f"unit-{unit:06d}.json")


def rows_per_unit(cfg: Config) -> int:
    """Clips per work unit: `rows_per_commit`, capped so a shard stays near `target_shard_mb`."""
    seconds = min(_NOMINAL_CLIP_S, cfg.ingest.max_seconds or _NOMINAL_CLIP_S)
    per_clip = seconds * 75 * 4 * _BYTES_PER_CODE if cfg.ingest.codes else 1.0
    if cfg.ingest.store_audio:
        per_clip += seconds * cfg.ingest.audio_sample_rate * 2 * _FLAC_RATIO
    cap = max(1, int(cfg.ingest.target_shard_mb * 1024 * 1024 // per_clip))
    return max(1, min(cfg.ingest.rows_per_commit, cap))


def output_settings(cfg: Config) -> dict[str, Any]:
    """What must not change between runs on one output (else its shards would disagree)."""
    return {
        "corpus": dataclasses.asdict(cfg.corpus),
        "codec": {"weights": cfg.codec.weights, "bandwidth": cfg.codec.bandwidth},
        "store_audio": cfg.ingest.store_audio,
        "codes": cfg.ingest.codes,
        "audio_sample_rate": cfg.ingest.audio_sample_rate,
        "max_seconds": cfg.ingest.max_seconds,
    }


def build_manifest(cfg: Config, layout: Layout) -> dict[str, Any]:
    """Stream the corpus reader into unit-tagged manifest files; return the unit table.

    Rows are buffered per split until a unit is full, so a unit never mixes splits and
    each unit yields exactly one clips file. Memory: one unit per split plus one file.
    """
    per_unit = rows_per_unit(cfg)
    per_file = max(1, cfg.ingest.units_per_manifest_file)
    units: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    buffers: dict[str, list[dict[str, Any]]] = {}
    seen: set[int] = set()
    duplicates = 0

    def flush_file() -> None:
        if not pending:
            return
        index = pending[0]["unit"] // per_file
        table = pa.Table.from_pylist(pending, schema=schema.WORK_MANIFEST_SCHEMA)
        storage.write_parquet(layout.manifest_file(index), table, cfg.storage)
        pending.clear()

    def add_unit(split: str, rows: list[dict[str, Any]]) -> None:
        unit = len(units)
        units.append({"unit": unit, "split": split, "rows": len(rows), "file": unit // per_file})
        pending.extend({**row, "unit": unit} for row in rows)
        if len(units) % per_file == 0:
            flush_file()

    for row in iter_manifest(cfg.corpus, cfg.storage):
        key = hash(row["clip_id"])
        if key in seen:
            duplicates += 1
            logger.warning(
                "duplicate clip_id %s in the corpus index: kept the first", row["clip_id"]
            )
            continue
        seen.add(key)
        buffer = buffers.setdefault(row["split"], [])
        buffer.append(row)
        if len(buffer) == per_unit:
            add_unit(row["split"], buffer)
            buffers[row["split"]] = []
    for split, buffer in buffers.items():
        if buffer:
            add_unit(split, buffer)
    flush_file()
    plan = {
        "settings": output_settings(cfg),
        "rows_per_unit": per_unit,
        "n_rows": sum(u["rows"] for u in units),
        "duplicates_dropped": duplicates,
        "units": units,
    }
    storage.write_bytes(layout.unit_plan_file, json.dumps(plan).encode(), cfg.storage)
    logger.info(
        "manifest: %d clips in %d units of <= %d under %s",
        plan["n_rows"],
        len(units),
        per_unit,
        layout.manifest_dir,
    )
    return plan


def load_or_build_manifest(cfg: Config, layout: Layout) -> dict[str, Any]:
    """The committed manifest of this output if there is one (checked), else a new one."""
    if storage.exists(layout.unit_plan_file, cfg.storage):
        plan = json.loads(storage.read_bytes(layout.unit_plan_file, cfg.storage))
        stored, current = plan["settings"], output_settings(cfg)
        if stored != current:
            changed = sorted(
                k for k in set(stored) | set(current) if stored.get(k) != current.get(k)
            )
            raise IngestError(
                f"{layout.output} already holds corpus {layout.corpus!r} ingested with other "
                f"settings ({', '.join(changed)} differ); use a new ingest.output"
            )
        if plan["rows_per_unit"] != rows_per_unit(cfg):
            logger.info(
                "resuming with the stored unit size %d (config now gives %d)",
                plan["rows_per_unit"],
                rows_per_unit(cfg),
            )
        return plan
    return build_manifest(cfg, layout)


def read_unit_rows(cfg: Config, layout: Layout, unit: int, file_index: int) -> list[dict[str, Any]]:
    """The manifest rows of one unit, in manifest order."""
    fs, path = storage.resolve(layout.manifest_file(file_index), cfg.storage)
    table = pq.read_table(path, filesystem=fs, filters=[("unit", "=", unit)])
    return table.drop_columns(["unit"]).to_pylist()


def committed_units(cfg: Config, layout: Layout) -> set[int]:
    """Units whose commit marker exists."""
    markers = storage.list_files(layout.commits_dir, ".json", cfg.storage)
    return {int(uri.rsplit("unit-", 1)[1][: -len(".json")]) for uri in markers}


def remove_stale_temporaries(cfg: Config, output: str) -> None:
    """Delete temporary files a killed run left behind (local outputs; S3 uploads that
    never completed are invisible already)."""
    fs, path = storage.resolve(output, cfg.storage)
    if not isinstance(fs, pafs.LocalFileSystem):
        return
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    for info in fs.get_file_info(selector):
        if info.type == pafs.FileType.File and info.base_name.startswith(".tmp-"):
            fs.delete_file(info.path)

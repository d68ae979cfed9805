"""The work-unit plan of an ingest output and where its files live.

An ingest streams the corpus reader's rows once into parquet manifest files under
`<output>/manifest/<corpus>/`, grouped into numbered *work units* of at most
`rows_per_commit` clips (fewer if `target_shard_mb` says so) of one split, in reader
order, so the assignment is deterministic. The unit plan (the unit table, the unit size
and the settings that shape the output) is committed last as `_manifest.json`; every
later run on that output reuses it (and refuses other corpus/codec settings), so a
resumed run encodes the same units even if the corpus folder changed in the meantime.
A unit is done iff its commit marker `<output>/_commits/<corpus>/unit-N.json` exists.

The manifest is built streaming, as Arrow tables (`UnitPlanner`): AudioSet's segment
CSVs are read by pyarrow's CSV reader (`gpa_ray.data.audioset_index`), other corpora's
dict rows are batched. Driver memory is one table of rows, one unfinished unit per split
and one manifest file, plus the unit table (a few numbers per unit) and one hash per clip
(to drop duplicate ids): `benchmarks/manifest_scale.py` measures it up to 2M rows.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gpa_ray import storage
from gpa_ray.config import Config
from gpa_ray.data import schema
from gpa_ray.data.audioset_index import read_audioset_tables
from gpa_ray.data.corpora import iter_manifest

logger = logging.getLogger(__name__)

# Size model used to cap a unit at `target_shard_mb`: a nominal 10 s clip.
_NOMINAL_CLIP_S = 10.0
_FLAC_RATIO = 0.6
_BYTES_PER_CODE = 2


LAYOUT_VERSION = 2
"""Output layout of this code: units staged under `units/`, compacted into `clips/`."""


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

    def clips_file(self, split: str, shard: int) -> str:
        """A clip shard readers see (written by compaction)."""
        return storage.join(self.output, "clips", self.corpus, split, f"part-{shard:06d}.parquet")

    @property
    def units_dir(self) -> str:
        return storage.join(self.output, "units", self.corpus)

    def units_split_dir(self, split: str) -> str:
        return storage.join(self.units_dir, split)

    def unit_file(self, split: str, unit: int) -> str:
        """A committed unit's clips, staged until compaction (never read by readers)."""
        return storage.join(self.units_split_dir(split), f"part-{unit:06d}.parquet")

    @property
    def compaction_dir(self) -> str:
        return storage.join(self.output, "_compaction", self.corpus)

    @property
    def compaction_plan_file(self) -> str:
        return storage.join(self.compaction_dir, "plan.json")

    def shard_marker(self, split: str, shard: int) -> str:
        return storage.join(self.compaction_dir, split, f"shard-{shard:06d}.json")

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
        # Only when set, so outputs written before the setting existed still match.
        **({"pad_to_max_seconds": True} if cfg.ingest.pad_to_max_seconds else {}),
    }


MANIFEST_BATCH_ROWS = 65536
"""Rows per Arrow table when a corpus reader yields dicts (AudioSet yields tables)."""


def manifest_tables(cfg: Config) -> Iterator[pa.Table]:
    """The corpus reader's rows as `schema.MANIFEST_SCHEMA` tables, at most `corpus.limit`.

    AudioSet (the corpus of millions) is read straight into Arrow; the other readers'
    dicts are batched `MANIFEST_BATCH_ROWS` at a time.
    """
    if cfg.corpus.kind == "audioset" and cfg.corpus.root:
        tables: Iterator[pa.Table] = read_audioset_tables(cfg.corpus, cfg.storage)
        left = cfg.corpus.limit
        for table in tables:
            if left is not None:
                table, left = table.slice(0, left), left - min(left, table.num_rows)
            if table.num_rows:
                yield table
            if left == 0:
                return
        return
    yield from tables_of_rows(iter_manifest(cfg.corpus, cfg.storage))


def tables_of_rows(rows: Iterable[dict[str, Any]]) -> Iterator[pa.Table]:
    """Manifest dicts as `schema.MANIFEST_SCHEMA` tables of `MANIFEST_BATCH_ROWS` rows."""
    rows = iter(rows)
    while batch := list(itertools.islice(rows, MANIFEST_BATCH_ROWS)):
        yield pa.Table.from_pylist(batch, schema=schema.MANIFEST_SCHEMA)


class UnitPlanner:
    """Streams manifest tables into numbered work units, writing the manifest files.

    A split's rows are buffered until `per_unit` of them make a unit, which is numbered
    then (so a unit never mixes splits); the remainders are numbered at the end in the
    order their splits were first seen. The first row of a duplicated `clip_id` is kept.
    Every `per_file` units go to one manifest file. Memory: one input table, one
    unfinished unit per split, one manifest file; plus a hash per clip and a few numbers
    per unit (the unit table).
    """

    def __init__(self, per_unit: int, per_file: int, write: Callable[[int, pa.Table], None]):
        self.per_unit, self.per_file, self.write = per_unit, per_file, write
        self.units: list[dict[str, Any]] = []
        self.buffers: dict[str, list[pa.Table]] = {}
        self.buffered: dict[str, int] = {}
        self.pending: list[pa.Table] = []
        self.seen: set[int] = set()
        self.duplicates = 0

    def add(self, table: pa.Table) -> None:
        table = self._first_sightings(table)
        encoded = pc.dictionary_encode(table.column("split").combine_chunks())
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        events: list[tuple[int, str, list[pa.Table]]] = []
        for code, split in enumerate(encoded.dictionary.to_pylist()):
            rows = np.flatnonzero(codes == code)
            have = self.buffered.setdefault(split, 0)
            buffer = self.buffers.setdefault(split, [])
            begin = 0
            for stop in range(self.per_unit - have, len(rows) + 1, self.per_unit):
                # The buffered rows of the split go with the first unit they complete.
                head = buffer if begin == 0 else []
                events.append((int(rows[stop - 1]), split, [*head, table.take(rows[begin:stop])]))
                begin = stop
            if begin:
                self.buffers[split] = []
            if begin < len(rows):
                self.buffers[split].append(table.take(rows[begin:]))
            self.buffered[split] = (have + len(rows)) % self.per_unit
        # Units are numbered in the order their last row arrives, as a row loop would.
        for _, split, parts in sorted(events, key=lambda e: e[0]):
            self._add_unit(split, parts)

    def finish(self) -> None:
        for split, parts in self.buffers.items():
            if parts:
                self._add_unit(split, parts)
        self.buffers = {}
        self._flush()

    def _first_sightings(self, table: pa.Table) -> pa.Table:
        keep = np.ones(table.num_rows, dtype=bool)
        for i, clip_id in enumerate(table.column("clip_id").to_pylist()):
            key = hash(clip_id)
            if key in self.seen:
                keep[i] = False
                self.duplicates += 1
                logger.warning("duplicate clip_id %s in the corpus index: kept the first", clip_id)
            else:
                self.seen.add(key)
        return table if keep.all() else table.filter(pa.array(keep))

    def _add_unit(self, split: str, parts: list[pa.Table]) -> None:
        unit = len(self.units)
        rows = sum(p.num_rows for p in parts)
        self.units.append(
            {"unit": unit, "split": split, "rows": rows, "file": unit // self.per_file}
        )
        tagged = pa.concat_tables(parts)
        self.pending.append(tagged.append_column("unit", pa.array(np.full(rows, unit, np.int32))))
        if len(self.units) % self.per_file == 0:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            table = pa.concat_tables(self.pending).cast(schema.WORK_MANIFEST_SCHEMA)
            self.write(self.units[-1]["unit"] // self.per_file, table)
            self.pending = []


def build_manifest(
    cfg: Config, layout: Layout, tables: Iterable[pa.Table] | None = None
) -> dict[str, Any]:
    """Stream the corpus reader (or `tables` of its rows) into unit-tagged manifest files;
    return the unit plan."""
    per_unit = rows_per_unit(cfg)
    planner = UnitPlanner(
        per_unit,
        max(1, cfg.ingest.units_per_manifest_file),
        lambda index, table: storage.write_parquet(layout.manifest_file(index), table, cfg.storage),
    )
    for table in manifest_tables(cfg) if tables is None else tables:
        planner.add(table)
    planner.finish()
    units = planner.units
    plan = {
        "layout": LAYOUT_VERSION,
        "settings": output_settings(cfg),
        "rows_per_unit": per_unit,
        "n_rows": sum(u["rows"] for u in units),
        "duplicates_dropped": planner.duplicates,
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
        if plan.get("layout") != LAYOUT_VERSION:
            raise IngestError(
                f"{layout.output} was written by an older ingest (one clips file per work "
                "unit under clips/, no compaction); re-ingest into a new ingest.output"
            )
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

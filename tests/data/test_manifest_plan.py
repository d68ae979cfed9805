"""The streaming manifest and unit plan (Arrow tables, AudioSet read by pyarrow's CSV
reader) against the simple path: every row as a dict, units assigned by a plain loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from gpa_ray import storage
from gpa_ray.config import Config
from gpa_ray.config_loading import load_config
from gpa_ray.data import audioset_index, schema, work_units
from gpa_ray.data.corpora import CorpusError, iter_manifest
from gpa_ray.data.synthetic_audioset import write_audioset_index
from gpa_ray.data.work_units import Layout, build_manifest


def _reference_plan(cfg: Config) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Units by a plain loop over the reader's dicts: a split's rows fill a unit, which is
    numbered when full; remainders follow in first-seen split order; the first row of a
    repeated clip_id is kept. Returns (unit table, manifest rows tagged by unit, dropped)."""
    per_unit = work_units.rows_per_unit(cfg)
    per_file = cfg.ingest.units_per_manifest_file
    units: list[list[dict[str, Any]]] = []
    splits: list[str] = []
    buffers: dict[str, list[dict[str, Any]]] = {}
    seen: set[str] = set()
    dropped = 0
    for row in iter_manifest(cfg.corpus, cfg.storage):
        if row["clip_id"] in seen:
            dropped += 1
            continue
        seen.add(row["clip_id"])
        buffer = buffers.setdefault(row["split"], [])
        buffer.append(row)
        if len(buffer) == per_unit:
            units.append(buffer)
            splits.append(row["split"])
            buffers[row["split"]] = []
    for split, buffer in buffers.items():
        if buffer:
            units.append(buffer)
            splits.append(split)
    table = [
        {"unit": u, "split": s, "rows": len(rows), "file": u // per_file}
        for u, (s, rows) in enumerate(zip(splits, units, strict=True))
    ]
    tagged = [{**row, "unit": u} for u, rows in enumerate(units) for row in rows]
    return table, tagged, dropped


def _check_against_reference(cfg: Config) -> dict[str, Any]:
    layout = Layout(cfg.ingest.output, cfg.corpus.kind)
    plan = build_manifest(cfg, layout)
    units, rows, dropped = _reference_plan(cfg)
    assert plan["units"] == units
    assert (plan["n_rows"], plan["duplicates_dropped"]) == (len(rows), dropped)
    stored = storage.read_parquet(layout.manifest_dir)
    assert stored.schema == schema.WORK_MANIFEST_SCHEMA
    # Rounded through float32 as the manifest stores times.
    expected = pa.Table.from_pylist(rows, schema=schema.WORK_MANIFEST_SCHEMA).to_pylist()
    assert stored.to_pylist() == expected
    return plan


@pytest.mark.parametrize("trimmed", [True, False])
def test_audioset_manifest_streamed_equals_row_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trimmed: bool
) -> None:
    counts = write_audioset_index(tmp_path / "audioset", 20_000, seed=3, duplicates=5)
    (tmp_path / "audioset" / "audio" / "eval").mkdir(parents=True)
    # Blocks of ~1,000 lines, so units and manifest files straddle CSV blocks.
    monkeypatch.setattr(audioset_index, "BLOCK_BYTES", 64 << 10)
    cfg = load_config(
        overrides=[
            "corpus.kind=audioset",
            f"corpus.root={tmp_path / 'audioset'}",
            f"corpus.segments_trimmed={str(trimmed).lower()}",
            f"ingest.output={tmp_path / 'out'}",
            "ingest.rows_per_commit=64",
            "ingest.units_per_manifest_file=16",
        ]
    )
    plan = _check_against_reference(cfg)
    assert plan["n_rows"] == 20_000 - 5
    assert {u["split"] for u in plan["units"]} == set(counts)
    first_eval = next(u for u in plan["units"] if u["split"] == "eval")
    (row,) = work_units.read_unit_rows(cfg, Layout(cfg.ingest.output, "audioset"), 0, 0)[:1]
    assert row["source_uri"].startswith(str(tmp_path / "audioset") + "/")
    eval_row = work_units.read_unit_rows(
        cfg, Layout(cfg.ingest.output, "audioset"), first_eval["unit"], first_eval["file"]
    )[0]
    assert Path(eval_row["source_uri"]).parent == tmp_path / "audioset" / "audio" / "eval"


def test_interleaved_splits_across_tables_equal_row_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    splits = ["train", "test", "val"]
    lines = ["file_name,caption,split"]
    for i in range(200):
        name = f"c{i % 170:03d}.wav"  # the last 30 repeat earlier files: merged captions
        lines.append(f"{name},caption {i},{splits[(i * i + i // 7) % 3]}")
    (root / "captions.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(work_units, "MANIFEST_BATCH_ROWS", 7)
    cfg = load_config(
        overrides=[
            f"corpus.root={root}",
            f"ingest.output={tmp_path / 'out'}",
            "ingest.rows_per_commit=5",
            "ingest.units_per_manifest_file=3",
        ]
    )
    plan = _check_against_reference(cfg)
    assert len({u["split"] for u in plan["units"][:6]}) == 3


def test_audioset_index_files_are_looked_up_by_name_not_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "audioset"
    write_audioset_index(root, 300)
    (root / "unbalanced_train_segments.csv").unlink()
    (root / "audio" / "extra").mkdir(parents=True)
    (root / "audio" / "extra" / "old_segments.csv").write_text("# not an index\n")
    listed: list[str] = []
    real_list_files = storage.list_files

    def recording_list_files(uri: str, *args: Any, **kwargs: Any) -> list[str]:
        listed.append(uri)
        return real_list_files(uri, *args, **kwargs)

    monkeypatch.setattr(storage, "list_files", recording_list_files)
    cfg = load_config(overrides=["corpus.kind=audioset", f"corpus.root={root}"])
    splits = {row["split"] for row in iter_manifest(cfg.corpus)}
    assert splits == {"balanced_train", "eval"}
    tables = list(work_units.manifest_tables(cfg))
    assert {s for t in tables for s in t.column("split").to_pylist()} == splits
    assert listed == []  # the root (where 2M audio files live) is never listed
    for name in ("balanced_train_segments.csv", "eval_segments.csv"):
        (root / name).unlink()
    with pytest.raises(CorpusError, match="unbalanced_train_segments.csv"):
        list(iter_manifest(cfg.corpus))


def test_audioset_limit_and_malformed_lines(tmp_path: Path) -> None:
    root = tmp_path / "audioset"
    write_audioset_index(root, 1000)
    cfg = load_config(overrides=["corpus.kind=audioset", f"corpus.root={root}", "corpus.limit=25"])
    tables = list(work_units.manifest_tables(cfg))
    ids = [i for t in tables for i in t.column("clip_id").to_pylist()]
    assert ids == [r["clip_id"] for r in iter_manifest(cfg.corpus)]
    assert len(ids) == 25
    with open(root / "eval_segments.csv", "a") as f:
        f.write("abcdefghijk, 30.000\n")
    with pytest.raises(CorpusError, match="eval_segments.csv: malformed segment line"):
        list(audioset_index.read_audioset_tables(cfg.corpus))

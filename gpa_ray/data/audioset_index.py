"""AudioSet segment CSVs -> manifest rows as Arrow tables, for indexes of millions of rows.

`corpora.read_audioset` yields one Python dict per segment: the simple path, and the
reference this one is tested against (same rows, same order). Here each CSV is read by
pyarrow's streaming CSV reader one block (`BLOCK_BYTES`) at a time, each block of lines
is split into fields and labels with Arrow compute, and only the two columns that need
Python string formatting (`clip_id`'s `{start:g}` and `corpus.audio_pattern`) are built
per row. Memory is one block, whatever the size of the index.

A line is `YTID, start_seconds, end_seconds, "mid,mid,..."` (the published format):
the first three fields never hold a comma, so a line splits at its first three commas
and the rest, without its quotes, is the label list. Lines starting with `#` are the
3-line header (and any comment).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from gpa_ray import storage
from gpa_ray.config import CorpusConfig, StorageConfig
from gpa_ray.data import schema
from gpa_ray.data.corpora import (
    CorpusError,
    audioset_audio_base,
    audioset_display_names,
    audioset_file_uri,
    audioset_index_files,
    corpus_name,
)

BLOCK_BYTES = 8 << 20
"""CSV bytes parsed per block: ~120k segment lines."""


def read_audioset_tables(
    cfg: CorpusConfig, storage_cfg: StorageConfig | None = None
) -> Iterator[pa.Table]:
    """The rows `corpora.read_audioset` yields, as `schema.MANIFEST_SCHEMA` tables."""
    name = corpus_name(cfg)
    display = audioset_display_names(cfg, storage_cfg)
    mids = pa.array(list(display), pa.string())
    names = pa.array(list(display.values()), pa.string())
    for index, split in audioset_index_files(cfg, storage_cfg):
        base = audioset_audio_base(cfg, split, storage_cfg)
        for lines in _segment_lines(index, storage_cfg):
            if len(lines):
                yield _segments_table(cfg, index, lines, name, split, base, (mids, names))


def _segment_lines(uri: str, storage_cfg: StorageConfig | None) -> Iterator[pa.Array]:
    """The non-comment, non-blank lines of a CSV, one block at a time."""
    fs, path = storage.resolve(uri, storage_cfg)
    try:
        stream = fs.open_input_stream(path)
    except (OSError, ValueError) as exc:
        raise CorpusError(f"cannot open {uri}: {exc}") from exc
    whole_lines = pacsv.ParseOptions(delimiter="\x1f", quote_char=False, escape_char=False)
    try:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(column_names=["line"], block_size=BLOCK_BYTES),
            parse_options=whole_lines,
            convert_options=pacsv.ConvertOptions(column_types={"line": pa.string()}),
        )
        for batch in reader:
            line = batch.column(0)
            keep = pc.and_(
                pc.invert(pc.starts_with(pc.utf8_ltrim_whitespace(line), "#")),
                pc.not_equal(pc.utf8_trim_whitespace(line), ""),
            )
            yield line.filter(keep)
    except pa.ArrowInvalid as exc:
        raise CorpusError(f"{uri}: not a segments CSV: {exc}") from exc
    finally:
        stream.close()


def _segments_table(
    cfg: CorpusConfig,
    index: str,
    lines: pa.Array,
    name: str,
    split: str,
    base: str,
    label_names: tuple[pa.Array, pa.Array],
) -> pa.Table:
    """Manifest rows of one block of segment lines."""
    n = len(lines)
    parts = pc.split_pattern(lines, ",", max_splits=3)
    short = pc.less(pc.list_value_length(parts), 4)
    if pc.any(short).as_py():
        bad = lines.filter(short)[0].as_py()
        raise CorpusError(f"{index}: malformed segment line {bad!r}")
    ytid, start_text, end_text = (
        pc.utf8_trim_whitespace(pc.list_element(parts, i)) for i in range(3)
    )
    try:
        start = pc.cast(start_text, pa.float64())
        end = pc.cast(end_text, pa.float64())
    except pa.ArrowInvalid as exc:
        raise CorpusError(f"{index}: a segment time is not a number: {exc}") from exc
    ytids, starts = ytid.to_pylist(), start.to_pylist()
    clip_ids = [f"{name}/{y}/{s:g}" for y, s in zip(ytids, starts, strict=True)]
    uris = [
        audioset_file_uri(cfg, base, y, s, e)
        for y, s, e in zip(ytids, start_text.to_pylist(), end_text.to_pylist(), strict=True)
    ]
    if cfg.segments_trimmed:
        start_s = pa.array(np.zeros(n, np.float32))
        duration_s = pa.nulls(n, pa.float32())
    else:
        start_s = pc.cast(start, pa.float32())
        duration_s = pc.cast(pc.subtract(end, start), pa.float32())
    rest = pc.utf8_trim(pc.utf8_trim_whitespace(pc.list_element(parts, 3)), '"')
    constant = np.zeros(n, np.int64)
    columns = {
        "clip_id": pa.array(clip_ids, pa.string()),
        "corpus": pa.array([name], pa.string()).take(constant),
        "split": pa.array([split], pa.string()).take(constant),
        "source_uri": pa.array(uris, pa.string()),
        "start_s": start_s,
        "duration_s": duration_s,
        "captions": pa.ListArray.from_arrays(
            pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string())
        ),
        "labels": _display_labels(pc.split_pattern(rest, ","), *label_names),
    }
    return pa.Table.from_pydict(columns, schema=schema.MANIFEST_SCHEMA)


def _display_labels(mid_lists: pa.ListArray, mids: pa.Array, names: pa.Array) -> pa.ListArray:
    """Each list of mids as display names (an unknown mid stays itself), empties dropped."""
    flat = pc.utf8_trim_whitespace(pc.list_flatten(mid_lists))
    shown = pc.coalesce(pc.take(names, pc.index_in(flat, value_set=mids)), flat)
    keep = pc.not_equal(shown, "")
    parents = pc.list_parent_indices(mid_lists).filter(keep).to_numpy()
    counts = np.bincount(parents, minlength=len(mid_lists))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), shown.filter(keep))

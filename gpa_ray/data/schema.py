"""Arrow schemas of the ingest outputs: the single source of truth for column names and dtypes.

Three tables flow through ingest:

- the *manifest*: one uniform row per clip, whatever corpus it came from (what every reader
  in `gpa_ray.data.corpora` yields). Ingest stores it with one extra column, `unit`, the
  work unit the clip belongs to (see `gpa_ray.data.ingest`).
- the *clip shard*: the manifest columns plus what decoding and tokenising produced.
  Dtypes are compact because a 2M-clip corpus multiplies every byte: EnCodec codes are
  int16 (codebook entries are < 1024), times and durations float32.
- the *errors* table: one row per input that failed, naming the stage that failed, so
  nothing is ever dropped silently.

Captions are addressed by `text_id` (`<clip_id>#<caption index>`) in every later table:
the text bias, the index's text side and the evaluation pool.

Everything that writes or validates these tables imports the schemas from here.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

STAGES: tuple[str, ...] = ("locate", "read", "decode", "encode")
"""Pipeline stages a clip can fail in, in pipeline order."""

STRINGS = pa.list_(pa.string())
CODES = pa.list_(pa.list_(pa.int16()))
"""EnCodec codes of one clip: n_q rows (4 at 3 kbps) of T int16 codebook indices."""

MANIFEST_FIELDS: list[pa.Field] = [
    pa.field("clip_id", pa.string(), nullable=False),
    pa.field("corpus", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("start_s", pa.float32(), nullable=False),
    pa.field("duration_s", pa.float32()),
    pa.field("captions", STRINGS, nullable=False),
    pa.field("labels", STRINGS, nullable=False),
]

MANIFEST_SCHEMA = pa.schema(MANIFEST_FIELDS)
"""The uniform manifest row. `source_uri` is empty when a reader could not name a file;
`start_s`/`duration_s` select a segment of the source (`duration_s` null: to the end)."""

WORK_MANIFEST_SCHEMA = pa.schema([*MANIFEST_FIELDS, pa.field("unit", pa.int32(), nullable=False)])
"""The manifest as ingest stores it: every row tagged with its work unit."""

CLIP_SCHEMA = pa.schema(
    [
        *MANIFEST_FIELDS[:5],
        # In a clip shard `duration_s` is the decoded length, so it is never null.
        pa.field("duration_s", pa.float32(), nullable=False),
        *MANIFEST_FIELDS[6:],
        pa.field("n_samples", pa.int64(), nullable=False),
        pa.field("sample_rate", pa.int32(), nullable=False),
        pa.field("codes", CODES),
        pa.field("audio", pa.binary()),
        pa.field("audio_sample_rate", pa.int32()),
    ]
)
"""One encoded clip. `n_samples`/`sample_rate` describe the decoded segment at its original
rate; `codes` is EnCodec 24 kHz [n_q, T] (null with `ingest.codes=false`); `audio` is FLAC
at `audio_sample_rate` (null with `ingest.store_audio=false`)."""

ERROR_SCHEMA = pa.schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("corpus", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=False),
    ]
)
"""One failed input: `stage` is one of `STAGES`, `error` is "ExceptionType: message"."""


def text_id(clip_id: str, caption_index: int) -> str:
    """The id of a clip's caption: stable, unique, and the key the text bias is joined on."""
    return f"{clip_id}#{caption_index}"


def codes_array(codes: list[Any]) -> pa.ListArray:
    """Build the `codes` column from int16 arrays of shape [n_q, T] without a Python loop
    over every code (a 10 s clip has 3,000 of them)."""
    import numpy as np

    flat = [np.ascontiguousarray(c, dtype=np.int16) for c in codes]
    rows_per_clip = [c.shape[0] for c in flat]
    inner_lengths = np.concatenate(
        [np.full(c.shape[0], c.shape[1], dtype=np.int32) for c in flat] or [np.zeros(0, np.int32)]
    )
    inner_offsets = np.concatenate([[0], np.cumsum(inner_lengths, dtype=np.int64)]).astype(np.int32)
    outer_offsets = np.concatenate([[0], np.cumsum(rows_per_clip, dtype=np.int64)]).astype(np.int32)
    values = np.concatenate([c.reshape(-1) for c in flat]) if flat else np.zeros(0, dtype=np.int16)
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets), pa.array(values, pa.int16()))
    return pa.ListArray.from_arrays(pa.array(outer_offsets), inner).cast(CODES)

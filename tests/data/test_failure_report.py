"""When an ingest fails as a whole, and the commonest errors it names."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gpa_ray.data import schema
from gpa_ray.data.failure_report import commonest_errors, failure_message, report_text


def test_failure_message_thresholds() -> None:
    assert failure_message(ok=10, failed=0, max_failed_share=0.0) is None
    assert failure_message(ok=1, failed=9, max_failed_share=1.0) is None
    assert (
        failure_message(ok=0, failed=3, max_failed_share=1.0) == "every one of the 3 clips failed"
    )
    assert failure_message(ok=5, failed=5, max_failed_share=0.5) is None  # not more than half
    message = failure_message(ok=4, failed=6, max_failed_share=0.5)
    assert message == "6 of 10 clips failed (60%), more than ingest.max_failed_share=0.5"


def _errors(path: Path, rows: list[tuple[str, str, str]]) -> str:
    table = pa.Table.from_pylist(
        [
            {
                "clip_id": f"c/{i}",
                "corpus": "c",
                "split": "train",
                "source_uri": uri,
                "stage": stage,
                "error": error,
            }
            for i, (stage, error, uri) in enumerate(rows)
        ],
        schema=schema.ERROR_SCHEMA,
    )
    pq.write_table(table, path)
    return str(path)


def test_commonest_errors_group_by_stage_and_type_with_an_example(tmp_path: Path) -> None:
    first = _errors(
        tmp_path / "a.parquet",
        [
            ("locate", "FileNotFoundError: no such file /x/1.wav", "/x/1.wav"),
            ("decode", "AudioDecodeError: cannot decode audio /x/2.mp3", "/x/2.mp3"),
        ],
    )
    second = _errors(
        tmp_path / "b.parquet",
        [("locate", "FileNotFoundError: no such file /x/3.wav", "/x/3.wav")],
    )
    top = commonest_errors([first, second], top=1)
    assert top == [
        {
            "stage": "locate",
            "type": "FileNotFoundError",
            "count": 2,
            "error": "FileNotFoundError: no such file /x/1.wav",
            "source_uri": "/x/1.wav",
        }
    ]
    text = report_text("every one of the 3 clips failed", commonest_errors([first, second]))
    assert text.splitlines()[0].startswith("ingest failed: every one of the 3 clips failed")
    assert "  2 x locate: FileNotFoundError: no such file /x/1.wav" in text
    assert "      e.g. /x/2.mp3" in text

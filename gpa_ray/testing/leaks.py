"""Search what a run wrote for secret strings: files in folders, objects in a bucket, and
log lines, with counts of what was searched (a search that read nothing proves nothing).

A compressed container can hide a string from a byte search (a zstd parquet page, a zip
member), so parquet files are also searched decoded (re-written as uncompressed Arrow IPC,
values and metadata included) and zip archives (torch checkpoints) member by member.
Every secret is looked for as is and URL-encoded, the form it takes inside a logged URL.
"""

from __future__ import annotations

import io
import urllib.parse
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


@dataclass
class LeakReport:
    """What was searched and where any secret was found (`where`: "location: secret #i")."""

    files: int = 0
    bytes: int = 0
    decoded_parquet: int = 0
    zip_members: int = 0
    log_lines: int = 0
    where: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {
            "files": self.files,
            "bytes": self.bytes,
            "decoded_parquet": self.decoded_parquet,
            "zip_members": self.zip_members,
            "log_lines": self.log_lines,
            "found": len(self.where),
        }


class LeakSearch:
    """Accumulates a `LeakReport` over every piece of data it is shown."""

    def __init__(self, secrets: Iterable[str]) -> None:
        values = [s for s in secrets if s]
        if not values:
            raise ValueError("no secret strings to search for")
        self._needles = [
            (i, form.encode())
            for i, secret in enumerate(values)
            for form in {secret, urllib.parse.quote(secret, safe="")}
        ]
        self.report = LeakReport()

    def _scan(self, location: str, data: bytes) -> None:
        for i, needle in self._needles:
            if needle in data:
                self.report.where.append(f"{location}: secret #{i}")

    def data(self, location: str, data: bytes) -> None:
        """Search one file's bytes (and its decoded parquet or zip contents)."""
        self.report.files += 1
        self.report.bytes += len(data)
        self._scan(location, data)
        if data[:4] == b"PAR1" and data[-4:] == b"PAR1":
            self._scan(f"{location} (decoded)", _decoded_parquet(data))
            self.report.decoded_parquet += 1
        elif data[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for name in archive.namelist():
                    self._scan(f"{location}!{name}", archive.read(name))
                    self.report.zip_members += 1

    def folder(self, root: Path) -> None:
        """Search every file under `root` (hidden ones included)."""
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                self.data(str(path), path.read_bytes())

    def bucket(self, s3_client: Any, bucket: str) -> int:
        """Search every object of `bucket` (a boto3 S3 client); returns how many."""
        n = 0
        for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                body = s3_client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
                self.data(f"s3://{bucket}/{item['Key']}", body)
                n += 1
        return n

    def lines(self, location: str, text: str) -> None:
        """Search captured log output line by line."""
        for number, line in enumerate(text.splitlines(), 1):
            self.report.log_lines += 1
            self._scan(f"{location}:{number}", line.encode())


def _decoded_parquet(data: bytes) -> bytes:
    """A parquet file's schema, metadata and values as uncompressed Arrow IPC bytes."""
    table = pq.read_table(pa.BufferReader(data))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    metadata = pq.read_metadata(pa.BufferReader(data)).metadata or {}
    return sink.getvalue().to_pybytes() + b"".join(k + v for k, v in metadata.items())

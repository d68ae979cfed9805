"""The `gpa-ray` command (a console script in pyproject.toml).

    gpa-ray <job> [--config PRESET] [--set a.b=c ...] [a.b=c ...]   every jobs/<job>.py
    gpa-ray embed INPUT... --model URI -o OUT.parquet                audio -> embeddings
    gpa-ray search QUERY --index URI                                 a local or s3:// index
    gpa-ray zero-shot INPUT... --model URI --labels dog rain ...     label probabilities

A job runs the script's own `main` (`gpa_ray.jobs_cli.job_main`), so its flags, presets and
overrides are those of `python jobs/<job>.py` (dashes in the name work too: `train-gpa`).
INPUT is an audio file, a folder, or an s3:// prefix (every audio file below it). The
tools load models with the Python API (`gpa_ray.api.GPA`); `embed` runs on a Ray Data
actor pool (`gpa_ray.ray_embedding.embed_files`) when given more than `--local-max`
files, and in this process otherwise; either way a file's embedding equals
`GPA.embed_audio`'s. Their `--config`/`--set` reach `storage.*` (S3 endpoint, region) and
`ray.*` (the cluster to join). Progress goes to stderr, results to stdout or `-o`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from gpa_ray.config import ActorPoolConfig, Config, StorageConfig
from gpa_ray.jobs_cli import (
    add_config_args,
    job_main,
    job_names,
    job_summary,
    warn_of_credentials_on_command_line,
)

PROG = "gpa-ray"
TOOLS = ("embed", "search", "zero-shot")
API_KEY_ENV = "GPA_RAY_API_KEY"
"""Where `search --url` finds an API key when no --api-key-file is given (never a flag:
command lines are visible to every user of the machine)."""
LOCAL_MAX = 16
"""`embed` runs in this process up to this many files, on Ray Data above."""


class CliError(Exception):
    """A command line the tools cannot act on; printed as `gpa-ray: error: ...`."""


class Progress:
    """`done/total` lines on stderr, at most one every `every_s` seconds (and the last)."""

    def __init__(self, what: str, total: int, stream: TextIO | None = None, every_s: float = 2.0):
        self.what, self.total, self.done = what, total, 0
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.started = self.last = time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.done >= self.total or now - self.last >= self.every_s:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            print(
                f"{self.what}: {self.done}/{self.total} ({rate:.1f}/s)",
                file=self.stream,
                flush=True,
            )


def tool_config(args: argparse.Namespace) -> Config:
    from gpa_ray.config_loading import load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    warn_of_credentials_on_command_line(args.overrides)
    return cfg


def audio_files(inputs: Sequence[str], storage_cfg: StorageConfig) -> list[str]:
    """Audio files named by `inputs` (files, folders, s3:// prefixes), in argument order,
    each folder's files sorted; an input that names no audio is an error naming it."""
    from gpa_ray import storage
    from gpa_ray.api import AUDIO_SUFFIXES

    found: list[str] = []
    for given in inputs:
        item = os.path.expanduser(given)
        is_audio = item.lower().endswith(AUDIO_SUFFIXES)
        if storage.is_s3(item):
            if is_audio and storage.exists(item, storage_cfg):
                found.append(item)
                continue
            listed = storage.list_files(item, "", storage_cfg)
        elif os.path.isfile(item):
            found.append(item)
            continue
        elif os.path.isdir(item):
            listed = storage.list_files(item)
        else:
            raise CliError(f"{given}: no such file or folder")
        audio = [uri for uri in listed if uri.lower().endswith(AUDIO_SUFFIXES)]
        if not audio:
            raise CliError(f"{given}: no audio files ({', '.join(AUDIO_SUFFIXES)}) found there")
        found.extend(audio)
    return found


def load_model(uri: str, batch_size: int, device: str | None, storage_cfg: StorageConfig) -> Any:
    from gpa_ray.api import GPA

    print(f"loading {uri}", file=sys.stderr, flush=True)
    return GPA.load(uri, batch_size=batch_size, device=device, storage_cfg=storage_cfg)


def _local_tables(model: Any, files: list[str], step: int) -> Iterator[Any]:
    from gpa_ray.api import embed_files_table

    for start in range(0, len(files), step):
        yield embed_files_table(model, files[start : start + step])


def run_embed(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gpa_ray import storage
    from gpa_ray.api import ERROR_COLUMN, FILE_ID_COLUMN

    cfg = tool_config(args)
    files = audio_files(args.inputs, cfg.storage)
    on_ray = args.ray == "always" or (args.ray == "auto" and len(files) > args.local_max)
    print(
        f"embedding {len(files)} files {'on Ray Data' if on_ray else 'in this process'}",
        file=sys.stderr,
    )
    model = load_model(args.model, args.batch_size, "cpu" if on_ray else args.device, cfg.storage)
    step = max(args.batch_size, args.rows_per_task)
    if on_ray:
        from gpa_ray.jobs_cli import init_ray
        from gpa_ray.ray_embedding import embed_files

        init_ray(cfg)
        pool = ActorPoolConfig(
            actors=args.actors, cpus_per_actor=args.cpus_per_actor, batch_size=step
        )
        tables = embed_files(
            model.checkpoint,
            files,
            batch_size=args.batch_size,
            pool=pool,
            storage_cfg=cfg.storage,
        )
    else:
        tables = _local_tables(model, files, step)
    metadata = {
        b"gpa_ray.checkpoint": model.checkpoint.encode(),
        b"gpa_ray.weights_sha256": model.digest.encode(),
        b"gpa_ray.batch_size": str(args.batch_size).encode(),
    }
    progress = Progress("embedded", len(files))
    failures: list[tuple[str, str]] = []
    fs, path = storage.resolve(args.output, cfg.storage)
    parent = os.path.dirname(path)
    if parent and not storage.is_s3(args.output):
        os.makedirs(parent, exist_ok=True)
    writer = None
    try:
        for table in tables:
            errors = table.column(ERROR_COLUMN)
            failed = errors.is_valid().to_numpy(zero_copy_only=False)
            for uri, error in zip(
                table.column(FILE_ID_COLUMN).to_pylist(), errors.to_pylist(), strict=True
            ):
                if error is not None:
                    failures.append((uri, error))
            ok = table.filter(pa.array(~failed)).drop_columns([ERROR_COLUMN])
            if writer is None:
                schema = ok.schema.with_metadata(metadata)
                writer = pq.ParquetWriter(path, schema, filesystem=fs)
            writer.write_table(ok.replace_schema_metadata(metadata))
            progress.add(table.num_rows)
    finally:
        if writer is not None:
            writer.close()
    for uri, error in failures:
        print(f"failed: {uri}: {error}", file=sys.stderr)
    summary = {
        "output": args.output,
        "files": len(files),
        "embedded": len(files) - len(failures),
        "failed": len(failures),
        "ray": on_ray,
        "checkpoint": model.checkpoint,
    }
    print(json.dumps(summary, indent=2))
    return 0 if not failures else 1


def run_search(args: argparse.Namespace) -> int:
    if bool(args.index) == bool(args.url):
        raise CliError("give one of --index (a local or s3:// index) or --url (a running API)")
    results = search_endpoint(args) if args.url else search_index(args)
    print_results(results, args.json)
    return 0


def search_index(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The query against an index version, in this process (the Python API)."""
    from gpa_ray.api import GPA

    cfg = tool_config(args)
    if args.model:
        model = load_model(args.model, args.batch_size, args.device, cfg.storage)
    else:
        print(f"loading the model of {args.index}", file=sys.stderr, flush=True)
        model = GPA.from_index(
            args.index, batch_size=args.batch_size, device=args.device, storage_cfg=cfg.storage
        )
    if args.audio:
        return model.search_audio(args.query, args.index, k=args.k, use_bias=not args.no_bias)
    return model.search(args.query, args.index, k=args.k)


def search_endpoint(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The query against a running retriever API, through `gpa_ray.client`."""
    from gpa_ray.client import ClientError, RetrieverClient

    api_key = os.environ.get(API_KEY_ENV) or None
    if args.api_key_file:
        with open(os.path.expanduser(args.api_key_file)) as f:
            api_key = f.read().strip()
    client = RetrieverClient(args.url, api_key=api_key, timeout_s=args.timeout)
    try:
        if args.audio:
            answer = client.search_audio(args.query, k=args.k, bias=not args.no_bias)
        else:
            answer = client.search_text(args.query, k=args.k)
    except ClientError as exc:
        raise CliError(str(exc)) from exc
    return [dict(r) for r in answer["results"]]


def print_results(results: list[dict[str, Any]], as_json: bool) -> None:
    """Search results as JSON, or one line each: rank, score, id, what it is."""
    if as_json:
        print(json.dumps(results, indent=2, default=str))
        return
    for r in results:
        item = r.get("text_id") or r.get("clip_id")
        what = (
            r.get("text") or "; ".join(r.get("captions") or []) or ", ".join(r.get("labels") or [])
        )
        print(f"{r['rank']:>3}  {r['score']:+.4f}  {item}  {what}")


def run_zero_shot(args: argparse.Namespace) -> int:
    from gpa_ray.api import DEFAULT_TEMPLATE

    cfg = tool_config(args)
    labels = list(args.labels or [])
    if args.labels_file:
        with open(args.labels_file) as f:
            labels += [line.strip() for line in f if line.strip()]
    if not labels:
        raise CliError("give --labels and/or --labels-file")
    files = audio_files(args.inputs, cfg.storage)
    model = load_model(args.model, args.batch_size, args.device, cfg.storage)
    templates = args.template or [DEFAULT_TEMPLATE]
    progress = Progress("classified", len(files))
    step = max(args.batch_size, args.rows_per_task)
    rows = []
    for start in range(0, len(files), step):
        chunk = files[start : start + step]
        probs = model.zero_shot(chunk, labels, templates)
        for uri, p in zip(chunk, probs, strict=True):
            top = sorted(range(len(labels)), key=lambda j: -p[j])[: args.top]
            rows.append({"source_uri": uri, "labels": {labels[j]: float(p[j]) for j in top}})
        progress.add(len(chunk))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            best = ", ".join(f"{k} {v:.3f}" for k, v in row["labels"].items())
            print(f"{row['source_uri']}\t{best}")
    return 0


def tool_parsers(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    add_config_args(common, "storage.endpoint_url=http://127.0.0.1:9000")
    common.add_argument("--batch-size", type=int, default=8, help="rows per model call (default 8)")
    common.add_argument("--device", default=None, help="torch device (default: a GPU if any)")

    embed = sub.add_parser(
        "embed",
        parents=[common],
        help="audio files, a folder or an s3:// prefix -> a parquet of embeddings",
        description="Embed audio with a GPA checkpoint into one parquet file: `source_uri`, "
        "`global` [E] and `prototypes` [(K+1) x E] (float32), the checkpoint and its weights' "
        "SHA-256 in the file's metadata. Files that cannot be decoded are listed on stderr "
        "(exit status 1) and left out.",
    )
    embed.add_argument("inputs", nargs="+", metavar="INPUT", help="audio file, folder or s3://")
    embed.add_argument("--model", required=True, help="checkpoint or run folder (or s3://)")
    embed.add_argument("-o", "--output", required=True, help="parquet file to write (or s3://)")
    embed.add_argument(
        "--ray",
        choices=("auto", "always", "never"),
        default="auto",
        help=f"run on a Ray Data actor pool: auto = above --local-max files (default {LOCAL_MAX})",
    )
    embed.add_argument("--local-max", type=int, default=LOCAL_MAX, help="see --ray")
    embed.add_argument("--actors", type=int, default=1, help="Ray Data actors (default 1)")
    embed.add_argument(
        "--cpus-per-actor", type=float, default=1.0, help="CPUs per actor (default 1)"
    )
    embed.add_argument(
        "--rows-per-task", type=int, default=64, help="files per actor call (default 64)"
    )
    embed.set_defaults(run=run_embed)

    search = sub.add_parser(
        "search",
        parents=[common],
        help="query an index version: a text finds clips, --audio FILE finds captions",
        description="Search a local or s3:// index (a version, or a root's LATEST) with the "
        "model it was built with (or --model), or a running retriever API (--url; retries "
        "503 answers, and names the status and the server's error otherwise).",
    )
    search.add_argument("query", help="the query text, or with --audio an audio file/URI")
    search.add_argument("--index", default="", help="index root or version (or s3://)")
    search.add_argument("--url", default="", help="or a running retriever API, http://host:port")
    search.add_argument(
        "--api-key-file", default="", help=f"--url: file holding the API key (or ${API_KEY_ENV})"
    )
    search.add_argument("--timeout", type=float, default=30.0, help="--url: seconds per try")
    search.add_argument("--model", default="", help="checkpoint (default: the index's own)")
    search.add_argument("-k", type=int, default=10, help="results (default 10)")
    search.add_argument("--audio", action="store_true", help="QUERY is an audio file")
    search.add_argument("--no-bias", action="store_true", help="audio queries: no text bias")
    search.add_argument("--json", action="store_true", help="print the result records as JSON")
    search.set_defaults(run=run_search)

    zero = sub.add_parser(
        "zero-shot",
        parents=[common],
        help="classify audio among labels given as text (prompt templates)",
        description="Zero-shot classification: each label becomes prompts through the "
        "templates; a clip's probabilities are the softmax of its GPA scores over the labels. "
        "To measure it over a labelled set (ESC-50 accuracy per fold, multi-label mAP), run "
        "the job `gpa-ray evaluate-zero-shot`.",
    )
    zero.add_argument("inputs", nargs="+", metavar="INPUT", help="audio file, folder or s3://")
    zero.add_argument("--model", required=True, help="checkpoint or run folder (or s3://)")
    zero.add_argument("--labels", nargs="+", help="label names (underscores read as spaces)")
    zero.add_argument("--labels-file", help="a file of labels, one per line")
    zero.add_argument(
        "--template",
        action="append",
        help="prompt with {label} (repeatable; default 'the sound of a {label}')",
    )
    zero.add_argument("--top", type=int, default=3, help="labels shown per clip (default 3)")
    zero.add_argument("--json", action="store_true", help="print JSON")
    zero.add_argument("--rows-per-task", type=int, default=64, help="clips per step (default 64)")
    zero.set_defaults(run=run_zero_shot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="gpa_ray from the command line: the jobs, and tools on a trained model.",
        epilog=f"`{PROG} <job> --help` lists a job's presets and every config key; "
        f"`{PROG} <tool> --help` a tool's flags.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in job_names():
        sub.add_parser(name, help="job: " + job_summary(name).replace("%", "%%"), add_help=False)
    tool_parsers(sub)
    return parser


@contextlib.contextmanager
def program_name(name: str) -> Iterator[None]:
    """`sys.argv[0]` as `name` while a job parses its arguments (its usage line)."""
    saved = sys.argv[0] if sys.argv else ""
    if sys.argv:
        sys.argv[0] = name
    else:
        sys.argv.append(name)
    try:
        yield
    finally:
        sys.argv[0] = saved


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `gpa-ray` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    jobs = job_names()
    if args and args[0].replace("-", "_") in jobs:
        name = args[0].replace("-", "_")
        with program_name(f"{PROG} {name}"):
            return job_main(name)(args[1:])
    parser = build_parser()
    parsed = parser.parse_args(args)
    if parsed.command is None:
        parser.print_help()
        return 2
    try:
        return int(parsed.run(parsed))
    except CliError as exc:
        parser.exit(2, f"{PROG}: error: {exc}\n")
    except (ValueError, OSError) as exc:
        parser.exit(1, f"{PROG}: error: {type(exc).__name__}: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())

"""What every `jobs/*.py` entry point shares: argument parsing and joining Ray.

A job is `python jobs/<name>.py [--config FILE|PRESET] [--set a.b=c ...] [a.b=c ...]`:
the preset (a YAML path or the name of a preset shipped in `gpa_ray/configs/`) is merged
with dotted overrides by `gpa_ray.config_loading.load_config`, which type-checks every key. The
same command runs on a laptop (embedded local Ray) and on a cluster (`RAY_ADDRESS`, or
`ray job submit`, which sets it), so the address is never hard-coded in a job.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import logging
import os
import textwrap
from collections.abc import Callable
from pathlib import Path

from gpa_ray.config import STORAGE_SECRET_FIELDS, Config
from gpa_ray.config_loading import config_keys, load_config, preset_names
from gpa_ray.credentials import export_storage_credentials, warn_if_workers_lack_credentials
from gpa_ray.local_ray import inherited_address, start_local_ray

logger = logging.getLogger(__name__)

JOBS_DIR = Path(__file__).resolve().parents[1] / "jobs"
"""The repository's `jobs/` folder (`python jobs/<name>.py` scripts; `gpa-ray <name>`)."""


def job_names() -> list[str]:
    """Every job script in `JOBS_DIR`, by name (the file name without `.py`)."""
    return sorted(p.stem for p in JOBS_DIR.glob("*.py") if not p.stem.startswith("_"))


def job_summary(name: str) -> str:
    """The first line of a job script's docstring, read without importing it."""
    doc = ast.get_docstring(ast.parse((JOBS_DIR / f"{name}.py").read_text())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def job_main(name: str) -> Callable[[list[str] | None], int]:
    """`main` of `jobs/<name>.py`: jobs are scripts, not a package, so they load by path."""
    path = JOBS_DIR / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"no job script at {path} (jobs: {', '.join(job_names()) or 'none found'})"
        )
    spec = importlib.util.spec_from_file_location(f"gpa_ray_job_{name}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load the job script {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def parse_job_args(argv: list[str] | None, description: str) -> Config:
    """Parse a job's command line into a resolved `Config` (errors exit with a message)."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog=config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(parser, "ingest.output=s3://bucket/run")
    parser.add_argument("positional", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    args = parser.parse_args(argv)
    overrides = [*args.overrides, *args.positional]
    try:
        cfg = load_config(args.config, overrides)
    except ValueError as exc:
        parser.error(str(exc))
    configure_logging()
    warn_of_credentials_on_command_line(overrides)
    return cfg


def add_config_args(parser: argparse.ArgumentParser, example: str) -> None:
    """`--config` and repeatable `--set KEY=VALUE`, as every job and tool takes them."""
    parser.add_argument(
        "--config", default=None, help="YAML preset: a file path or a shipped preset name"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"dotted override, e.g. --set {example} (repeatable)",
    )


def warn_of_credentials_on_command_line(overrides: list[str]) -> None:
    """Log (names only) each storage credential given as a command-line override: other
    users of the machine can read a command line (`ps`), and Ray records a driver's whole
    command line as its job's entrypoint (`ray list jobs`, the dashboard)."""
    given = sorted(
        {
            key.strip()
            for key, _, _ in (o.partition("=") for o in overrides)
            if key.strip() in {f"storage.{name}" for name in STORAGE_SECRET_FIELDS}
        }
    )
    if given:
        logger.warning(
            "%s given on the command line, which other users and Ray's job list can read: "
            "prefer AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN in the "
            "environment, or a preset file",
            ", ".join(given),
        )


def config_help() -> str:
    """The presets and every config key, for `--help` (the schema is the documentation)."""
    by_section: dict[str, list[str]] = {}
    for key in config_keys():
        section, _, name = key.partition(".")
        by_section.setdefault(section, []).append(name)
    lines = [
        f"presets (--config NAME): {', '.join(preset_names())} (gpa_ray/configs/*.yaml)",
        "config keys (KEY=VALUE, e.g. train.lr=5e-5):",
    ]
    lines += [
        "  " + textwrap.fill(f"{section}: {', '.join(names)}", 96, subsequent_indent="    ")
        for section, names in by_section.items()
    ]
    return "\n".join(lines)


def configure_logging(level: int = logging.INFO) -> None:
    """Log lines with a timestamp to stderr, unless the host process already set logging up."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def ray_address(cfg: Config) -> str:
    """`ray.address` from the config, else `RAY_ADDRESS` (but the pin of a local Ray this
    process started and shut down), else `local` (an embedded Ray)."""
    return cfg.ray.address or inherited_address() or "local"


#: Environment of every Ray this project starts (inherited by the raylet and all workers;
#: a running cluster sets it in its own start commands, see cluster.yaml). Serve's
#: throughput-optimised mode (Ray >= 2.55: gRPC between replicas, the router on the
#: replica's own event loop): benchmarks/serve_load.py measured ~0.9x the p50 at
#: concurrency 1 and ~1.15x the throughput at concurrency 8 on this 2-core machine.
#: Without HAProxy its direct ingress stays off: in Ray 2.60 it makes `serve.shutdown()`
#: hang for its whole 30 s timeout, and a Serve started right after joins the dying one.
RAY_PROCESS_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
}


def set_ray_process_env(env: dict[str, str] | None = None) -> None:
    """Add `RAY_PROCESS_ENV` to `env` (default: this process's environment, before it
    starts a local Ray); values the user already set win."""
    target = os.environ if env is None else env
    for key, value in RAY_PROCESS_ENV.items():
        target.setdefault(key, value)


def init_ray(cfg: Config) -> None:
    """Join (or start) the Ray cluster the config names; a no-op if Ray is already up.

    Resource settings (`num_cpus`, `object_store_memory_mb`, `include_dashboard`,
    `node_ip_address`) only apply when this process starts a local Ray (on loopback by
    default, see `gpa_ray.local_ray`): a running cluster has its own. A local Ray inherits
    the config's storage credentials through this process's environment; a running
    cluster's workers resolve their own (`gpa_ray.credentials`).
    """
    import ray

    if ray.is_initialized():
        return
    address = ray_address(cfg)
    warn_if_workers_lack_credentials(cfg, address)
    if address != "local":
        ray.init(address=address)
        return
    set_ray_process_env()
    export_storage_credentials(cfg)
    kwargs: dict[str, object] = {"include_dashboard": cfg.ray.include_dashboard}
    if cfg.ray.num_cpus is not None:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    if cfg.ray.object_store_memory_mb is not None:
        kwargs["object_store_memory"] = cfg.ray.object_store_memory_mb * 1024 * 1024
    start_local_ray(cfg.ray.node_ip_address, **kwargs)

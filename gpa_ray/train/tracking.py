"""Experiment tracking of a training run from world rank 0: MLflow and TensorBoard.

Both are optional (`tracking.mlflow`, `tracking.tensorboard`: `gpa_ray.config.TrackingConfig`)
and written by the rank that already writes the metrics files, so a multi-worker run is
logged once. What each gets:

- **params**: every leaf of the resolved config as a dotted key (`train.lr`, `gpa.scorer`):
  MLflow params, and TensorBoard's HParams (with the checkpoint metric as its metric);
- **per-epoch metrics**: every number of the epoch record (`train_loss`, `val_t2a_R@1`,
  `lr`, ...) at step = epoch (1-based); MLflow allows no `@` in a name, so there
  `val_t2a_R@1` is `val_t2a_R_at_1` (`mlflow_metric_name`);
- **the resolved config** as YAML, with `storage.access_key_id / secret_access_key /
  session_token` emptied (`gpa_ray.credentials.redacted`): the MLflow artifact
  `config.yaml`, TensorBoard text `config`;
- **the best checkpoint's URI** so far (by the run's checkpoint metric; on a tie the later
  epoch, as Ray Train ranks ties): MLflow tags `best_checkpoint` and `best_epoch`,
  TensorBoard text `best_checkpoint` at the epoch it changed.

The MLflow run is found again by its tag `gpa_ray.run` (the run URI), so a run that
resumes (after a worker failure, or started again with more epochs) continues its MLflow
run; params are logged when the MLflow run is created (MLflow never changes a param) and
the config artifact is rewritten. TensorBoard starts a new event file on each resume with
`purge_step` at the next epoch, so epochs redone after a rollback replace the old points.

Where it is kept: an MLflow file store at `<run>/mlruns` unless `tracking.mlflow_tracking_uri`
names a server or database; TensorBoard event files at `<run>/tensorboard/`. MLflow's file
store and TensorBoard's writer need a local folder: on an `s3://` run both are written in a
local folder (pulled from the run first, so a resumed run continues them) and the files
changed since the last copy are uploaded after each epoch. MLflow 3 keeps its file store
in maintenance mode behind `MLFLOW_ALLOW_FILE_STORE=true`; this module sets it for the
default store, and reading that store back (`mlflow.tracking.MlflowClient`) needs it too.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpa_ray import checkpoints, storage
from gpa_ray.config import Config, StorageConfig
from gpa_ray.config_loading import config_to_yaml
from gpa_ray.credentials import redacted

logger = logging.getLogger(__name__)

MLFLOW_DIR = "mlruns"
TENSORBOARD_DIR = "tensorboard"
RUN_TAG = "gpa_ray.run"
_SECRET_FIELDS = ("access_key_id", "secret_access_key", "session_token")
_MLFLOW_PARAMS_PER_CALL = 100
_MLFLOW_NAME = re.compile(r"[^\w.\- :/]")


def flat_params(cfg: Config) -> dict[str, Any]:
    """Every leaf of `cfg` as dotted key -> value (str, bool, int or float; lists and
    None as their text), the credentials redacted."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        elif isinstance(value, bool | int | float | str):
            out[prefix] = value
        else:
            out[prefix] = json.dumps(value)

    walk("", dataclasses.asdict(redacted(cfg)))
    return out


def epoch_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of an epoch record, without `epoch` itself (it is the step)."""
    return {
        key: float(value)
        for key, value in record.items()
        if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool)
    }


def mlflow_metric_name(name: str) -> str:
    """A metric name MLflow accepts: `@` -> `_at_`, any other character it refuses -> `_`."""
    return _MLFLOW_NAME.sub("_", name.replace("@", "_at_"))


def checkpoint_dir_name() -> str:
    """A new checkpoint folder name in Ray Train's own format (`checkpoint_<local time to
    the microsecond>`); naming it in the worker tells rank 0 the URI it is uploaded to."""
    return f"{checkpoints.CHECKPOINT_PREFIX}{datetime.datetime.now():%Y-%m-%d_%H-%M-%S.%f}"


def rank_key(value: float, epoch: int, mode: str) -> tuple[float, int]:
    """Sort key of a checkpoint: its metric (negated when lower is better), then its
    epoch, so a tie goes to the later checkpoint as in Ray Train's ranking."""
    return (value if mode == "max" else -value, epoch)


def _usable(value: Any) -> bool:
    return isinstance(value, int | float) and not math.isnan(value)


def best_kept_checkpoint(
    run_uri: str, metric: str, mode: str, storage_cfg: StorageConfig | None = None
) -> tuple[str, int, float] | None:
    """(URI, epoch, metric) of the best `checkpoint_*` folder a run holds, from each
    folder's `state.json` (its last history record); None if none has the metric."""
    best: tuple[tuple[float, int], str, int, float] | None = None
    for uri in storage.list_files(run_uri, checkpoints.STATE_FILE, storage_cfg):
        directory = uri[: -len(checkpoints.STATE_FILE)].rstrip("/")
        if not directory.rsplit("/", 1)[-1].startswith(checkpoints.CHECKPOINT_PREFIX):
            continue
        state = json.loads(storage.read_bytes(uri, storage_cfg))
        record = (state.get("history") or [{}])[-1]
        value, epoch = record.get(metric), int(state.get("epoch", 0))
        if not _usable(value):
            continue
        key = rank_key(float(value), epoch, mode)
        if best is None or key > best[0]:
            best = (key, directory, epoch, float(value))
    return None if best is None else best[1:]


class _Mirror:
    """A local folder that stands for a folder of an s3:// run: filled from it once, and
    its files that changed since the last `push` uploaded there."""

    def __init__(self, remote: str, storage_cfg: StorageConfig) -> None:
        self.remote = remote
        self.storage_cfg = storage_cfg
        self.local = tempfile.mkdtemp(prefix="gpa_ray_tracking_")
        self._pushed: dict[str, tuple[int, int]] = {}
        for uri in storage.list_files(remote, storage_cfg=storage_cfg):
            relative = uri[len(remote.rstrip("/")) + 1 :]
            target = os.path.join(self.local, relative)
            storage.copy_file(uri, target, storage_cfg)
            self._pushed[relative] = self._stamp(target)

    @staticmethod
    def _stamp(path: str) -> tuple[int, int]:
        info = os.stat(path)
        return info.st_size, info.st_mtime_ns

    def _files(self) -> Iterator[str]:
        for path in Path(self.local).rglob("*"):
            if path.is_file():
                yield path.relative_to(self.local).as_posix()

    def push(self) -> None:
        for relative in sorted(self._files()):
            stamp = self._stamp(os.path.join(self.local, relative))
            if self._pushed.get(relative) == stamp:
                continue
            source = os.path.join(self.local, relative)
            storage.copy_file(source, storage.join(self.remote, relative), self.storage_cfg)
            self._pushed[relative] = stamp


def _folder(run_uri: str, name: str, storage_cfg: StorageConfig) -> tuple[str, _Mirror | None]:
    """A local folder for `<run>/<name>`: the folder itself, or a mirror of an s3:// one."""
    remote = storage.join(run_uri, name)
    if storage.is_s3(run_uri):
        mirror = _Mirror(remote, storage_cfg)
        return mirror.local, mirror
    path = os.path.abspath(remote)
    os.makedirs(path, exist_ok=True)
    return path, None


class _MLflowRun:
    """One MLflow run per training run, through `MlflowClient` (no global MLflow state)."""

    def __init__(
        self, cfg: Config, run_uri: str, task: str, params: dict[str, Any], text: str
    ) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.mirror: _Mirror | None = None
        tracking_uri = cfg.tracking.mlflow_tracking_uri
        if not tracking_uri:
            folder, self.mirror = _folder(run_uri, MLFLOW_DIR, cfg.storage)
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
            tracking_uri = Path(folder).as_uri()
        self.client = MlflowClient(tracking_uri=tracking_uri)
        name = cfg.tracking.mlflow_experiment
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(name)
        )
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_uri}'", max_results=1
        )
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {RUN_TAG: run_uri, "gpa_ray.task": task}
            run = self.client.create_run(experiment_id, tags=tags, run_name=cfg.train.name)
            self.run_id = run.info.run_id
            items = [Param(key, str(value)) for key, value in params.items()]
            for start in range(0, len(items), _MLFLOW_PARAMS_PER_CALL):
                chunk = items[start : start + _MLFLOW_PARAMS_PER_CALL]
                self.client.log_batch(self.run_id, params=chunk)
        self.client.log_text(self.run_id, text, storage.CONFIG_FILE)
        self.sync()

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(mlflow_metric_name(key), value, now, epoch) for key, value in metrics.items()
        ]
        self.client.log_batch(self.run_id, metrics=batch)

    def set_best(self, uri: str, epoch: int) -> None:
        self.client.set_tag(self.run_id, "best_checkpoint", uri)
        self.client.set_tag(self.run_id, "best_epoch", str(epoch))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)
        self.sync()

    def sync(self) -> None:
        if self.mirror is not None:
            self.mirror.push()


class _TensorBoardRun:
    """Event files of one writer session (`torch.utils.tensorboard.SummaryWriter`)."""

    def __init__(
        self,
        cfg: Config,
        run_uri: str,
        params: dict[str, Any],
        text: str,
        resumed: int,
        metric: str,
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        folder, self.mirror = _folder(run_uri, TENSORBOARD_DIR, cfg.storage)
        self.writer = SummaryWriter(log_dir=folder, purge_step=resumed + 1 if resumed else None)
        if not resumed:
            for summary in hparams(params, {metric: 0.0} if metric else {}):
                self.writer.file_writer.add_summary(summary)
        # Markdown: indented lines render as a code block, so the YAML keeps its layout.
        self.writer.add_text("config", _indented(text), global_step=resumed)
        self.sync()

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=epoch)

    def set_best(self, uri: str, epoch: int) -> None:
        self.writer.add_text("best_checkpoint", uri, global_step=epoch)

    def close(self, status: str) -> None:
        self.writer.close()
        self.sync()

    def sync(self) -> None:
        self.writer.flush()
        if self.mirror is not None:
            self.mirror.push()


def _indented(text: str) -> str:
    return "".join(f"    {line}\n" for line in text.splitlines())


class Tracker:
    """What rank 0 logs for one run; `open` returns None when no tracker is enabled."""

    def __init__(
        self, sinks: list[Any], metric: str, mode: str, best: tuple[str, int, float] | None
    ) -> None:
        self.sinks = sinks
        self.metric, self.mode = metric, mode
        self.best = best

    @classmethod
    def open(
        cls, cfg: Config, run_uri: str, task: str, resumed_epoch: int, metric: str, mode: str
    ) -> Tracker | None:
        """Start (or continue, after `resumed_epoch` epochs) the trackers of the `task` run.

        `metric`/`mode` rank its checkpoints (`gpa_ray.train.trainer.checkpoint_metric`);
        a resumed run takes its best so far from the checkpoints it holds."""
        if not (cfg.tracking.mlflow or cfg.tracking.tensorboard):
            return None
        for setting, module in (("mlflow", "mlflow"), ("tensorboard", "tensorboard")):
            if getattr(cfg.tracking, setting) and importlib.util.find_spec(module) is None:
                raise ModuleNotFoundError(
                    f"tracking.{setting}=true needs the {module!r} package, which is not "
                    "installed: pip install 'gpa_ray[tracking]'"
                )
        params = flat_params(cfg)
        text = config_to_yaml(cfg)  # redacted, as every written config
        sinks: list[Any] = []
        if cfg.tracking.mlflow:
            sinks.append(_MLflowRun(cfg, run_uri, task, params, text))
        if cfg.tracking.tensorboard:
            sinks.append(_TensorBoardRun(cfg, run_uri, params, text, resumed_epoch, metric))
        best = best_kept_checkpoint(run_uri, metric, mode, cfg.storage) if resumed_epoch else None
        return cls(sinks, metric, mode, best)

    def log_epoch(self, record: dict[str, Any], checkpoint_uri: str) -> None:
        """Log an epoch whose checkpoint Ray Train has stored at `checkpoint_uri`."""
        epoch = int(record["epoch"])
        metrics = epoch_metrics(record)
        value = record.get(self.metric)
        improved = _usable(value) and (
            self.best is None
            or rank_key(float(value), epoch, self.mode)
            > rank_key(self.best[2], self.best[1], self.mode)
        )
        if improved:
            self.best = (checkpoint_uri, epoch, float(value))
        for sink in self.sinks:
            sink.log_epoch(epoch, metrics)
            if improved:
                sink.set_best(checkpoint_uri, epoch)
            sink.sync()

    def close(self, failed: bool = False) -> None:
        """End the runs (FINISHED, or FAILED when training raised) and copy them out."""
        for sink in self.sinks:
            sink.close("FAILED" if failed else "FINISHED")

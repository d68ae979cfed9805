"""Driver side of training: a `TorchTrainer` built from the config, run, summarised.

`fit(loop)` is all a job calls. It reads the clip splits as Ray Datasets, builds

- `ScalingConfig(num_workers, use_gpu, resources_per_worker={"CPU": cpus_per_worker})`:
  fractional CPUs on small machines (a worker holding a whole core of two leaves Ray
  Data's read tasks no CPU and the run waits forever without an error);
- `RunConfig(storage_path, name)`: a local folder or `s3://` (through
  `gpa_ray.storage`'s filesystem, so the configured endpoint and credentials apply on
  the driver and on every worker);
- `CheckpointConfig`: the best `checkpoints_to_keep` by the task's metric, plus always
  the latest (Ray Train never deletes the latest);
- `FailureConfig(max_failures)`: a failed worker group restarts from the latest
  checkpoint (`ray.train.get_checkpoint()` in `gpa_ray.train.worker`);

and writes the resolved config to `<storage_path>/<name>/config.yaml`. Starting a run
again with the same storage path and name resumes it: Ray Train finds the run's
checkpoint records in storage and hands the latest checkpoint to the workers, so the
step counter continues (raise `train.epochs` to train further).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from gpa_ray import checkpoints, storage
from gpa_ray.config import Config, resolve_stage_uris
from gpa_ray.data import loaders
from gpa_ray.data.weighted_sampling import SAMPLERS, LabelFrequencySampler
from gpa_ray.train import history
from gpa_ray.train.loop import TrainLoop
from gpa_ray.train.tracking import rank_key
from gpa_ray.train.worker import train_worker

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a finished run left behind (URIs are local paths or s3://)."""

    run_uri: str
    checkpoint: str | None
    best_checkpoint: str | None
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    resumes: list[int]

    def summary(self) -> dict[str, Any]:
        return {
            "run": self.run_uri,
            "checkpoint": self.checkpoint,
            "best_checkpoint": self.best_checkpoint,
            "epochs": len(self.history),
            "resumed_at_steps": self.resumes,
            "metrics": self.metrics,
        }


def run_uri(cfg: Config) -> str:
    """`<train.storage_path>/<train.name>`: checkpoints, metrics files and config.yaml."""
    return storage.join(cfg.train.storage_path, cfg.train.name)


def data_uri(cfg: Config) -> str:
    """The ingest output to train on: `train.data`, else `ingest.output`."""
    return resolve_stage_uris(cfg).train.data


def checkpoint_metric(loop: TrainLoop, has_val: bool) -> tuple[str, str]:
    """(metric, "max"|"min") that ranks checkpoints."""
    metric = loop.cfg.train.checkpoint_metric or loop.metric
    if metric.startswith("val_") and not has_val:
        logger.warning("no %r split: ranking checkpoints by train_loss", loop.cfg.train.val_split)
        return "train_loss", "min"
    if loop.cfg.train.checkpoint_metric:
        return metric, "min" if metric.endswith("loss") else "max"
    return metric, loop.metric_mode


def uri_of(path: str, cfg: Config) -> str:
    """A Ray Train storage path back as a URI (Ray strips the s3:// scheme)."""
    if storage.is_s3(cfg.train.storage_path) and not storage.is_s3(path):
        return f"s3://{path.lstrip('/')}"
    return path


def build_trainer(loop: TrainLoop, datasets: dict[str, Any], callbacks: Sequence[Any] = ()) -> Any:
    """The `TorchTrainer` for `loop` over `datasets` ({"train"[, "val"]}); `callbacks`
    (Ray Train callbacks) go into its RunConfig, e.g. a sweep's report to Ray Tune."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = loop.cfg
    fs, path = storage.resolve(cfg.train.storage_path, cfg.storage)
    metric, mode = checkpoint_metric(loop, "val" in datasets)
    if cfg.train.early_stopping_patience > 0 and "val" not in datasets:
        raise ValueError(
            f"train.early_stopping_patience={cfg.train.early_stopping_patience} needs a "
            f"validation split, and {cfg.train.val_split!r} has no clip shards"
        )
    run_config = ray.train.RunConfig(
        name=cfg.train.name,
        storage_path=path,
        storage_filesystem=fs if storage.is_s3(cfg.train.storage_path) else None,
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=max(1, cfg.train.checkpoints_to_keep),
            checkpoint_score_attribute=metric,
            checkpoint_score_order=mode,
        ),
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        callbacks=list(callbacks),
    )
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "loop": loop,
            "run_uri": run_uri(cfg),
            "has_val": "val" in datasets,
            "stop_metric": (metric, mode),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        run_config=run_config,
        datasets=datasets,
        # Validation is not split: every worker reads it whole and evaluates a strided
        # share, so no row is dropped to make equal shards.
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"], execution_options=ordered_ingest_options()
        ),
    )


def ordered_ingest_options() -> Any:
    """Ray Train's default ingest options with `preserve_order`: Train replaces each
    dataset's execution options with these, so the order `loaders.read_clips` asks for
    must be asked for again here (see `loaders.ordered` for what it fixes)."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def clip_datasets(loop: TrainLoop) -> dict[str, Any]:
    """{"train": ..., "val": ...} Ray Datasets of the configured splits (val if present).

    Train streams (a fresh read per epoch, its blocks in an order drawn from
    `train.seed`: the same every epoch and after a resume, then shaped by the task's
    `TrainLoop.train_dataset`, e.g. a row per caption; each worker's local shuffle
    buffer, seeded per epoch, varies the order within it); the validation split, small by
    nature, is materialised once.
    """
    cfg = loop.cfg
    data = data_uri(cfg)
    read = {"corpus": cfg.train.corpus, "columns": loop.columns, "storage_cfg": cfg.storage}
    train = training_clips(loop).randomize_block_order(seed=cfg.train.seed)
    out = {"train": loop.train_dataset(train)}
    if loaders.split_files(data, cfg.train.val_split, cfg.train.corpus, cfg.storage):
        # Read once into the object store: every worker iterates it whole every epoch.
        with _without_progress_bars():
            out["val"] = loaders.read_clips(data, cfg.train.val_split, **read).materialize()
    return out


def training_clips(loop: TrainLoop) -> Any:
    """The training split(s) as a lazy Ray Dataset of the loop's columns; with
    `train.sampler=label_frequency`, the weighted sample of `gpa_ray.data.weighted_sampling`
    (the label counts are one streaming pass over the `labels` column, in the driver)."""
    cfg = loop.cfg
    data, split = data_uri(cfg), cfg.train.train_split
    if cfg.train.sampler not in SAMPLERS:
        raise ValueError(f"train.sampler {cfg.train.sampler!r}: choose one of {SAMPLERS}")
    columns = list(loop.columns)
    if cfg.train.sampler:
        columns += [c for c in ("clip_id", "labels") if c not in columns]
    read = {"corpus": cfg.train.corpus, "columns": columns, "storage_cfg": cfg.storage}
    clips = loaders.read_clips(data, split, **read)
    if not cfg.train.sampler:
        return clips
    frequencies = loaders.label_frequencies(data, split, cfg.train.corpus, cfg.storage)
    logger.info(
        "label-frequency sample of %d draws over %d labels",
        frequencies.n_clips,
        len(frequencies.counts),
    )
    sampler = LabelFrequencySampler(frequencies, cfg.train.seed)
    sampled = clips.map_batches(sampler, batch_format="pyarrow", batch_size=None)
    return sampled.select_columns(list(loop.columns))


@contextlib.contextmanager
def _without_progress_bars() -> Iterator[None]:
    """Datasets created inside carry a DataContext without progress bars.

    Every worker iterates the validation split each epoch, each time as a new Ray Data
    execution inside the worker; their bars are forwarded to the driver's console, which
    keeps redrawing them long after the run (over the quickstart's serving output, too).
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    previous = context.enable_progress_bars
    context.enable_progress_bars = False
    try:
        yield
    finally:
        context.enable_progress_bars = previous


def _best_checkpoint(result: Any, metric: str, mode: str, cfg: Config) -> str | None:
    """URI of the best checkpoint Ray Train kept, by `metric` ("max"/"min"); of tied ones
    the later epoch's, as Ray Train ranks ties and as the trackers report it."""
    ranked = [
        (rank_key(float(m[metric]), int(m.get("epoch", 0)), mode), c)
        for c, m in result.best_checkpoints or []
        if m.get(metric) is not None
    ]
    if not ranked:
        return None
    return uri_of(max(ranked, key=lambda item: item[0])[1].path, cfg)


def fit(
    loop: TrainLoop, datasets: dict[str, Any] | None = None, callbacks: Sequence[Any] = ()
) -> TrainResult:
    """Train (or resume) the run the config names; needs a running Ray.

    `datasets` defaults to the configured clip splits (`clip_datasets`); `callbacks` as
    in `build_trainer`.
    """
    cfg = loop.cfg
    uri = run_uri(cfg)
    datasets = datasets if datasets is not None else clip_datasets(loop)
    storage.dump_config(cfg, storage.join(uri, checkpoints.CONFIG_FILE))
    result = build_trainer(loop, datasets, callbacks).fit()
    metric, mode = checkpoint_metric(loop, "val" in datasets)
    latest = checkpoints.latest_checkpoint(uri, cfg.storage)
    state = checkpoints.read_state(latest, cfg.storage) if latest else {}
    records = state.get("history") or history.read(uri, cfg.storage)
    return TrainResult(
        run_uri=uri,
        checkpoint=latest,
        best_checkpoint=_best_checkpoint(result, metric, mode, cfg) or latest,
        metrics=records[-1] if records else {},
        history=records,
        resumes=list(state.get("resumes", [])),
    )

"""A GPA sweep on Ray Tune over Ray Train, the way Ray 2.60 documents it for Train V2.

The Tuner runs a function trainable per trial (`run_trial`) that builds the trial's
config (`gpa_ray.sweep.space`) and launches an ordinary GPA training run
(`gpa_ray.train.gpa_loop.train_gpa`: a `TorchTrainer` with its own worker group) from
inside the trial; a Ray Train callback hands every epoch's report to Ray Tune (Ray's
`TuneReportCallback`, which attaches the checkpoint path), so ASHA can stop a trial
after any epoch. Stopping a trial ends its actor, which owns the Train controller and so
the workers; their placement group is removed by the sweep driver when the trial ends
(`ReleaseStoppedTrials`: Ray Train's own clean-up of it needs the dashboard). A trial
that reaches `train.epochs` is not stopped but ends by itself.

Resources: a Train run starts only when its whole worker group fits, so
`sweep.max_concurrent_trials` (default 1) bounds the runs in flight; each trial's
function holds `sweep.trial_cpus` (a fraction: it only drives the run), its workers
`train.num_workers x train.cpus_per_worker`, and whatever is left runs Ray Data's reads.

Layout under `<sweep.storage_path or train.storage_path>/<sweep.name>/`:

    tune/          Ray Tune's experiment (trial results, its state)
    runs/<trial>/  each trial's GPA run folder (checkpoints, metrics.jsonl, summary.json)
    summary.json   every trial (parameters, status, epochs run, best metric, run folder)
                   and the best trial's run folder and checkpoint
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune import Callback
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

from gpa_ray import storage
from gpa_ray.config import Config
from gpa_ray.sweep.space import EPSILON_KEY, SweepError, sweep_metric, swept_values, trial_count
from gpa_ray.train.gpa_loop import GPALoop, train_gpa
from gpa_ray.train.trainer import uri_of

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


def sweep_root(cfg: Config) -> str:
    """`<sweep.storage_path or train.storage_path>/<sweep.name>`."""
    return storage.join(cfg.sweep.storage_path or cfg.train.storage_path, cfg.sweep.name)


PLACEMENT_GROUP_KEY = "train_placement_group"
"""Tune result key: the id of the trial's Train worker group placement group."""


class WorkerGroupPlacement(WorkerGroupCallback):
    """In the Train controller: the placement group of the run's current worker group.

    Ray Train removes it when the run ends, and a Train-internal actor removes it when the
    controller dies; that actor asks the dashboard's state API whether the controller is
    alive and fails without a dashboard (as on `ray.init(include_dashboard=False)`), so a
    trial that ASHA stops would keep its workers' CPUs. Reported to Tune with every epoch
    (`SweepReportCallback`), the id lets the sweep driver remove it
    (`ReleaseStoppedTrials`)."""

    def __init__(self) -> None:
        self.placement_group_id: str | None = None

    def after_worker_group_start(self, worker_group: Any) -> None:
        state = worker_group.get_worker_group_state()
        self.placement_group_id = state.placement_group_handle.placement_group.id.hex()


class SweepReportCallback(TuneReportCallback):
    """Each epoch's report to Ray Tune with the worker group's placement group, plus, when
    the sweep varies epsilon, the epoch checkpoint's validation A2T under the Sinkhorn
    bias (`gpa_ray.sweep.bias_metrics`)."""

    def __init__(self, cfg: Config, with_bias: bool, placement: WorkerGroupPlacement) -> None:
        super().__init__()
        self.cfg = cfg
        self.with_bias = with_bias
        self.placement = placement

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        extra: dict[str, Any] = {PLACEMENT_GROUP_KEY: self.placement.placement_group_id}
        if self.with_bias and checkpoint is not None:
            from gpa_ray.sweep.bias_metrics import sinkhorn_val_metrics

            extra.update(sinkhorn_val_metrics(uri_of(checkpoint.path, self.cfg), self.cfg))
        super().after_report(run_context, [{**metrics[0], **extra}, *metrics[1:]], checkpoint)


class ReleaseStoppedTrials(Callback):
    """In the sweep driver: when a trial ends (finished, stopped by ASHA, or failed),
    remove its Train worker group's placement group if it is still there, which ends the
    workers in it and frees their resources (see `WorkerGroupPlacement`)."""

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._release(trial)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._release(trial)

    @staticmethod
    def _release(trial: Any) -> None:
        import ray
        from ray.util.placement_group import PlacementGroup

        found = (trial.last_result or {}).get(PLACEMENT_GROUP_KEY)
        if not found:
            return
        group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(found)))
        if ray.util.placement_group_table(group).get("state") not in (None, "REMOVED"):
            logger.info("trial %s ended: removing its workers' placement group", trial.trial_id)
            ray.util.remove_placement_group(group)


def run_trial(params: dict[str, Any], cfg: Config, runs: str) -> None:
    """One trial (a Tune function trainable): train the GPA run of `params` under `runs`."""
    import ray.tune

    from gpa_ray.sweep.space import trial_config

    trial_id = ray.tune.get_context().get_trial_id()
    trial_cfg = trial_config(cfg, params, runs, trial_id)
    placement = WorkerGroupPlacement()
    report = SweepReportCallback(trial_cfg, EPSILON_KEY in params, placement)
    train_gpa(trial_cfg, callbacks=[report, placement])


def param_space(cfg: Config) -> dict[str, Any]:
    """The Tune search space: a grid over, or a uniform choice from, each swept list."""
    from ray import tune

    sample = tune.grid_search if cfg.sweep.search == "grid" else tune.choice
    return {key: sample(values) for key, values in swept_values(cfg).items()}


def _tune_storage(root: str, cfg: Config) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Tune's RunConfig: local folders absolute,
    s3:// through the configured filesystem (as `gpa_ray.train.trainer` does)."""
    if storage.is_s3(root):
        fs, path = storage.resolve(root, cfg.storage)
        return path, fs
    return os.path.abspath(root), None


def _check_fit(cfg: Config) -> None:
    """Warn when the trials in flight would hold every CPU the cluster has now: their
    Train runs would then wait for Ray Data reads that never get a CPU (an autoscaling
    cluster may still grow, so this is a warning, not an error)."""
    import ray

    per_trial = cfg.sweep.trial_cpus + cfg.train.num_workers * cfg.train.cpus_per_worker
    held = cfg.sweep.max_concurrent_trials * per_trial
    total = float(ray.cluster_resources().get("CPU", 0.0))
    if held >= total:
        logger.warning(
            "sweep.max_concurrent_trials=%d trials x %.2f CPUs (sweep.trial_cpus + "
            "train.num_workers x train.cpus_per_worker) hold %.2f of the cluster's %.2f "
            "CPUs: nothing is left for reading the data, lower them",
            cfg.sweep.max_concurrent_trials,
            per_trial,
            held,
            total,
        )


def run_sweep(cfg: Config) -> dict[str, Any]:
    """Run the sweep the config describes; needs a running Ray. Returns (and writes as
    `<root>/summary.json`) the trials and the best one's run folder and checkpoint."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    space = param_space(cfg)
    metric, mode = sweep_metric(cfg, GPALoop.metric)
    if cfg.train.epochs < 1:
        raise SweepError(f"train.epochs must be >= 1 for a sweep, got {cfg.train.epochs}")
    _check_fit(cfg)
    root = sweep_root(cfg)
    runs = storage.join(root, "runs")
    path, fs = _tune_storage(root, cfg)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, cfg=cfg, runs=runs), {"cpu": cfg.sweep.trial_cpus}
    )
    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        max_t=cfg.train.epochs,
        grace_period=min(cfg.sweep.grace_period, cfg.train.epochs),
        reduction_factor=cfg.sweep.reduction_factor,
        # A trial that reaches the last epoch ends by itself: its run writes summary.json
        # and Ray Train shuts its worker group down, instead of Tune killing the trial.
        stop_last_trials=False,
    )
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            scheduler=scheduler,
            # The generator itself bounds the trials in flight: Tune ignores
            # `max_concurrent_trials` when given a generator as `search_alg`.
            search_alg=BasicVariantGenerator(
                max_concurrent=cfg.sweep.max_concurrent_trials, random_state=cfg.sweep.seed
            ),
            num_samples=cfg.sweep.num_samples,
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=path,
            storage_filesystem=fs,
            callbacks=[ReleaseStoppedTrials()],
        ),
    )
    logger.info(
        "sweep %s: %d trials of %s, ranked by %s (%s)",
        root,
        trial_count(cfg),
        list(space),
        metric,
        mode,
    )
    grid = tuner.fit()
    summary = summarize(grid, cfg, runs, metric, mode)
    storage.write_bytes(
        storage.join(root, SUMMARY_FILE), json.dumps(summary, indent=2).encode(), cfg.storage
    )
    return summary


def _best_epoch(result: Any, metric: str, mode: str) -> dict[str, Any] | None:
    """The trial's reported epoch with the best `metric` (a tie: the later epoch, as Ray
    Train ranks checkpoints), or None if it reported none."""
    frame = result.metrics_dataframe
    if frame is None or metric not in frame:
        return None
    rows = [r for r in frame.to_dict("records") if r.get(metric) == r.get(metric)]  # not NaN
    if not rows:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(rows, key=lambda r: (sign * float(r[metric]), int(r["training_iteration"])))


def _trial_row(result: Any, runs: str, metric: str, mode: str, cfg: Config) -> dict[str, Any]:
    """One trial of the result grid: parameters, status, epochs run, best epoch, run folder
    and the checkpoint of its best epoch (None if Ray Train has not kept it)."""
    last = result.metrics or {}
    trial_id = last.get("trial_id")
    best = _best_epoch(result, metric, mode)
    checkpoint = None
    if best and isinstance(best.get(CHECKPOINT_PATH_KEY), str):
        uri = uri_of(best[CHECKPOINT_PATH_KEY], cfg)
        if storage.exists(storage.join(uri, "model.pt"), cfg.storage):
            checkpoint = uri
    epochs = int(last.get("training_iteration", 0))
    return {
        "trial_id": trial_id,
        "params": dict(result.config),
        "epochs": epochs,
        "stopped_early": result.error is None and epochs < cfg.train.epochs,
        "error": None if result.error is None else str(result.error),
        "best_epoch": int(best["training_iteration"]) if best else None,
        metric: float(best[metric]) if best else None,
        "run": storage.join(runs, trial_id) if trial_id else None,
        "best_checkpoint": checkpoint,
    }


def summarize(grid: Any, cfg: Config, runs: str, metric: str, mode: str) -> dict[str, Any]:
    """The sweep's summary from Tune's result grid: every trial, and the best trial (by
    its best epoch's `metric`; a tie: the trial that ran first)."""
    rows = [_trial_row(result, runs, metric, mode, cfg) for result in grid]
    scored = [(i, r) for i, r in enumerate(rows) if r[metric] is not None]
    sign = 1.0 if mode == "max" else -1.0
    best = max(scored, key=lambda item: (sign * item[1][metric], -item[0]))[1] if scored else None
    return {
        "root": sweep_root(cfg),
        "metric": metric,
        "mode": mode,
        "trials": rows,
        "best_trial": best["trial_id"] if best else None,
        "best_run": best["run"] if best else None,
        "best_checkpoint": best["best_checkpoint"] if best else None,
        f"best_{metric}": best[metric] if best else None,
    }

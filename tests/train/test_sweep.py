"""GPA sweeps (`gpa_ray.sweep`, `jobs/sweep_gpa.py`): the search space and trial configs,
then a 4-trial sweep on the debug preset through Ray Tune, Ray Train and ASHA."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from gpa_ray import storage
from gpa_ray.config_loading import load_config
from gpa_ray.sweep.space import (
    SweepError,
    sweep_metric,
    swept_values,
    trial_config,
    trial_count,
)
from gpa_ray.testing.jobs import job_main
from gpa_ray.train import history


def test_swept_settings_become_config_keys_and_trial_configs() -> None:
    cfg = load_config(
        "debug",
        [
            "sweep.lr=[1e-3,3e-4]",
            "sweep.temperature=[0.05]",
            "sweep.n_prototypes=[2,4]",
            "sweep.scorer=[lass,mean]",
            "sweep.sinkhorn_epsilon=[0.05,0.1]",
        ],
    )
    assert swept_values(cfg) == {
        "train.lr": [1e-3, 3e-4],
        "gpa.temperature": [0.05],
        "gpa.n_prototypes": [2, 4],
        "gpa.scorer": ["lass", "mean"],
        "sinkhorn.epsilon": [0.05, 0.1],
    }
    assert trial_count(cfg) == 2 * 1 * 2 * 2 * 2
    params = {"train.lr": 3e-4, "gpa.n_prototypes": 4, "gpa.scorer": "mean"}
    trial = trial_config(cfg, params, "/runs", "t1")
    assert (trial.train.lr, trial.gpa.n_prototypes, trial.gpa.scorer) == (3e-4, 4, "mean")
    assert (trial.train.storage_path, trial.train.name) == ("/runs", "t1")
    assert trial.gpa.temperature == cfg.gpa.temperature and trial.sweep == cfg.sweep
    random = load_config("debug", ["sweep.lr=[1e-3,3e-4]", "sweep.search=random"])
    assert trial_count(random) == 1
    assert sweep_metric(cfg, "val_t2a_R@1") == ("val_t2a_R@1", "max")
    loss = load_config("debug", ["sweep.lr=[1e-3]", "train.checkpoint_metric=val_loss"])
    assert sweep_metric(loss, "val_t2a_R@1") == ("val_loss", "min")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "nothing to sweep"),
        (["sweep.scorer=[lass,cosine]"], r"sweep.scorer: unknown \['cosine'\]"),
        (["sweep.lr=[1e-3,1e-3]"], "sweep.lr lists a value twice"),
        (["sweep.sinkhorn_epsilon=[0.0]"], "sweep.sinkhorn_epsilon values must be positive"),
        (["sweep.lr=[1e-3]", "sweep.search=bayes"], "sweep.search 'bayes'"),
    ],
)
def test_bad_sweeps_name_the_setting(overrides: list[str], message: str) -> None:
    with pytest.raises(SweepError, match=message):
        swept_values(load_config("debug", overrides))


def test_a_sinkhorn_metric_needs_swept_epsilons() -> None:
    cfg = load_config("debug", ["sweep.lr=[1e-3]", "sweep.metric=val_a2t_sinkhorn_R@1"])
    with pytest.raises(SweepError, match="needs sweep.sinkhorn_epsilon"):
        sweep_metric(cfg, "val_t2a_R@1")


def _held() -> tuple[list[str], float]:
    """(states of the placement groups not removed, CPUs in use) of the local Ray."""
    import ray

    groups = ray.util.placement_group_table().values()
    live = [g["state"] for g in groups if g["state"] != "REMOVED"]
    return live, ray.cluster_resources()["CPU"] - ray.available_resources().get("CPU", 0.0)


@pytest.mark.slow
def test_four_trial_sweep_on_the_debug_preset(
    ray_session: None, write_esc50_shards: Any, tmp_path: Path
) -> None:
    """lr x Sinkhorn epsilon, 2 epochs, one trial at a time. The trials are ranked by
    their reported `lr` (max), so ASHA's cut is known: a trial at lr 1e-4 that reaches
    epoch 1 after one at 1e-3 falls below the rung's cutoff and is stopped there. Every
    trial reports the validation A2T under its Sinkhorn bias; the best trial's run folder
    holds its checkpoints; afterwards no placement group is left and every CPU is free."""

    data = write_esc50_shards(str(tmp_path / "ingest"), None)
    started = time.perf_counter()
    argv = [
        "--config",
        "debug",
        f"train.data={data}",
        "train.corpus=esc50",
        f"train.storage_path={tmp_path / 'sweeps'}",
        "train.epochs=2",
        "audio.max_seconds=1.0",
        "sweep.name=tiny",
        "sweep.lr=[1e-3,1e-4]",
        "sweep.sinkhorn_epsilon=[0.05,0.1]",
        "sweep.metric=lr",
        "sweep.mode=max",
        "sweep.bias_queries=6",
    ]
    assert job_main("sweep_gpa")(argv) == 0
    seconds = time.perf_counter() - started
    summary = json.loads((tmp_path / "sweeps" / "tiny" / "summary.json").read_text())
    trials = summary["trials"]
    print(f"4-trial sweep: {seconds:.1f} s;", [(t["params"], t["epochs"]) for t in trials])
    assert len(trials) == 4 and all(t["error"] is None for t in trials)
    assert sorted((t["params"]["train.lr"], t["params"]["sinkhorn.epsilon"]) for t in trials) == [
        (1e-4, 0.05),
        (1e-4, 0.1),
        (1e-3, 0.05),
        (1e-3, 0.1),
    ]
    # The lr 1e-3 trials are never behind: they run every epoch.
    assert all(t["epochs"] == 2 for t in trials if t["params"]["train.lr"] == 1e-3)
    stopped = [t for t in trials if t["stopped_early"]]
    assert stopped and all(t["epochs"] == 1 and t["params"]["train.lr"] == 1e-4 for t in stopped)
    best = next(t for t in trials if t["trial_id"] == summary["best_trial"])
    assert best["params"]["train.lr"] == 1e-3 and summary["best_run"] == best["run"]
    assert summary["best_checkpoint"] and storage.exists(
        storage.join(summary["best_checkpoint"], "model.pt")
    )
    for trial in trials:
        records = history.read(trial["run"])
        assert len(records) == trial["epochs"]
        assert all(r["lr"] == pytest.approx(trial["params"]["train.lr"]) for r in records)
    # The Sinkhorn-bias A2T of every epoch reached Tune (its result files).
    results = [
        json.loads(line)
        for path in (tmp_path / "sweeps" / "tiny" / "tune").rglob("result.json")
        for line in path.read_text().splitlines()
    ]
    assert len(results) == sum(t["epochs"] for t in trials)
    assert all(0.0 <= r["val_a2t_sinkhorn_R@1"] <= 1.0 for r in results)
    # Stopped and finished trials alike have given their workers back: no placement
    # group left (Train's worker group holds one), every CPU free.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _held() != ([], 0.0):
        time.sleep(1)
    assert _held() == ([], 0.0)

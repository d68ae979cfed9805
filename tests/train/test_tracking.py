"""Experiment tracking (`gpa_ray.train.tracking`), read back by the real libraries:
MLflow's `MlflowClient` and TensorBoard's `EventAccumulator`.

The tracker alone on a local and an S3 run (a resume after a rollback included), then a
tiny GPA training on the debug preset with both trackers on and storage credentials set.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from gpa_ray import checkpoints, storage
from gpa_ray.config import Config, StorageConfig
from gpa_ray.config_loading import load_config
from gpa_ray.train import history
from gpa_ray.train.tracking import (
    MLFLOW_DIR,
    RUN_TAG,
    TENSORBOARD_DIR,
    Tracker,
    flat_params,
    mlflow_metric_name,
)

SECRETS = {
    "access_key_id": "AKIATRACKINGTEST0001",
    "secret_access_key": "tracking-secret-key-do-not-log",
    "session_token": "tracking-session-token-do-not-log",
}
METRIC = "val_t2a_R@1"


def _records(values: list[tuple[int, float]]) -> list[dict[str, Any]]:
    return [
        {"epoch": e, "step": 3 * e, "lr": 1e-3, "train_loss": 2.0 / e, METRIC: v} for e, v in values
    ]


def _write_checkpoint(run: str, epoch: int, records: list[dict[str, Any]], cfg: Config) -> str:
    """A `checkpoint_*` folder holding only the `state.json` a resumed tracker reads."""
    uri = storage.join(run, f"checkpoint_epoch{epoch}")
    state = {"epoch": epoch, "step": 3 * epoch, "history": records[:epoch]}
    storage.write_bytes(
        storage.join(uri, checkpoints.STATE_FILE), json.dumps(state).encode(), cfg.storage
    )
    return uri


def _local_copy(run: str, target: Path, storage_cfg: StorageConfig) -> Path:
    """The run's tracking folders copied to a local folder (the readers need one)."""
    for name in (MLFLOW_DIR, TENSORBOARD_DIR):
        base = storage.join(run, name)
        for uri in storage.list_files(base, storage_cfg=storage_cfg):
            storage.copy_file(uri, str(target / name / uri[len(base) + 1 :]), storage_cfg)
    return target


def _mlflow_run(folder: Path) -> tuple[Any, Any]:
    """(client, the one run) of the MLflow file store in `folder`."""
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = MlflowClient(tracking_uri=(folder / MLFLOW_DIR).as_uri())
    experiment = client.get_experiment_by_name("gpa_ray")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def _events(folder: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder / TENSORBOARD_DIR), size_guidance={"tensors": 0})
    accumulator.Reload()
    return accumulator


def _texts(events: Any, tag: str) -> list[tuple[int, str]]:
    return [
        (e.step, e.tensor_proto.string_val[0].decode())
        for e in events.Tensors(f"{tag}/text_summary")
    ]


def _assert_no_secrets(folder: Path) -> None:
    """No file the trackers wrote under `folder` holds a credential string."""
    files = [p for name in (MLFLOW_DIR, TENSORBOARD_DIR) for p in (folder / name).rglob("*")]
    assert any(p.is_file() for p in files)
    for path in files:
        if path.is_file():
            data = path.read_bytes()
            assert not any(secret.encode() in data for secret in SECRETS.values()), path


def test_metric_names_and_params() -> None:
    assert mlflow_metric_name("val_t2a_R@10") == "val_t2a_R_at_10"
    assert mlflow_metric_name("val_mAP@10 (a2t)") == "val_mAP_at_10 _a2t_"
    assert mlflow_metric_name("train_loss") == "train_loss"
    cfg = load_config("debug", [f"storage.{k}={v}" for k, v in SECRETS.items()])
    params = flat_params(cfg)
    assert params["train.lr"] == cfg.train.lr and params["gpa.scorer"] == "lass"
    assert params["corpus.esc50_train_folds"] == "[1, 2, 3]"
    assert params["ray.object_store_memory_mb"] == "null"
    assert all(params[f"storage.{k}"] == "" for k in SECRETS)
    assert not any(secret in str(params) for secret in SECRETS.values())


def _tracker_scenario(run: str, cfg: Config, local: Path) -> None:
    """Epochs 1-3 logged, then a rollback to the checkpoint of epoch 2 (epoch 3's was not
    stored) and epochs 3-4 logged again by a new tracker: what a worker failure does."""
    first = _records([(1, 0.1), (2, 0.3), (3, 0.25)])
    tracker = Tracker.open(cfg, run, "gpa", 0, METRIC, "max")
    assert tracker is not None
    for record in first:
        tracker.log_epoch(record, storage.join(run, f"checkpoint_epoch{record['epoch']}"))
    tracker.close(failed=True)
    kept = [_write_checkpoint(run, epoch, first, cfg) for epoch in (1, 2)]
    second = first[:2] + _records([(3, 0.2), (4, 0.3)])
    resumed = Tracker.open(cfg, run, "gpa", 2, METRIC, "max")
    assert resumed is not None and resumed.best == (kept[1], 2, 0.3)
    for record in second[2:]:
        resumed.log_epoch(record, storage.join(run, f"checkpoint_epoch{record['epoch']}"))
    resumed.close()

    folder = _local_copy(run, local, cfg.storage) if storage.is_s3(run) else Path(run)
    client, found = _mlflow_run(folder)
    assert found.info.status == "FINISHED" and found.data.tags[RUN_TAG] == run
    # Epoch 4 ties epoch 2 (0.3): the later checkpoint is the best, as Ray Train ranks it.
    assert found.data.tags["best_checkpoint"] == storage.join(run, "checkpoint_epoch4")
    assert found.data.tags["best_epoch"] == "4"
    assert found.data.params == {k: str(v) for k, v in flat_params(cfg).items()}
    for key in ("train_loss", "lr", "step", METRIC):
        logged = client.get_metric_history(found.info.run_id, mlflow_metric_name(key))
        # MLflow keeps every value logged: the first epoch 3 stays beside the redone one.
        assert sorted((m.step, m.value) for m in logged) == sorted(
            (r["epoch"], float(r[key])) for r in first + second[2:]
        )
        assert found.data.metrics[mlflow_metric_name(key)] == pytest.approx(second[-1][key])
    config_text = Path(client.download_artifacts(found.info.run_id, "config.yaml", str(local)))
    written = config_text.read_text()
    assert "secret_access_key: ''" in written and "lr: 0.0001" in written

    events = _events(folder)
    for key in ("train_loss", METRIC):
        # TensorBoard drops the rolled-back epoch 3 (purge_step): each epoch once.
        points = [(s.step, s.value) for s in events.Scalars(key)]
        assert points == [(r["epoch"], pytest.approx(r[key])) for r in second]
    assert [step for step, _ in _texts(events, "best_checkpoint")] == [1, 2, 4]
    assert _texts(events, "best_checkpoint")[-1][1] == storage.join(run, "checkpoint_epoch4")
    assert all("secret_access_key: ''" in text for _, text in _texts(events, "config"))
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["train.lr"].number_value == pytest.approx(cfg.train.lr)
    assert hparams["storage.secret_access_key"].string_value == ""
    _assert_no_secrets(folder)


def _tracking_config(*overrides: str) -> Config:
    return load_config(
        "debug",
        ["tracking.mlflow=true", "tracking.tensorboard=true", *overrides],
    )


def test_tracker_on_a_local_run(tmp_path: Path) -> None:
    cfg = _tracking_config(*[f"storage.{k}={v}" for k, v in SECRETS.items()])
    _tracker_scenario(str(tmp_path / "run"), cfg, tmp_path / "read")


@pytest.mark.s3
def test_tracker_on_an_s3_run(s3_server: Any, tmp_path: Path) -> None:
    """On s3:// the trackers write local folders copied into the run after each epoch; the
    resumed tracker starts from the copies (the MLflow run goes on, not a second one)."""
    cfg = _tracking_config(*s3_server.overrides())
    cfg = dataclasses.replace(
        cfg, storage=dataclasses.replace(cfg.storage, session_token=SECRETS["session_token"])
    )
    run = s3_server.uri("tracking", "run")
    _tracker_scenario(run, cfg, tmp_path / "read")
    assert storage.list_files(storage.join(run, TENSORBOARD_DIR), storage_cfg=cfg.storage)


def test_no_tracker_unless_enabled(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    assert Tracker.open(load_config("debug"), run, "gpa", 0, METRIC, "max") is None
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_tiny_training_is_tracked(
    ray_session: None, write_esc50_shards: Any, tmp_path: Path
) -> None:
    """The debug preset's GPA for 2 epochs through Ray Train with both trackers on: every
    epoch's metrics in both, the best checkpoint the run's summary names, no credential."""
    from gpa_ray.train.gpa_loop import train_gpa

    data = write_esc50_shards(str(tmp_path / "ingest"), None)
    cfg = _tracking_config(
        f"train.data={data}",
        "train.corpus=esc50",
        f"train.storage_path={tmp_path / 'runs'}",
        "train.name=tracked",
        "train.epochs=2",
        "train.lr=1e-3",
        "audio.max_seconds=1.0",
        *[f"storage.{k}={v}" for k, v in SECRETS.items()],
    )
    result = train_gpa(cfg)
    run = Path(result.run_uri)
    records = history.read(result.run_uri)
    assert len(records) == 2
    summary = json.loads((run / checkpoints.RUN_SUMMARY_FILE).read_text())

    client, found = _mlflow_run(run)
    assert found.info.status == "FINISHED" and found.data.tags["gpa_ray.task"] == "gpa"
    assert found.data.tags["best_checkpoint"] == summary["best_checkpoint"]
    assert found.data.params["train.epochs"] == "2"
    numbers = [k for k, v in records[0].items() if k != "epoch" and isinstance(v, int | float)]
    assert {"train_loss", "val_t2a_R@1", "val_a2t_mAP@10", "lr"} <= set(numbers)
    events = _events(run)
    for key in numbers:
        logged = client.get_metric_history(found.info.run_id, mlflow_metric_name(key))
        assert [(m.step, m.value) for m in logged] == [(r["epoch"], r[key]) for r in records]
        points = [(s.step, s.value) for s in events.Scalars(key)]
        assert points == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in records]
    assert _texts(events, "best_checkpoint")[-1][1] == summary["best_checkpoint"]
    _assert_no_secrets(run)

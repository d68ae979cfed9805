"""Runs and checkpoints (`gpa_ray.checkpoints`): training and GPA checkpoints saved and
loaded (local and S3), which checkpoint a run URI resolves to ("best" / "latest"),
AudioFormer backbones from each kind of training checkpoint, clear errors."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gpa_ray import storage
from gpa_ray.audio.inputs import AudioInputs
from gpa_ray.checkpoints import (
    CheckpointError,
    TrainState,
    encoder_from_checkpoint,
    latest_checkpoint,
    load_model_state,
    load_train_checkpoint,
    read_config,
    read_state,
    resolve_checkpoint,
    save_gpa,
    save_train_checkpoint,
    sub_state,
    weights_digest,
    write_run_summary,
)
from gpa_ray.config import Config, TrainConfig
from gpa_ray.config_loading import load_config
from gpa_ray.models.factory import build_gpa, load_gpa, load_gpa_checkpoint
from gpa_ray.models.gpa import GPAModel
from gpa_ray.testing.models import (
    save_tiny_text_model,
    tiny_audioformer_config,
    tiny_gpa_run_config,
)
from gpa_ray.testing.services import S3Server
from gpa_ray.train.trainer import TrainResult

TEXTS = ["a dog barks", "rain on the roof"]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    text = save_tiny_text_model(tmp_path_factory.mktemp("tiny_bert"))
    return dataclasses.replace(tiny_gpa_run_config(text), train=TrainConfig(name="ckpt"))


def _model(cfg: Config, seed: int) -> GPAModel:
    torch.manual_seed(seed)
    return build_gpa(cfg).eval()


def _outputs(model: GPAModel, cfg: Config) -> torch.Tensor:
    inputs = AudioInputs.from_config(cfg)
    wave = np.random.default_rng(0).normal(0, 0.1, 40000).astype(np.float32)
    with torch.no_grad():
        audio, text = model(inputs.collate([inputs.from_waveform(wave, 32000)]), TEXTS)
        return model.score(audio, text)


def _train_checkpoint(directory: Path, model: nn.Module, cfg: Config, step: int) -> None:
    """A checkpoint folder as the training plumbing writes it inside Ray Train."""
    save_train_checkpoint(
        str(directory),
        model_state=model.state_dict(),
        optimizer_state={"optimizer": {}, "scheduler": {}},
        train_state=TrainState(epoch=step // 4, step=step, history=[{"epoch": 1}], resumes=[4]),
        task="gpa",
        loop_state={"labels": ["a"]},
        cfg=cfg,
    )


def test_train_checkpoint_round_trip_and_latest(tmp_path: Path) -> None:
    cfg = load_config("debug", ["train.name=unit"])
    run = tmp_path / "run"
    for name, step in [
        ("checkpoint_2024-01-01_00-00-02", 4),
        ("checkpoint_2024-01-01_00-00-01", 8),
    ]:
        _train_checkpoint(run / name, nn.Linear(2, 1), cfg, step)
    model_state, optimizer_state, state = load_train_checkpoint(
        str(run / "checkpoint_2024-01-01_00-00-01")
    )
    assert set(model_state) == {"weight", "bias"}
    assert optimizer_state == {"optimizer": {}, "scheduler": {}}
    assert state == TrainState(epoch=2, step=8, history=[{"epoch": 1}], resumes=[4])
    # Latest = most optimizer steps, whatever the folder names sort to.
    latest = latest_checkpoint(str(run))
    assert latest is not None and latest.endswith("checkpoint_2024-01-01_00-00-01")
    assert resolve_checkpoint(str(run), "latest") == latest
    assert read_state(latest)["loop"] == {"labels": ["a"]}
    assert read_config(latest) == cfg
    assert sub_state({"a.b.w": 1, "a.c": 2, "d": 3}, "a") == {"b.w": 1, "c": 2}
    with pytest.raises(CheckpointError, match="no weights under 'x'"):
        sub_state({"a.b": 1}, "x")
    assert latest_checkpoint(str(tmp_path / "empty")) is None
    with pytest.raises(CheckpointError):
        resolve_checkpoint(str(tmp_path / "empty"), "latest")


@pytest.mark.s3
def test_train_checkpoint_found_on_s3(tmp_path: Path, s3_server: S3Server) -> None:
    _train_checkpoint(tmp_path / "ckpt", nn.Linear(2, 1), load_config("debug"), 12)
    run = s3_server.uri("unit-run")
    for name in os.listdir(tmp_path / "ckpt"):
        data = (tmp_path / "ckpt" / name).read_bytes()
        storage.write_bytes(f"{run}/checkpoint_x/{name}", data, s3_server.storage)
    assert latest_checkpoint(run, s3_server.storage) == f"{run}/checkpoint_x"
    found = resolve_checkpoint(run, "latest", s3_server.storage)
    assert load_model_state(found, s3_server.storage)["weight"].shape == (1, 2)


def test_gpa_round_trip_rebuilds_the_same_model(cfg: Config, tmp_path: Path) -> None:
    model = _model(cfg, seed=1)
    save_gpa(model, cfg, str(tmp_path / "ckpt"))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.yaml", "model.pt"]
    loaded, loaded_cfg = load_gpa(str(tmp_path / "ckpt"))
    assert loaded_cfg == cfg and not loaded.training
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    torch.testing.assert_close(_outputs(loaded, cfg), _outputs(model, cfg))


@pytest.mark.s3
def test_gpa_round_trip_on_s3(cfg: Config, s3_server: S3Server) -> None:
    model = _model(cfg, seed=2)
    uri = s3_server.uri("gpa", "ckpt")
    s3_cfg = dataclasses.replace(cfg, storage=s3_server.storage)
    save_gpa(model, s3_cfg, uri)
    loaded, loaded_cfg = load_gpa(uri, s3_server.storage)
    assert loaded_cfg.storage == s3_server.storage
    torch.testing.assert_close(_outputs(loaded, cfg), _outputs(model, cfg))


def test_gpa_loads_training_checkpoints_and_run_directories(cfg: Config, tmp_path: Path) -> None:
    run = tmp_path / "run"
    early, late = _model(cfg, seed=3), _model(cfg, seed=4)
    _train_checkpoint(run / "checkpoint_000000", early, cfg, step=10)
    _train_checkpoint(run / "checkpoint_000001", late, cfg, step=20)
    # A Ray Train checkpoint folder loads as it is.
    loaded, _ = load_gpa(str(run / "checkpoint_000000"))
    torch.testing.assert_close(_outputs(loaded, cfg), _outputs(early, cfg))
    # A run without summary.json: its latest checkpoint (most optimizer steps).
    assert resolve_checkpoint(str(run), "best") == str(run / "checkpoint_000001")
    # With summary.json (written by the GPA training job): its best checkpoint.
    summary = {"best_checkpoint": str(run / "checkpoint_000000"), "checkpoint": str(run)}
    write_run_summary(str(run), summary)
    loaded, _ = load_gpa(str(run))
    torch.testing.assert_close(_outputs(loaded, cfg), _outputs(early, cfg))


def _gpa_run(run: Path, cfg: Config) -> dict[str, GPAModel]:
    """A GPA run as the training job leaves it: three checkpoints (Ray Train's folder
    names, which do not sort by step) and the job's summary.json naming the middle one
    as best. Returns the model of each checkpoint folder."""
    models = {}
    for seed, (name, step) in enumerate(
        [("checkpoint_000002", 10), ("checkpoint_000000", 20), ("checkpoint_000001", 30)]
    ):
        models[name] = _model(cfg, seed=10 + seed)
        _train_checkpoint(run / name, models[name], cfg, step)
    result = TrainResult(
        run_uri=str(run),
        checkpoint=str(run / "checkpoint_000001"),
        best_checkpoint=str(run / "checkpoint_000000"),
        metrics={"val_t2a_R@1": 0.5},
        history=[],
        resumes=[],
    )
    write_run_summary(str(run), result.summary())
    return models


def test_best_and_latest_of_a_run(cfg: Config, tmp_path: Path) -> None:
    run = tmp_path / "run"
    models = _gpa_run(run, cfg)
    best, latest = str(run / "checkpoint_000000"), str(run / "checkpoint_000001")
    # "best": summary.json's best_checkpoint; "latest": the most optimizer steps.
    assert resolve_checkpoint(str(run), "best") == best
    assert resolve_checkpoint(str(run) + "/", "latest") == latest
    # A checkpoint URI is itself, whichever is asked for.
    for which in ("best", "latest"):
        assert resolve_checkpoint(str(run / "checkpoint_000002"), which) == str(
            run / "checkpoint_000002"
        )
    # load_gpa takes a run's best by default (the GPA consumers), its latest on request.
    loaded, _ = load_gpa(str(run))
    torch.testing.assert_close(_outputs(loaded, cfg), _outputs(models["checkpoint_000000"], cfg))
    loaded, _ = load_gpa(str(run), which="latest")
    torch.testing.assert_close(_outputs(loaded, cfg), _outputs(models["checkpoint_000001"], cfg))
    # The best folder gone (e.g. pruned): summary.json's latest `checkpoint` is next.
    storage.delete(storage.join(best, "model.pt"))
    assert resolve_checkpoint(str(run), "best") == latest
    with pytest.raises(ValueError, match="'newest'"):
        resolve_checkpoint(str(run), "newest")  # type: ignore[arg-type]


def test_run_without_summary_resolves_both_to_latest(cfg: Config, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _gpa_run(run, cfg)
    (run / "summary.json").unlink()
    latest = str(run / "checkpoint_000001")
    assert resolve_checkpoint(str(run), "best") == latest
    assert resolve_checkpoint(str(run), "latest") == latest


def test_weights_digest_is_the_sha256_of_model_pt(cfg: Config, tmp_path: Path) -> None:
    save_gpa(_model(cfg, seed=0), cfg, str(tmp_path / "a"))
    save_gpa(_model(cfg, seed=1), cfg, str(tmp_path / "b"))
    copy = tmp_path / "elsewhere" / "a"
    copy.mkdir(parents=True)
    (copy / "model.pt").write_bytes((tmp_path / "a" / "model.pt").read_bytes())
    expected = hashlib.sha256((tmp_path / "a" / "model.pt").read_bytes()).hexdigest()
    assert weights_digest(str(tmp_path / "a")) == expected == weights_digest(str(copy))
    assert load_gpa_checkpoint(str(tmp_path / "a")).digest == expected  # the bytes it loaded
    assert weights_digest(str(tmp_path / "b")) != expected
    with pytest.raises(storage.StorageError, match="model.pt"):
        weights_digest(str(tmp_path / "missing"))


def test_missing_and_mismatched_checkpoints_name_the_uri(cfg: Config, tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    for which in ("best", "latest"):
        with pytest.raises(CheckpointError, match=f"no checkpoint at {missing}: expected model.pt"):
            resolve_checkpoint(str(missing), which)
    with pytest.raises(CheckpointError, match=f"no checkpoint at {missing}"):
        load_gpa(str(missing))
    save_gpa(_model(cfg, seed=5), cfg, str(tmp_path / "dp"))
    # A config that describes another model (the DP baseline has no prototype branch).
    config_file = tmp_path / "dp" / "config.yaml"
    text = config_file.read_text()
    assert "scorer: lass" in text
    storage.write_bytes(str(config_file), text.replace("scorer: lass", "scorer: none").encode())
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'dp'}/model.pt does not fit"):
        load_gpa(str(tmp_path / "dp"))


def test_encoder_from_each_kind_of_checkpoint(tmp_path: Path) -> None:
    from gpa_ray.models.audioformer import AudioFormerClassifier, AudioFormerEncoder, AudioFormerFT2
    from gpa_ray.train.audioformer_loops import CodebookMLM

    base = load_config("debug")
    cfg = dataclasses.replace(base, audioformer=tiny_audioformer_config(codebooks=[2, 3]))
    torch.manual_seed(0)
    mlm = CodebookMLM(cfg.audioformer)
    # The codebook-1 backbone is the first configured codebook's: c2 here.
    expected = mlm.models["c2"].backbone.state_dict()
    anchor = AudioFormerClassifier(AudioFormerEncoder.from_mlm(mlm.models["c2"]), 3)
    frozen = [AudioFormerEncoder.from_mlm(mlm.models["c3"])]
    for task, model in [("mlm", mlm), ("ft1", anchor), ("ft2", AudioFormerFT2(anchor, frozen))]:
        save_train_checkpoint(
            str(tmp_path / task / "checkpoint_0"),
            model_state=model.state_dict(),
            optimizer_state={},
            train_state=TrainState(step=1),
            task=task,
            loop_state={},
            cfg=cfg,
        )
        checkpoint = resolve_checkpoint(str(tmp_path / task), "latest")
        got = encoder_from_checkpoint(checkpoint, cfg).roformer.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), task
    wider = dataclasses.replace(cfg, audioformer=dataclasses.replace(cfg.audioformer, num_heads=4))
    with pytest.raises(ValueError, match="num_heads: checkpoint 2 vs config 4"):
        encoder_from_checkpoint(str(tmp_path / "ft1" / "checkpoint_0"), wider)

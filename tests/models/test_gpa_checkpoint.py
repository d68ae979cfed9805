"""GPA checkpoints: save/load round trip (local and S3), Ray Train checkpoint folders,
run directories resolved to their best or latest checkpoint, clear errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gpa_ray import storage
from gpa_ray.audio.inputs import AudioInputs
from gpa_ray.config import Config, TrainConfig
from gpa_ray.models.factory import build_gpa
from gpa_ray.models.gpa import GPAModel
from gpa_ray.models.gpa_checkpoint import (
    GPACheckpointError,
    load_gpa,
    resolve_gpa_checkpoint,
    save_gpa,
)
from gpa_ray.testing.models import save_tiny_text_model, tiny_gpa_run_config
from gpa_ray.testing.services import S3Server
from gpa_ray.train import checkpoints

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


def test_round_trip_rebuilds_the_same_model(cfg: Config, tmp_path: Path) -> None:
    model = _model(cfg, seed=1)
    save_gpa(model, cfg, str(tmp_path / "ckpt"))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.yaml", "model.pt"]
    loaded, loaded_cfg = load_gpa(str(tmp_path / "ckpt"))
    assert loaded_cfg == cfg and not loaded.training
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    torch.testing.assert_close(_outputs(loaded, cfg), _outputs(model, cfg))


@pytest.mark.s3
def test_round_trip_on_s3(cfg: Config, s3_server: S3Server) -> None:
    model = _model(cfg, seed=2)
    uri = s3_server.uri("gpa", "ckpt")
    s3_cfg = dataclasses.replace(cfg, storage=s3_server.storage)
    save_gpa(model, s3_cfg, uri)
    loaded, loaded_cfg = load_gpa(uri, s3_server.storage)
    assert loaded_cfg.storage == s3_server.storage
    torch.testing.assert_close(_outputs(loaded, cfg), _outputs(model, cfg))


def _ray_checkpoint(directory: Path, model: GPAModel, cfg: Config, step: int) -> None:
    """A checkpoint folder as the training plumbing writes it inside Ray Train."""
    checkpoints.save(
        str(directory),
        model_state=model.state_dict(),
        optimizer_state={"optimizer": {}, "scheduler": {}},
        train_state=checkpoints.TrainState(epoch=step, step=step),
        task="gpa",
        loop_state={},
        cfg=cfg,
    )


def test_training_checkpoints_and_run_directories(cfg: Config, tmp_path: Path) -> None:
    run = tmp_path / "run"
    early, late = _model(cfg, seed=3), _model(cfg, seed=4)
    _ray_checkpoint(run / "checkpoint_000000", early, cfg, step=10)
    _ray_checkpoint(run / "checkpoint_000001", late, cfg, step=20)
    # A Ray Train checkpoint folder loads as it is.
    loaded, _ = load_gpa(str(run / "checkpoint_000000"))
    torch.testing.assert_close(_outputs(loaded, cfg), _outputs(early, cfg))
    # A run without summary.json: its latest checkpoint (most optimizer steps).
    assert resolve_gpa_checkpoint(str(run)) == str(run / "checkpoint_000001")
    # With summary.json (written by the GPA training job): its best checkpoint.
    summary = {"best_checkpoint": str(run / "checkpoint_000000"), "checkpoint": str(run)}
    (run / "summary.json").write_text(json.dumps(summary))
    loaded, _ = load_gpa(str(run))
    torch.testing.assert_close(_outputs(loaded, cfg), _outputs(early, cfg))


def test_missing_and_mismatched_checkpoints_name_the_uri(cfg: Config, tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    with pytest.raises(GPACheckpointError, match=f"no GPA checkpoint at {missing}"):
        load_gpa(str(missing))
    save_gpa(_model(cfg, seed=5), cfg, str(tmp_path / "dp"))
    # A config that describes another model (the DP baseline has no prototype branch).
    config_file = tmp_path / "dp" / "config.yaml"
    text = config_file.read_text()
    assert "scorer: lass" in text
    storage.write_bytes(str(config_file), text.replace("scorer: lass", "scorer: none").encode())
    with pytest.raises(GPACheckpointError, match=f"{tmp_path / 'dp'}/model.pt does not fit"):
        load_gpa(str(tmp_path / "dp"))

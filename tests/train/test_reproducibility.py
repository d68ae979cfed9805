"""Same seed, same settings, same worker count: bitwise the same run.

Two small GPA trainings through the real Ray Train path (`gpa_ray.train.trainer.fit`:
Ray Data shards streamed into 2 DDP workers, the local shuffle buffer, collate threads,
SpecAugment, caption draws and augmentation, dropout in the text tower, validation
every epoch) must leave bitwise-equal parameters and metrics; a third run with another
seed must not (so the comparison can fail).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from gpa_ray import checkpoints
from gpa_ray.config import Config
from gpa_ray.testing.models import save_tiny_text_model, tiny_gpa_run_config
from gpa_ray.train import history
from gpa_ray.train.gpa_loop import GPALoop
from gpa_ray.train.trainer import fit

TIMING_KEYS = ("seconds",)
"""History fields that measure time (`train_seconds`, ...): the only ones allowed to differ."""


def _config(text_dir: str, data: str, runs: Path, name: str, seed: int) -> Config:
    base = tiny_gpa_run_config(text_dir)
    train = dataclasses.replace(
        base.train,
        data=data,
        corpus="esc50",
        storage_path=str(runs),
        name=name,
        seed=seed,
        epochs=2,
        batch_size=3,
        num_workers=2,
        cpus_per_worker=0.5,
        shuffle_buffer=4,
        lr=1e-3,
    )
    return dataclasses.replace(
        base,
        audio=dataclasses.replace(base.audio, max_seconds=1.0),
        gpa=dataclasses.replace(base.gpa, loss="nt_xent", caption_aug_share=0.5),
        train=train,
    )


def _run(cfg: Config) -> tuple[dict[str, torch.Tensor], list[dict[str, object]]]:
    result = fit(GPALoop(cfg))
    assert result.checkpoint is not None
    state = checkpoints.load_model_state(result.checkpoint)
    records = [
        {k: v for k, v in record.items() if not k.endswith(TIMING_KEYS)}
        for record in history.read(result.run_uri)
    ]
    return state, records


def _differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [name for name in a if not torch.equal(a[name], b[name])]


@pytest.mark.slow
def test_two_gpa_trainings_with_one_seed_are_bitwise_equal(
    ray_session: None, write_esc50_shards: object, tmp_path: Path
) -> None:
    data = write_esc50_shards(str(tmp_path / "ingest"), None)  # type: ignore[operator]
    text_dir = save_tiny_text_model(tmp_path / "text", dropout=0.1)
    runs = tmp_path / "runs"
    first, first_history = _run(_config(text_dir, data, runs, "first", seed=3))
    second, second_history = _run(_config(text_dir, data, runs, "second", seed=3))
    other, _ = _run(_config(text_dir, data, runs, "other_seed", seed=4))
    assert _differing(first, second) == []
    assert first_history == second_history and len(first_history) == 2
    assert "val_t2a_R@1" in first_history[-1]
    trained = [name for name in first if first[name].is_floating_point()]
    assert len(_differing(first, other)) > len(trained) // 2

"""Training pairs per epoch (`train.pairs_per_epoch`): with "caption", an epoch is every
(clip, caption) pair once, as the DP baseline's loader, streamed on Ray Data in the same
order run after run; two captions of one clip are never each other's negatives.

Real ESC-50 clips (1 s) with five distinct captions each, written as clip shards; the Ray
test reads them through the same `clip_datasets` a training run hands to Ray Train.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from gpa_ray import checkpoints, losses, storage
from gpa_ray.config import Config, TrainConfig
from gpa_ray.data.loaders import LoaderError, expand_captions
from gpa_ray.testing.data import esc50_clip_table
from gpa_ray.testing.models import save_tiny_text_model, tiny_gpa_run_config
from gpa_ray.train.gpa_loop import GPALoop
from gpa_ray.train.trainer import clip_datasets, fit

N_CAPS = 5


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_text_model(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def clips(shared_data: Path) -> pa.Table:
    """3 real ESC-50 clips, each with 5 distinct captions."""
    table = esc50_clip_table(shared_data / "esc50", 3, max_seconds=1.0)
    captions = [
        [f"{caps[0]}, take {k}" for k in range(N_CAPS)]
        for caps in table.column("captions").to_pylist()
    ]
    index = table.column_names.index("captions")
    return table.set_column(index, "captions", pa.array(captions, pa.list_(pa.string())))


def _cfg(text_dir: str, data: str = "", pairs: str = "caption", seed: int = 7) -> Config:
    base = tiny_gpa_run_config(text_dir)
    return dataclasses.replace(
        base,
        audio=dataclasses.replace(base.audio, max_seconds=1.0),
        train=TrainConfig(
            batch_size=4, cpus_per_worker=0.5, seed=seed, data=data, pairs_per_epoch=pairs
        ),
    )


def _all_pairs(clips: pa.Table) -> list[tuple[str, str]]:
    """Every (clip, caption) of a clip table, clip by clip."""
    return [
        (clip, text)
        for clip, caps in zip(
            clips.column("clip_id").to_pylist(), clips.column("captions").to_pylist(), strict=True
        )
        for text in caps
    ]


def _pairs(table: pa.Table) -> list[tuple[str, str]]:
    return list(
        zip(table.column("clip_id").to_pylist(), table.column("caption").to_pylist(), strict=True)
    )


def test_expand_captions_gives_each_caption_one_row(clips: pa.Table) -> None:
    expanded = expand_captions(clips)
    assert expanded.num_rows == 3 * N_CAPS
    expected = _all_pairs(clips)
    assert _pairs(expanded) == expected
    assert expanded.column("caption_index").to_pylist() == list(range(N_CAPS)) * 3
    # Every other column is the clip's own, repeated (the audio bytes included).
    assert expanded.column("audio").to_pylist() == [
        a for a in clips.column("audio").to_pylist() for _ in range(N_CAPS)
    ]
    assert "captions" not in expanded.column_names
    # A slice (an Arrow view with an offset) expands to its own clips' captions only.
    assert _pairs(expand_captions(clips.slice(1, 2))) == expected[N_CAPS:]


def test_a_clip_without_captions_is_named(clips: pa.Table) -> None:
    captions = clips.column("captions").to_pylist()
    captions[1] = []
    index = clips.column_names.index("captions")
    broken = clips.set_column(index, "captions", pa.array(captions, pa.list_(pa.string())))
    clip = clips.column("clip_id")[1].as_py()
    with pytest.raises(LoaderError, match=f"clip '{clip}' has no captions"):
        expand_captions(broken)


def test_caption_rows_pair_their_own_caption_and_are_not_each_others_negatives(
    text_dir: str, clips: pa.Table
) -> None:
    loop = GPALoop(_cfg(text_dir))
    collate = loop.collate_fn(True, 0)
    rows = expand_captions(clips)
    texts, caption_clip, seeds = collate.pair_texts(rows)
    assert texts == rows.column("caption").to_pylist()
    assert caption_clip == list(range(3 * N_CAPS))
    # Five draws per clip (crops, SpecAugment masks): one per caption, not one per clip.
    assert len(set(seeds)) == 3 * N_CAPS
    batch = collate(rows.slice(0, 6))
    logmel = batch["audio.logmel"]
    assert not torch.equal(logmel[0], logmel[1])
    # Rows 0-4 are clip 0's captions, row 5 clip 1's: the same-clip keys are masked out of
    # every row's negatives (the losses' clip_id mask), the other clip's are kept.
    keys = batch["clip_keys"]
    assert len(set(keys[:5].tolist())) == 1 and keys[5] != keys[0]
    excluded = losses.duplicate_mask(torch.arange(6), keys, 6)
    same_clip = torch.zeros(6, 6, dtype=torch.bool)
    same_clip[:5, :5] = ~torch.eye(5, dtype=torch.bool)
    assert torch.equal(excluded, same_clip)


def test_unknown_pairs_per_epoch_is_refused(text_dir: str) -> None:
    with pytest.raises(ValueError, match="train.pairs_per_epoch 'pair'"):
        GPALoop(_cfg(text_dir, pairs="pair"))


def _write_shards(clips: pa.Table, data: str, val: bool = False) -> None:
    """Clip 0 and 1 in one shard, clip 2 in another (ingest layout); optionally a val split."""
    for part, rows in enumerate((clips.slice(0, 2), clips.slice(2, 1))):
        storage.write_parquet(
            storage.join(data, "clips", "esc50", "train", f"part-{part:06d}.parquet"), rows
        )
    if val:
        storage.write_parquet(
            storage.join(data, "clips", "esc50", "val", "part-000000.parquet"), clips.slice(0, 1)
        )


def _epoch(cfg: Config) -> list[tuple[str, str]]:
    """The (clip, caption) sequence of the training dataset a run hands to Ray Train."""
    datasets = clip_datasets(GPALoop(cfg))
    assert "val" not in datasets
    pairs: list[tuple[str, str]] = []
    for batch in datasets["train"].iter_batches(batch_format="pyarrow", batch_size=4):
        pairs.extend(_pairs(batch))
    return pairs


def test_a_caption_epoch_streams_every_pair_once_in_a_fixed_order(
    ray_session: None, text_dir: str, clips: pa.Table, tmp_path: Path
) -> None:
    data = str(tmp_path / "ingest")
    _write_shards(clips, data)
    pairs = _epoch(_cfg(text_dir, data))
    # 3 clips x 5 captions: 15 pairs, each caption exactly once.
    assert len(pairs) == 3 * N_CAPS
    assert sorted(pairs) == sorted(_all_pairs(clips))
    assert Counter(c for c, _ in pairs) == {c: N_CAPS for c in clips.column("clip_id").to_pylist()}
    # Same seed: the same sequence.
    assert _epoch(_cfg(text_dir, data)) == pairs


@pytest.mark.slow
def test_caption_epochs_through_ray_train_are_reproducible(
    ray_session: None, text_dir: str, clips: pa.Table, tmp_path: Path
) -> None:
    """Two 2-worker runs of the real `fit` with one seed: 15 pairs per epoch (3 steps of 3
    per worker, against 1 with a pair per clip), bitwise-equal weights and metrics."""
    data = str(tmp_path / "ingest")
    _write_shards(clips, data, val=True)

    def run(name: str) -> tuple[dict[str, torch.Tensor], list[dict[str, object]]]:
        cfg = _cfg(text_dir, data)
        train = dataclasses.replace(
            cfg.train,
            storage_path=str(tmp_path / "runs"),
            name=name,
            epochs=1,
            batch_size=3,
            num_workers=2,
            shuffle_buffer=4,
            lr=1e-3,
        )
        result = fit(GPALoop(dataclasses.replace(cfg, train=train)))
        assert result.checkpoint is not None
        records = [
            {k: v for k, v in r.items() if not k.endswith("seconds")} for r in result.history
        ]
        return checkpoints.load_model_state(result.checkpoint), records

    first, first_history = run("first")
    second, second_history = run("second")
    assert first_history == second_history
    assert first_history[0]["steps_per_epoch"] == 3
    assert all(torch.equal(first[k], second[k]) for k in first)

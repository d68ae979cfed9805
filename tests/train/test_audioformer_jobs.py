"""AudioFormer jobs end to end on the shared local Ray, on real ESC-50 clips.

A module fixture ingests a small real subset (the first 40 rows of the shared ESC-50
list, first 2 s of each clip: fold 4 -> train, folds 2 and 3 -> val) with
`jobs/ingest.py`; the jobs then run through their `main([...])` with the debug preset:
pre-training, FT1 and FT2 (two workers, so DDP and the cross-worker MPC gather are real),
a run whose checkpoints live on the test S3 server and that a second run resumes, and a
run whose worker process exits mid-training and is restarted by Ray Train.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gpa_ray import checkpoints, storage
from gpa_ray.testing.jobs import job_main
from gpa_ray.train import history
from gpa_ray.train.worker import FAULT_MARKER

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def esc50_clips(
    ray_session: None, shared_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """The ingest output of 40 real ESC-50 clips (2 s each, codes only)."""
    out = str(tmp_path_factory.mktemp("esc50_ingest"))
    job_main("ingest")(
        [
            "--config",
            "debug",
            "corpus.kind=esc50",
            f"corpus.root={shared_data / 'esc50'}",
            "corpus.limit=40",
            "corpus.esc50_train_folds=[4]",
            "corpus.esc50_val_folds=[2,3]",
            "corpus.esc50_test_folds=[5]",
            f"ingest.output={out}",
            "ingest.max_seconds=2.0",
            "ingest.store_audio=false",
        ]
    )
    return out


def common(data: str, runs: str, name: str, *extra: str) -> list[str]:
    return [
        "--config",
        "debug",
        f"train.data={data}",
        f"train.storage_path={runs}",
        f"train.name={name}",
        *extra,
    ]


def timed(main: Callable[[list[str]], int], argv: list[str]) -> float:
    started = time.perf_counter()
    assert main(argv) == 0
    return time.perf_counter() - started


def assert_learns(run: str, storage_cfg: object = None) -> list[dict]:
    records = history.read(run, storage_cfg)
    losses = [r["train_loss"] for r in records]
    assert len(losses) >= 2 and losses[-1] < losses[0], losses
    return records


@pytest.fixture(scope="module")
def pretrained(esc50_clips: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 3-epoch MLM pre-training run of all 4 codebooks (its run URI)."""
    runs = str(tmp_path_factory.mktemp("runs"))
    seconds = timed(
        job_main("pretrain_audioformer"),
        common(esc50_clips, runs, "pre", "train.epochs=3", "train.lr=1e-3"),
    )
    print(f"pretrain_audioformer: {seconds:.1f} s")
    return storage.join(runs, "pre")


def test_pretrain_writes_run_and_loss_goes_down(pretrained: str) -> None:
    records = assert_learns(pretrained)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(0.0 <= r["val_mlm_accuracy"] <= 1.0 for r in records)
    for name in ("config.yaml", history.METRICS_FILE, history.PLOT_FILE):
        assert storage.exists(storage.join(pretrained, name))
    latest = checkpoints.resolve_checkpoint(pretrained, "latest")
    state = checkpoints.read_state(latest)
    assert state["task"] == "mlm" and state["step"] == records[-1]["step"]
    weights = checkpoints.load_model_state(latest)
    assert {k.split(".")[1] for k in weights} == {"c0", "c1", "c2", "c3"}


def test_finetune_ft1_from_pretraining(esc50_clips: str, pretrained: str, tmp_path: Path) -> None:
    argv = common(
        esc50_clips,
        str(tmp_path),
        "ft1",
        f"train.init_from={pretrained}",
        "train.finetune_stage=ft1",
        "audioformer.classification_loss=ce",
        "train.epochs=3",
        "train.lr=1e-3",
    )
    print(f"finetune_audioformer ft1: {timed(job_main('finetune_audioformer'), argv):.1f} s")
    records = assert_learns(str(tmp_path / "ft1"))
    assert "val_accuracy" in records[-1] and "val_mAP" in records[-1]
    state = checkpoints.read_state(checkpoints.resolve_checkpoint(str(tmp_path / "ft1"), "latest"))
    assert state["task"] == "ft1" and state["loop"]["label_space"]["multi_label"] is False
    # The backbone started from the pre-trained weights, not from a random init.
    pre = checkpoints.load_model_state(checkpoints.resolve_checkpoint(pretrained, "latest"))
    assert "models.c0.mlm.roformer.encoder.layer.0.attention.self.query.weight" in pre


def test_finetune_ft2_two_workers(esc50_clips: str, pretrained: str, tmp_path: Path) -> None:
    argv = common(
        esc50_clips,
        str(tmp_path),
        "ft2",
        f"train.init_from={pretrained}",
        "train.finetune_stage=ft2",
        "audioformer.classification_loss=ce",
        "train.num_workers=2",
        "train.epochs=3",
        "train.lr=1e-3",
    )
    seconds = timed(job_main("finetune_audioformer"), argv)
    print(f"finetune_audioformer ft2 (2 workers): {seconds:.1f} s")
    records = assert_learns(str(tmp_path / "ft2"))
    assert {"train_mlc", "train_mpc"} <= set(records[-1])
    # The frozen codebook-2..4 backbones are the pre-trained ones, unchanged by FT2.
    pre = checkpoints.load_model_state(checkpoints.resolve_checkpoint(pretrained, "latest"))
    ft2 = checkpoints.load_model_state(
        checkpoints.resolve_checkpoint(str(tmp_path / "ft2"), "latest")
    )
    key = "encoder.layer.0.attention.self.query.weight"
    assert ft2[f"frozen.0.roformer.{key}"].equal(pre[f"models.c1.mlm.roformer.{key}"])
    assert not ft2[f"anchor.encoder.roformer.{key}"].equal(pre[f"models.c0.mlm.roformer.{key}"])


@pytest.mark.s3
def test_checkpoints_on_s3_and_second_run_resumes(esc50_clips: str, s3_server: object) -> None:
    s3 = s3_server.storage
    argv = [
        *common(esc50_clips, s3_server.uri("runs"), "resume", "audioformer.codebooks=[0]"),
        "train.batch_size=8",
        *s3_server.overrides(),
    ]
    run = s3_server.uri("runs", "resume")
    timed(job_main("pretrain_audioformer"), [*argv, "train.epochs=1"])
    first = checkpoints.read_state(checkpoints.resolve_checkpoint(run, "latest", s3), s3)
    assert first["epoch"] == 1 and first["resumes"] == []
    steps = first["step"]
    assert storage.list_files(run, checkpoints.MODEL_FILE, s3), "no checkpoint on S3"
    timed(job_main("pretrain_audioformer"), [*argv, "train.epochs=2"])
    second = checkpoints.read_state(checkpoints.resolve_checkpoint(run, "latest", s3), s3)
    # The second run started from the first run's checkpoint: the step counter continues.
    assert second["resumes"] == [steps]
    assert [r["step"] for r in second["history"]] == [steps, 2 * steps]
    assert [r["epoch"] for r in history.read(run, s3)] == [1, 2]


def test_worker_exit_is_restarted_from_last_checkpoint(esc50_clips: str, tmp_path: Path) -> None:
    # 25 train clips at batch 8 -> 4 steps per epoch: the worker dies at step 6 (epoch 2).
    argv = common(
        esc50_clips,
        str(tmp_path),
        "fault",
        "audioformer.codebooks=[0]",
        "train.batch_size=8",
        "train.epochs=3",
        "train.max_failures=1",
        "train.fail_at_step=6",
    )
    timed(job_main("pretrain_audioformer"), argv)
    run = str(tmp_path / "fault")
    assert storage.exists(storage.join(run, FAULT_MARKER))
    state = checkpoints.read_state(checkpoints.resolve_checkpoint(run, "latest"))
    per_epoch = state["history"][0]["step"]
    assert per_epoch == 4
    # Restarted from the epoch-1 checkpoint (step 4), then ran to completion once each.
    assert state["resumes"] == [per_epoch]
    assert [r["epoch"] for r in state["history"]] == [1, 2, 3]
    assert state["step"] == 3 * per_epoch


def test_phased_ft1_weighted_sample_then_early_stopping(
    esc50_clips: str, pretrained: str, tmp_path: Path
) -> None:
    """The AS-2M FT1 protocol's mechanics: phase 1 on a label-frequency weighted sample,
    phase 2 continuing phase 1's classifier (its labels) and stopping early on val mAP."""
    finetune = job_main("finetune_audioformer")
    runs = str(tmp_path)
    base = ["train.finetune_stage=ft1", "audioformer.classification_loss=ce"]
    phase1 = [f"train.init_from={pretrained}", "train.sampler=label_frequency", "train.epochs=1"]
    assert finetune(common(esc50_clips, runs, "p1", *base, *phase1, "train.lr=1e-3")) == 0
    # lr 0: val mAP never improves after epoch 1, so patience 1 stops before epoch 3.
    phase2 = [f"train.init_from={storage.join(runs, 'p1')}", "train.early_stopping_patience=1"]
    argv = common(esc50_clips, runs, "p2", *base, *phase2, "train.lr=0", "train.epochs=5")
    assert finetune(argv) == 0
    assert [r["epoch"] for r in history.read(storage.join(runs, "p2"))] == [1, 2]
    p1, p2 = (checkpoints.resolve_checkpoint(storage.join(runs, n), "latest") for n in ("p1", "p2"))
    assert checkpoints.read_state(p2)["loop"] == checkpoints.read_state(p1)["loop"]
    first, second = checkpoints.load_model_state(p1), checkpoints.load_model_state(p2)
    assert first.keys() == second.keys() and all(first[k].equal(second[k]) for k in first)
    # Run again with more epochs: the stopped run's records say stop, so nothing trains.
    assert finetune([*argv[:-1], "train.epochs=8"]) == 0
    assert len(history.read(storage.join(runs, "p2"))) == 2

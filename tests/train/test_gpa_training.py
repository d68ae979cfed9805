"""GPA training: batches, the per-worker loss split, evaluation, and under Ray Train the
parity of 2 workers x 4 pairs with 1 worker x 8 pairs; the job end to end on ESC-50.

The Ray tests (marked slow) run on the shared local Ray: the parity test steps the real
`GPALoop` inside `TorchTrainer` workers (DDP over gloo, the cross-worker gather with
gradients); the job test ingests real ESC-50 clips and calls `jobs/train_gpa.py`'s main.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest
import torch

from gpa_ray import storage
from gpa_ray.config import Config, TrainConfig
from gpa_ray.data.captions import clip_key
from gpa_ray.losses import cwcl_weights
from gpa_ray.metrics import retrieval_metrics
from gpa_ray.models.factory import load_gpa
from gpa_ray.models.gpa import Embeddings
from gpa_ray.testing.data import esc50_clip_table, esc50_holdout_captions
from gpa_ray.testing.jobs import job_main
from gpa_ray.testing.models import save_tiny_text_model, tiny_gpa_config, tiny_gpa_run_config
from gpa_ray.testing.parity import gpa_one_step_worker
from gpa_ray.train import history
from gpa_ray.train.gpa_loop import (
    GPALoop,
    contrastive_step,
    metrics_table,
    retrieval_loss,
    split_batch,
    with_recall_sums,
)
from gpa_ray.train.schedules import advance, build_scheduler
from gpa_ray.train.worker import seed_everything

LOSSES = ["triplet", "nt_xent", "info_nce", "cwcl"]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_text_model(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def table(shared_data: Path) -> object:
    """8 real ESC-50 clips (1 s each, FLAC at 32 kHz), one templated caption each."""
    return esc50_clip_table(shared_data / "esc50", 8, max_seconds=1.0)


def _cfg(text_dir: str, **gpa: object) -> Config:
    base = tiny_gpa_run_config(text_dir)
    return dataclasses.replace(
        base,
        audio=dataclasses.replace(base.audio, max_seconds=1.0),
        audio_encoder=dataclasses.replace(base.audio_encoder, trainable_layers=0),
        gpa=dataclasses.replace(base.gpa, **gpa),
        train=TrainConfig(lr=1e-3, batch_size=4, cpus_per_worker=0.5, seed=7),
    )


@pytest.mark.parametrize("loss", LOSSES)
def test_local_losses_add_up_to_the_global_batch_loss(loss: str) -> None:
    """Each worker's loss over its own rows (local queries x global keys), weighted by its
    share of the batch, sums to the single-process loss: the identity the gather relies on.
    Shards of 3 and 5 rows; clips 1 and 6 are the same clip (a duplicate key)."""
    gen = torch.Generator().manual_seed(0)
    sim = torch.randn(8, 8, generator=gen)
    keys = torch.tensor([10, 11, 12, 13, 14, 15, 11, 17])
    features = torch.randn(8, 5, generator=gen)
    gpa = tiny_gpa_config(loss=loss)
    full = retrieval_loss(loss, gpa, sim, sim.T, torch.arange(8), keys, features)
    total = torch.zeros(())
    for rows in (slice(0, 3), slice(3, 8)):
        positive = torch.arange(8)[rows]
        local = retrieval_loss(loss, gpa, sim[rows], sim.T[rows], positive, keys, features)
        total = total + local * (len(positive) / 8)
    torch.testing.assert_close(total, full)


def test_single_process_step_is_the_plain_loss(text_dir: str, table: object) -> None:
    cfg = _cfg(text_dir, loss="nt_xent")
    loop = GPALoop(cfg)
    torch.manual_seed(0)
    model = loop.build_model().train()
    batch = loop.collate_fn(True)(table)
    audio, text = split_batch(batch)
    audio_emb, text_emb = model(audio, text)
    loss, logged = contrastive_step(model, audio_emb, text_emb, batch["clip_keys"], cfg.gpa, True)
    sim = model.score(audio_emb, text_emb)
    # ESC-50 rows 0, 1, 2 are three different cow clips: distinct keys, so the plain loss
    # (eq 12: the two directions summed).
    expected = torch.nn.functional.cross_entropy(
        sim / 0.07, torch.arange(8)
    ) + torch.nn.functional.cross_entropy(sim.T / 0.07, torch.arange(8))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logged, expected.detach())


def test_cwcl_weights_come_from_a_locked_copy_of_the_text_tower(
    text_dir: str, table: object
) -> None:
    """CWCL (appendix A.3.2, "locking the text model works best"): the text tower trains,
    its frozen copy gives w_ij and stays at the starting weights through optimizer steps."""
    cfg = _cfg(text_dir, loss="cwcl")
    cfg = dataclasses.replace(
        cfg,
        text=dataclasses.replace(cfg.text, pooling="mean"),
        train=dataclasses.replace(cfg.train, lr=0.01),
    )
    assert cfg.text.trainable_layers == -1
    loop = GPALoop(cfg)
    torch.manual_seed(0)
    model = loop.build_model().train()
    locked = loop.locked_text
    assert locked is not None and locked is not model.text_encoder
    assert not any(p.requires_grad for p in locked.parameters())
    start = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    optimizer = loop.build_optimizer(model)
    batch = loop.collate_fn(True)(table)
    for _ in range(3):
        loss, _ = loop.train_step(model, batch, torch.Generator())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = model.text_encoder.state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    assert all(torch.equal(v, start[k]) for k, v in locked.state_dict().items())
    # The step's weights are the locked tower's features, not the trained tower's.
    audio, text = split_batch(batch)
    with torch.no_grad():
        audio_emb, text_emb = model(audio, text)
        ids, mask = text["input_ids"], text["attention_mask"]
        locked_features = locked.encode_tokens(ids, mask).global_
        trained_features = model.text_encoder.encode_tokens(ids, mask).global_
    torch.testing.assert_close(loop.text_features(text), locked_features)
    assert not torch.allclose(locked_features, trained_features, atol=1e-4)
    locked_w, trained_w = cwcl_weights(locked_features), cwcl_weights(trained_features)
    assert (locked_w - trained_w).abs().max() > 1e-4
    loss, _ = loop.train_step(model, batch, torch.Generator())
    step = [model, audio_emb, text_emb, batch["clip_keys"], cfg.gpa, True]
    expected, _ = contrastive_step(*step, locked_features)
    torch.testing.assert_close(loss.detach(), expected.detach(), atol=1e-6, rtol=1e-6)
    # The two weightings give losses 4e-5 apart here: well outside the 1e-6 above.
    unlocked, _ = contrastive_step(*step, trained_features)
    assert abs(float(unlocked.detach()) - float(expected.detach())) > 1e-5
    # A tower that is frozen anyway is its own locked copy (no second one in memory).
    frozen_cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, trainable_layers=0))
    frozen_loop = GPALoop(frozen_cfg)
    assert frozen_loop.build_model().text_encoder is frozen_loop.locked_text


def test_training_batches(text_dir: str, table: object) -> None:
    cfg = _cfg(text_dir, caption_aug_share=0.5)
    loop = GPALoop(cfg)
    assert loop.columns == ("clip_id", "captions", "audio")
    epoch1 = loop.collate_fn(True, 0)
    whole = epoch1(table)
    assert whole["audio.logmel"].shape == (8, 101, 32)  # 1 s at 32 kHz, hop 320
    assert whole["caption_clip"].tolist() == list(range(8))
    ids = table.column("clip_id").to_pylist()
    assert whole["clip_keys"].tolist() == [clip_key(c) for c in ids]
    # A clip's crop, SpecAugment masks and caption do not depend on how the batch is cut
    # (the draws are per clip, not per worker), which is what makes worker counts agree.
    halves = [epoch1(table.slice(0, 4)), epoch1(table.slice(4, 4))]
    torch.testing.assert_close(
        torch.cat([h["audio.logmel"] for h in halves]), whole["audio.logmel"]
    )
    tokens = [row[row != 0].tolist() for row in whole["text.input_ids"]]
    half_tokens = [row[row != 0].tolist() for h in halves for row in h["text.input_ids"]]
    assert tokens == half_tokens
    # The next epoch draws again: other SpecAugment masks.
    epoch2 = loop.collate_fn(True, 1)(table)
    assert not torch.equal(epoch2["audio.logmel"], whole["audio.logmel"])
    # A resumed run (a fresh loop in a new worker) draws what epoch 2 drew, whatever
    # epochs it collated before.
    resumed = GPALoop(cfg).collate_fn(True, 1)(table)
    assert torch.equal(resumed["audio.logmel"], epoch2["audio.logmel"])
    assert torch.equal(resumed["text.input_ids"], epoch2["text.input_ids"])
    # Validation: no augmentation, every caption, each tied to its clip's row.
    val = loop.collate_fn(False)(table)
    assert torch.equal(val["audio.logmel"], loop.collate_fn(False)(table)["audio.logmel"])
    assert val["caption_clip"].tolist() == list(range(8))


def test_evaluation_is_the_metrics_of_the_whole_pool(text_dir: str, table: object) -> None:
    cfg = _cfg(text_dir)
    loop = GPALoop(cfg)
    torch.manual_seed(0)
    model = loop.build_model().eval()
    collate = loop.collate_fn(False)
    parts = [collate(table.slice(0, 3)), collate(table.slice(3, 5))]
    with torch.no_grad():
        in_parts = loop.evaluate(model, parts)
        audio_parts, text_parts = zip(*(model(*split_batch(part)) for part in parts), strict=True)
        audio, text = Embeddings.cat(audio_parts), Embeddings.cat(text_parts)
        whole_audio, whole_text = model(*split_batch(collate(table)))
    # The batching changes embeddings only by float rounding...
    torch.testing.assert_close(audio.prototypes, whole_audio.prototypes, atol=1e-5, rtol=0)
    torch.testing.assert_close(text.prototypes, whole_text.prototypes, atol=1e-5, rtol=0)
    # ...but the untrained model nearly ties every text (the first clips share one caption),
    # so ranks are compared on the same embeddings, scored as one pool of 8 x 8.
    # The templated captions: identical texts count as relevant to every clip carrying them.
    scores = model.score(audio, text)
    texts = [caps[0] for caps in table.column("captions").to_pylist()]
    expected = with_recall_sums(
        retrieval_metrics(scores, caption_to_clip=list(range(8)), caption_texts=texts)
    )
    assert in_parts == pytest.approx(expected)
    assert len(set(texts)) < 8
    assert expected != with_recall_sums(retrieval_metrics(scores, caption_to_clip=list(range(8))))
    assert {"t2a_R@1", "t2a_R@5", "t2a_R@10", "t2a_mAP@10", "t2a_MRR", "a2t_R@1"} <= set(in_parts)
    table_text = metrics_table({f"val_{k}": v for k, v in in_parts.items()})
    assert table_text.splitlines()[0].split() == ["R@1", "R@5", "R@10", "mAP@10", "MRR"]


def test_unknown_loss_is_rejected(text_dir: str) -> None:
    with pytest.raises(ValueError, match="unknown gpa.loss 'hinge'"):
        GPALoop(_cfg(text_dir, loss="hinge"))


# ---- under Ray Train ---------------------------------------------------------------------


def _one_step(loops: list[GPALoop], table: object, workers: int, tmp: Path) -> list[dict]:
    import ray.train
    from ray.train.torch import TorchTrainer

    out = tmp / f"steps_{workers}.pt"
    TorchTrainer(
        gpa_one_step_worker,
        train_loop_config={"loops": loops, "table": table, "out": str(out), "float64": True},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, resources_per_worker={"CPU": 0.5}
        ),
        run_config=ray.train.RunConfig(storage_path=str(tmp / "ray"), name=f"parity{workers}"),
    ).fit()
    return torch.load(out, weights_only=True)


@pytest.mark.slow
def test_two_workers_step_like_one_worker_on_the_global_batch(
    ray_session: None, text_dir: str, table: object, tmp_path: Path
) -> None:
    """2 workers x 4 pairs == 1 worker x 8 pairs with the gather, for NT-Xent and
    triplet-sum: the same loss, gradients and parameters after one Adam step (<= 1e-5);
    without the gather the losses differ. The text tower trains (dropout 0); the audio
    tower is frozen, so its BatchNorm uses running statistics, which do not depend on the
    batch split.

    The steps run in float64. In float32 the two runs agree only to float32 rounding of
    sums taken in another order (measured here: relative 3e-4 on a projection's gradient,
    the same gap as between float32 and float64 of ONE run), and Adam's first update
    lr * g / (|g| + eps) turns that noise into differences of up to 2 lr on elements whose
    gradient is ~0; in float64 the comparison is exact to ~1e-12."""
    variants = [(loss, gather) for loss in ("nt_xent", "triplet") for gather in (True, False)]
    loops = []
    for loss, gather in variants:
        cfg = _cfg(text_dir, loss=loss)
        train = dataclasses.replace(cfg.train, gather_negatives=gather)
        loops.append(GPALoop(dataclasses.replace(cfg, train=train)))
    seed_everything(loops[0].cfg.train.seed)
    initial = loops[0].build_model().double().state_dict()
    one = _one_step(loops, table, 1, tmp_path)
    two = _one_step(loops, table, 2, tmp_path)
    for (loss, gather), single, split in zip(variants, one, two, strict=True):
        gap = abs(single["loss"] - split["loss"])
        print(f"{loss} gather={gather}: 1x8 loss {single['loss']:.8f}, 2x4 {split['loss']:.8f}")
        if not gather:
            assert gap > 1e-3, loss
            continue
        assert gap <= 1e-5, loss
        assert single["grads"].keys() == split["grads"].keys() and single["grads"]
        for name, grad in single["grads"].items():
            torch.testing.assert_close(split["grads"][name], grad, atol=1e-10, rtol=1e-7)
        worst, moved = 0.0, 0
        for name, value in single["state"].items():
            worst = max(worst, float((split["state"][name] - value).abs().max()))
            moved += int((value != initial[name]).sum())
        print(f"{loss}: loss gap {gap:.1e}, largest parameter gap {worst:.1e}, {moved} moved")
        assert worst <= 1e-5 and moved > 0


@pytest.mark.slow
def test_train_gpa_job_on_real_esc50_clips(
    ray_session: None, shared_data: Path, tmp_path: Path
) -> None:
    """Ingest 20 real ESC-50 clips (2 s; folds 2-3 train, fold 4 val), then the job with
    the debug preset: loss goes down, the table is reported, the best checkpoint loads."""
    data = str(tmp_path / "ingest")
    assert (
        job_main("ingest")(
            [
                "--config",
                "debug",
                "corpus.kind=esc50",
                f"corpus.root={shared_data / 'esc50'}",
                "corpus.limit=20",
                "corpus.esc50_train_folds=[2,3]",
                "corpus.esc50_val_folds=[4]",
                "corpus.esc50_test_folds=[5]",
                f"ingest.output={data}",
                "ingest.max_seconds=2.0",
            ]
        )
        == 0
    )
    started = time.perf_counter()
    argv = [
        "--config",
        "debug",
        f"train.data={data}",
        f"train.storage_path={tmp_path / 'runs'}",
        "train.name=gpa",
        "train.epochs=4",
        "train.lr=1e-3",
        "gpa.loss=nt_xent",
        "gpa.caption_aug_share=0.2",
        "audio.max_seconds=2.0",
        "train.lr_schedule=plateau",
        "train.plateau_metric=val_t2a_R_sum",
        "train.plateau_patience=0",
        "train.checkpoint_metric=val_t2a_R_sum",
    ]
    assert job_main("train_gpa")(argv) == 0
    print(f"train_gpa debug: {time.perf_counter() - started:.1f} s")
    run = str(tmp_path / "runs" / "gpa")
    records = history.read(run)
    losses = [r["train_loss"] for r in records]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert all(0.0 <= r["val_t2a_R@1"] <= 1.0 for r in records)
    # ReduceLROnPlateau stepped on each epoch's validation R@1+R@5+R@10 (patience 0): the
    # recorded lr of every epoch is what the rule gives for the epochs before it.
    for r in records:
        assert r["val_t2a_R_sum"] == pytest.approx(
            r["val_t2a_R@1"] + r["val_t2a_R@5"] + r["val_t2a_R@10"]
        )
    train_cfg = TrainConfig(
        lr=1e-3, lr_schedule="plateau", plateau_metric="val_t2a_R_sum", plateau_patience=0
    )
    replay = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = build_scheduler(replay, train_cfg)
    for r in records:
        assert r["lr"] == pytest.approx(replay.param_groups[0]["lr"])
        advance(scheduler, r, train_cfg)
    summary = json.loads(storage.read_bytes(storage.join(run, "summary.json")))
    assert summary["best_checkpoint"] and summary["epochs"] == 4
    model, cfg = load_gpa(run)
    assert cfg.gpa.loss == "nt_xent" and not model.training


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("GPA_RAY_REAL_RUNS") != "1", reason="the ~10 minute real-data run"
)
def test_esc50_real_data_run(ray_session: None, shared_data: Path, tmp_path: Path) -> None:
    """The esc50_gpa preset on all ESC-50 clips here: whole source recordings held out per
    category (`esc50_holdout_captions`), frozen pretrained aiSFX + frozen MiniLM;
    training takes at most 10 minutes and reaches a T2A R@1 far above chance (1 / number of
    held-out clips). `GPA_RAY_ESC50_INGEST` reuses an existing ingest output."""
    esc50 = shared_data / "esc50"
    data = os.environ.get("GPA_RAY_ESC50_INGEST") or str(tmp_path / "ingest")
    captions = esc50_holdout_captions(esc50, tmp_path / "captions.csv")
    corpus = ["--config", "esc50_gpa", f"corpus.root={esc50}", f"corpus.caption_files=[{captions}]"]
    if not storage.exists(storage.join(data, "summary.json")):
        assert job_main("ingest")([*corpus, f"ingest.output={data}"]) == 0
    runs = str(tmp_path / "runs")
    started = time.perf_counter()
    argv = ["--config", "esc50_gpa", f"train.data={data}", f"train.storage_path={runs}"]
    assert job_main("train_gpa")(argv) == 0
    seconds = time.perf_counter() - started
    records = history.read(storage.join(runs, "esc50_gpa"))
    n_val = len(storage.read_parquet(storage.join(data, "clips", "esc50", "val")))
    best = max(r["val_t2a_R@1"] for r in records)
    print(f"{seconds:.0f} s, {n_val} held-out clips (chance R@1 {1 / n_val:.4f}), best {best}")
    assert seconds < 600 and best > 10 / n_val

"""Training plumbing without a training run: configs, clipping, seeds, metrics.

End-to-end runs (resume on S3, a worker that dies, each job) are in
`test_audioformer_jobs.py`, checkpoint files and their resolution in
`tests/test_checkpoints.py`; these tests are the pieces, each checked against numbers
worked out by hand.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from torch import nn

from gpa_ray import storage
from gpa_ray.config_loading import load_config
from gpa_ray.data.loaders import LabelSpace
from gpa_ray.train import history
from gpa_ray.train.audioformer_loops import FT1Loop, MLMLoop
from gpa_ray.train.loop import gather_rows, strided, sum_across_workers
from gpa_ray.train.trainer import build_trainer, checkpoint_metric, run_uri
from gpa_ray.train.worker import FAULT_MARKER, clip_gradients, epoch_seed, maybe_fail


def test_clip_gradients_per_parameter_group() -> None:
    a = nn.Parameter(torch.zeros(2))
    b = nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([3.0, 4.0])  # norm 5 -> scaled by 1/5
    b.grad = torch.tensor([0.3, 0.4])  # norm 0.5 -> untouched
    optimizer = torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=1.0)
    norms = clip_gradients(optimizer, max_norm=1.0)
    assert norms == pytest.approx([5.0, 0.5])
    assert a.grad.tolist() == pytest.approx([0.6, 0.8], abs=1e-6)
    # A global clip would have scaled b by 1/sqrt(25.25) too; per group it keeps its own.
    assert b.grad.tolist() == pytest.approx([0.3, 0.4])


def test_epoch_seed_differs_per_rank_and_epoch_and_is_stable() -> None:
    seeds = {epoch_seed(0, rank, epoch) for rank in range(4) for epoch in range(10)}
    assert len(seeds) == 40
    assert epoch_seed(3, 1, 2) == epoch_seed(3, 1, 2) == (3 * 1_000_003 + 2 * 10_007 + 1)


def test_strided_shares_are_disjoint_and_exhaustive() -> None:
    batches = [{"i": i} for i in range(7)]
    shares = [[b["i"] for b in strided(iter(batches), r, 3)] for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]


def test_single_process_collectives_are_identities() -> None:
    x = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(gather_rows(x), x)
    assert torch.equal(sum_across_workers(x), x)


def test_history_files_and_plot(tmp_path: Path) -> None:
    records = [
        {"epoch": 1, "step": 4, "lr": 0.1, "train_loss": 2.0, "val_loss": 2.5, "val_acc_c0": 0.1},
        {"epoch": 2, "step": 8, "lr": 0.1, "train_loss": 1.0, "val_loss": 2.0, "val_acc_c0": 0.3},
    ]
    assert history.curves(records)["train_loss"] == [(1, 2.0), (2, 1.0)]
    assert "lr" not in history.curves(records)
    assert history.panel_of("val_mlm_accuracy_c3") == "mlm_accuracy"
    assert history.panel_of("train_loss") == "loss"
    run = str(tmp_path / "run")
    history.write(run, records, "title")
    assert history.read(run) == records
    png = (tmp_path / "run" / history.PLOT_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert history.read(str(tmp_path / "missing")) == []


def test_fault_drill_fires_only_once_per_run(tmp_path: Path) -> None:
    cfg = load_config("debug", ["train.fail_at_step=3"])
    run = str(tmp_path / "run")
    loop = MLMLoop(cfg)
    # Other steps, other ranks: no exit (an exit would end this test process).
    maybe_fail(loop, run, step=2, rank=0)
    maybe_fail(loop, run, step=3, rank=1)
    storage.write_bytes(storage.join(run, FAULT_MARKER), b"step 3\n")
    maybe_fail(loop, run, step=3, rank=0)  # already fired in this run: passes


def test_checkpoint_metric_choice() -> None:
    space = LabelSpace(labels=("a", "b"), multi_label=False)
    ft1 = FT1Loop(load_config("debug", ["audioformer.classification_loss=ce"]), space)
    assert checkpoint_metric(ft1, has_val=True) == ("val_accuracy", "max")
    assert checkpoint_metric(ft1, has_val=False) == ("train_loss", "min")
    multi = FT1Loop(load_config("debug"), LabelSpace(labels=("a",), multi_label=True))
    assert checkpoint_metric(multi, has_val=True) == ("val_mAP", "max")
    custom = MLMLoop(load_config("debug", ["train.checkpoint_metric=val_loss"]))
    assert checkpoint_metric(custom, has_val=True) == ("val_loss", "min")
    with pytest.raises(ValueError, match="single-label"):
        FT1Loop(load_config("debug", ["audioformer.classification_loss=ce"]), multi.label_space)


@pytest.mark.s3
def test_build_trainer_maps_the_config(ray_session: None, s3_server: object) -> None:
    import ray
    import ray.train

    cfg = load_config(
        "debug",
        [
            f"train.storage_path={s3_server.uri('runs')}",
            "train.name=mapped",
            "train.num_workers=2",
            "train.cpus_per_worker=0.5",
            "train.max_failures=3",
            "train.checkpoints_to_keep=2",
            *s3_server.overrides(),
        ],
    )
    loop = MLMLoop(cfg)
    trainer = build_trainer(loop, {"train": ray.data.range(4), "val": ray.data.range(2)})
    scaling, run = trainer.scaling_config, trainer.run_config
    assert scaling.num_workers == 2 and not scaling.use_gpu
    assert scaling.resources_per_worker == {"CPU": 0.5}
    # s3://bucket/runs becomes bucket/runs on the configured endpoint's filesystem.
    assert run.storage_path == f"{s3_server.bucket}/runs" and run.name == "mapped"
    assert isinstance(run.storage_filesystem, pafs.S3FileSystem)
    assert run.failure_config.max_failures == 3
    ckpt = run.checkpoint_config
    assert (ckpt.num_to_keep, ckpt.checkpoint_score_attribute) == (2, "val_mlm_accuracy")
    assert ckpt.checkpoint_score_order == "max"
    assert run_uri(cfg) == s3_server.uri("runs", "mapped")
    assert isinstance(run, ray.train.RunConfig)


def tiny_cfg(*overrides: str) -> object:
    return load_config(
        "debug",
        [
            "audioformer.hidden_size=16",
            "audioformer.num_layers=1",
            "audioformer.num_heads=2",
            "audioformer.intermediate_size=32",
            "audioformer.max_positions=16",
            "audioformer.dropout=0.0",
            *overrides,
        ],
    )


def token_batch(n_clips: int = 3, n_q: int = 4, frames: int = 6) -> dict:
    from gpa_ray.data.loaders import pad_token_ids

    gen = torch.Generator().manual_seed(0)
    codes = [
        torch.randint(0, 1024, (n_q, frames - i), generator=gen).numpy() for i in range(n_clips)
    ]
    ids, mask = pad_token_ids(codes, list(range(n_q)), max_len=16)
    return {"input_ids": ids, "attention_mask": mask, "targets": torch.tensor([0, 1, 0])}


def test_mlm_loop_step_and_evaluate_single_process() -> None:
    torch.manual_seed(0)
    loop = MLMLoop(tiny_cfg("audioformer.mask_prob=0.5"))
    model = loop.build_model()
    batch = token_batch()
    loss, logs = loop.train_step(model, batch, torch.Generator().manual_seed(1))
    # The back-propagated loss sums the 4 codebook models' losses; the log is their mean.
    assert float(loss.detach()) == pytest.approx(4 * logs["loss"], rel=1e-6)
    assert len(loop.build_optimizer(model).param_groups) == 4
    model.eval()
    with torch.no_grad():
        metrics = loop.evaluate(model, [batch])
        # The same numbers by hand: re-mask with the evaluation seed, count argmax hits.
        from gpa_ray.models.audioformer import mask_tokens

        gen = torch.Generator().manual_seed(1234)
        ids, labels = mask_tokens(batch["input_ids"], 0.5, gen)
        hits = masked = 0
        for q in range(4):
            sub = model.models[f"c{q}"]
            logits = sub(ids[:, q], batch["attention_mask"][:, q]).logits
            sel = labels[:, q] != -100
            hits += int((logits.argmax(-1)[sel] == labels[:, q][sel]).sum())
            masked += int(sel.sum())
    assert metrics["mlm_accuracy"] == pytest.approx(hits / masked)


def test_ft2_step_equals_library_loss_on_one_process() -> None:
    from gpa_ray.losses import ft2_loss
    from gpa_ray.train.audioformer_loops import FT2Loop

    cfg = tiny_cfg("audioformer.classification_loss=ce")
    loop = FT2Loop(cfg, LabelSpace(labels=("a", "b"), multi_label=False))
    torch.manual_seed(0)
    model = loop.build_model()
    batch = token_batch()
    batch["clip_keys"] = torch.tensor([5, 6, 5])  # items 0 and 2: one clip drawn twice
    loss, logs = loop.train_step(model, batch, torch.Generator())
    out = model(batch["input_ids"], batch["attention_mask"])
    expected = ft2_loss(
        out.logits, batch["targets"], out.views, 0.95, 0.05, "ce", batch["clip_keys"]
    )
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    unaware = ft2_loss(out.logits, batch["targets"], out.views, 0.95, 0.05, "ce")
    assert abs(float(loss.detach()) - float(unaware.detach())) > 1e-6
    assert logs["loss"] == pytest.approx(0.95 * logs["mlc"] + 0.05 * logs["mpc"], rel=1e-5)


def test_early_stopping_rule() -> None:
    from gpa_ray.train.early_stopping import epochs_since_best, should_stop

    maps = [0.2, 0.3, 0.3, 0.25, 0.31, 0.1, float("nan")]
    records = [{"epoch": i + 1, "val_mAP": v} for i, v in enumerate(maps)]
    # Best so far after each epoch: 0.2, 0.3, 0.3 (a tie is no gain), 0.3, 0.31, 0.31, 0.31.
    since = [epochs_since_best(records[: n + 1], "val_mAP", "max") for n in range(len(maps))]
    assert since == [0, 0, 1, 2, 0, 1, 2]
    assert [should_stop(records[: n + 1], "val_mAP", "max", 2) for n in range(7)] == [
        False,
        False,
        False,
        True,
        False,
        False,
        True,
    ]
    assert not should_stop(records, "val_mAP", "max", 0)  # 0: off
    assert not should_stop([], "val_mAP", "max", 1)
    losses = [{"val_loss": v} for v in (1.0, 0.5, 0.7)]
    assert epochs_since_best(losses, "val_loss", "min") == 1
    assert epochs_since_best([{"other": 1.0}], "val_mAP", "max") == 1  # absent: no gain
    with pytest.raises(ValueError, match="mode"):
        epochs_since_best(records, "val_mAP", "best")


def test_early_stopping_needs_a_validation_split(ray_session: None) -> None:
    import ray

    cfg = load_config("debug", ["train.early_stopping_patience=2"])
    with pytest.raises(ValueError, match="early_stopping_patience=2 needs a validation split"):
        build_trainer(MLMLoop(cfg), {"train": ray.data.range(4)})
    trainer = build_trainer(MLMLoop(cfg), {"train": ray.data.range(4), "val": ray.data.range(2)})
    assert trainer.train_loop_config["stop_metric"] == ("val_mlm_accuracy", "max")

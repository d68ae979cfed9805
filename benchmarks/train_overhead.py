"""Training step time: one Ray Train worker vs a plain PyTorch loop, same model and batches.

    python benchmarks/train_overhead.py [--clips 64] [--seconds 5] [--batch 8] \
        [--hidden 128] [--layers 2] [--epochs 3] [--out benchmarks/results]

Both sides train the same AudioFormer MLM task (`MLMLoop`: one RoFormer per codebook,
masking, loss, Adam, per-group clipping) for the same epochs over the same clips in the
same order (no shuffling), on one torch thread:

(a) plain: the shard is read with pyarrow and collated once by the very collate function
    the workers use; the loop is `train_step`, backward, clip, step, nothing else;
(b) Ray Train: `gpa_ray.train.trainer.fit` with one worker at 0.5 CPU on an embedded
    local Ray: Ray Data streams and collates the batches, the generic worker runs the
    step, and checkpoints/metrics are written after each epoch.

Step time is the training wall time of epochs 2.. divided by their steps (epoch 1 warms
up: worker start, first Ray Data execution). For (b) it comes from the run's own
`train_seconds` records, so it excludes evaluation and the per-epoch checkpoint (there
is no validation split here). (a) runs before and after (b), and their mean is used.
Each epoch of (b) starts a new streaming execution of the shard, so its first batch
waits for Ray Data to start: that per-epoch wait is reported on its own (the run records
`first_batch_seconds`), with the step time after it beside the plain one.
CPU time per step (the training process's, all its threads) is reported beside it: on
a machine shared with other work, wall time measures the neighbours as much as us.
The clips carry seeded random EnCodec codes: the model's cost does not depend on which
codes it reads. Results are printed and written to `<out>/train_overhead.json`, with the
load average, since other work on a shared machine competes for the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gpa_ray.config import Config
from gpa_ray.config_loading import load_config
from gpa_ray.data import schema
from gpa_ray.jobs_cli import init_ray
from gpa_ray.testing.services import loopback_ray_env
from gpa_ray.train.audioformer_loops import MLMLoop
from gpa_ray.train.trainer import fit
from gpa_ray.train.worker import clip_gradients, epoch_seed, seed_everything


def write_clips(root: Path, n_clips: int, seconds: float, seed: int = 0) -> None:
    """One train shard of `n_clips` clips with seeded random codes [4, 75 * seconds]."""
    rng = np.random.default_rng(seed)
    frames = int(round(75 * seconds))
    codes = [rng.integers(0, 1024, size=(4, frames), dtype=np.int16) for _ in range(n_clips)]
    columns: dict[str, Any] = {
        "clip_id": [f"bench/{i:05d}" for i in range(n_clips)],
        "corpus": ["bench"] * n_clips,
        "split": ["train"] * n_clips,
        "source_uri": [""] * n_clips,
        "start_s": [0.0] * n_clips,
        "duration_s": [seconds] * n_clips,
        "captions": [["noise"]] * n_clips,
        "labels": [["noise"]] * n_clips,
        "n_samples": [int(24000 * seconds)] * n_clips,
        "sample_rate": [24000] * n_clips,
        "codes": schema.codes_array(codes),
        "audio": [None] * n_clips,
        "audio_sample_rate": [None] * n_clips,
    }
    table = pa.Table.from_pydict(columns, schema=schema.CLIP_SCHEMA)
    folder = root / "clips" / "bench" / "train"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "part-000000.parquet")


def plain_loop(cfg: Config, data: Path) -> dict[str, float]:
    """The same task in this process without Ray; seconds per step of epochs 2.."""
    torch.set_num_threads(1)
    loop = MLMLoop(cfg)
    table = pq.read_table(data / "clips" / "bench" / "train", columns=list(loop.columns))
    collate = loop.collate_fn(True)
    size = cfg.train.batch_size
    batches = [collate(table.slice(i, size)) for i in range(0, table.num_rows, size)]
    seed_everything(cfg.train.seed)
    model = loop.build_model()
    optimizer = loop.build_optimizer(model)
    generator = torch.Generator()
    seconds, cpu_seconds, first_batch, steps = 0.0, 0.0, 0.0, 0
    for epoch in range(cfg.train.epochs):
        generator.manual_seed(epoch_seed(cfg.train.seed, 0, epoch))
        model.train()
        started, cpu_started = time.perf_counter(), time.process_time()
        for index, batch in enumerate(batches):
            if index == 0 and epoch > 0:
                first_batch += time.perf_counter() - started
            loss, _ = loop.train_step(model, batch, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(optimizer, cfg.train.grad_clip)
            optimizer.step()
        if epoch > 0:
            seconds += time.perf_counter() - started
            cpu_seconds += time.process_time() - cpu_started
            steps += len(batches)
    return {
        "seconds_per_step": seconds / steps,
        "seconds_per_step_after_first_batch": (seconds - first_batch) / steps,
        "cpu_seconds_per_step": cpu_seconds / steps,
        "steps_timed": steps,
    }


def ray_loop(cfg: Config) -> dict[str, float]:
    """One Ray Train worker; seconds per step of epochs 2.. from the run's records."""
    result = fit(MLMLoop(cfg))
    timed = result.history[1:]
    steps = sum(r["steps_per_epoch"] for r in timed)
    seconds = sum(r["train_seconds"] for r in timed)
    first_batch = sum(r["first_batch_seconds"] for r in timed)
    return {
        "seconds_per_step": seconds / steps,
        "seconds_per_step_after_first_batch": (seconds - first_batch) / steps,
        "first_batch_seconds_per_epoch": first_batch / len(timed),
        "cpu_seconds_per_step": sum(r["train_cpu_seconds"] for r in timed) / steps,
        "steps_timed": steps,
        "first_epoch_seconds": result.history[0]["train_seconds"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gpa_ray_train_bench_"))
    try:
        write_clips(work / "data", args.clips, args.seconds)
        cfg = load_config(
            "debug",
            [
                f"train.data={work / 'data'}",
                f"train.storage_path={work / 'runs'}",
                "train.name=bench",
                f"train.epochs={args.epochs}",
                f"train.batch_size={args.batch}",
                "train.num_workers=1",
                "train.cpus_per_worker=0.5",
                "train.shuffle_buffer=0",
                f"audioformer.hidden_size={args.hidden}",
                f"audioformer.num_layers={args.layers}",
                f"audioformer.num_heads={max(1, args.hidden // 32)}",
                f"audioformer.intermediate_size={args.hidden * 4}",
                f"audioformer.max_positions={int(75 * args.seconds) + 2}",
            ],
        )
        before = plain_loop(cfg, work / "data")
        loopback_ray_env()
        init_ray(cfg)
        ray_side = ray_loop(cfg)
        after = plain_loop(cfg, work / "data")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plain = (before["seconds_per_step"] + after["seconds_per_step"]) / 2
    key = "seconds_per_step_after_first_batch"
    plain_steady = (before[key] + after[key]) / 2
    plain_cpu = (before["cpu_seconds_per_step"] + after["cpu_seconds_per_step"]) / 2
    report = {
        "benchmark": "train_overhead",
        "task": "audioformer mlm, 4 codebooks",
        "settings": vars(args),
        "plain_seconds_per_step": plain,
        "plain_runs": [before, after],
        "ray_train": ray_side,
        "plain_cpu_seconds_per_step": plain_cpu,
        "ratio_ray_over_plain": ray_side["seconds_per_step"] / plain,
        "ratio_ray_over_plain_after_first_batch": ray_side[key] / plain_steady,
        "cpu_ratio_ray_over_plain": ray_side["cpu_seconds_per_step"] / plain_cpu,
        "load_average": os.getloadavg(),
    }
    print(json.dumps(report, indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_overhead.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

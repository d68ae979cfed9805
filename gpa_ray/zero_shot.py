"""Zero-shot classification as an evaluation: ESC-50 accuracy per fold, multi-label mAP.

Nothing is trained on the classes: each label becomes prompts through templates
(`zero_shot.templates`) and a clip's label scores are its GPA scores R against them
(`gpa_ray.api.GPA.label_scores`, the mean over templates). Single-label accuracy is the
argmax; mAP ranks the clips by each class's score.

ESC-50's protocol is 5-fold cross-validation; with no training each fold is only a test
set, so accuracy is reported per fold and as the unweighted mean over the folds that have
clips (as a 5-fold result is), beside the accuracy pooled over every clip. A fold absent
from the data (the shared subset holds fold 4 and a few clips of others) is reported with
0 clips and no accuracy, never as 0.

Average precision follows its definition: for one class, the mean over its positive clips
of the precision among the clips scored at least as high as that clip (so tied scores
share one precision: the step-wise AP without interpolation, as scikit-learn's
`average_precision_score`). mAP is the mean over the classes with at least one positive
(a class with none has no AP; they are counted in the summary).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpa_ray import storage
from gpa_ray.config import Config, StorageConfig, ZeroShotConfig

logger = logging.getLogger(__name__)

DATASETS = ("esc50", "labels_csv")
SUMMARY_FILE = "summary.json"
PREDICTIONS_FILE = "predictions.jsonl"
AUDIO_STEP = 64
"""Clips embedded per step (progress is logged after each)."""


class ZeroShotError(ValueError):
    """A zero-shot dataset or setting that cannot be evaluated; the message names it."""


@dataclass(frozen=True)
class LabelledClips:
    """Clips with their classes: `targets` [clips, classes] 0/1, `classes` the label ids,
    `names` the text each class is prompted with, `folds` each clip's fold (or None)."""

    uris: list[str]
    targets: np.ndarray
    classes: list[str]
    names: list[str]
    folds: list[int] | None


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP of one class: `scores` [N] ranks the clips, `positive` [N] marks the class's own
    (at least one). Ties share the precision at their score (see the module docstring)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if scores.shape != positive.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and positives {positive.shape} must be [N]")
    if not positive.any():
        raise ValueError("average precision needs at least one positive")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    order = np.argsort(-scores, kind="stable")
    ranked = -scores[order]
    hits = np.cumsum(positive[order])
    # Clips scored >= each clip's score: the end of its tie group in the ranking.
    at_least = np.searchsorted(ranked, ranked, side="right")
    precision = hits[at_least - 1] / at_least
    return float(precision[positive[order]].mean())


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """mAP of `scores` [clips, classes] against 0/1 `targets` of the same shape: the mean
    AP over the classes with a positive clip; `per_class` AP (None without positives)."""
    scores = np.asarray(scores)
    targets = np.asarray(targets)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(
            f"scores {scores.shape} and targets {targets.shape} must be [clips, classes]"
        )
    per_class: list[float | None] = []
    for c in range(scores.shape[1]):
        has = targets[:, c] > 0
        per_class.append(average_precision(scores[:, c], has) if has.any() else None)
    rated = [ap for ap in per_class if ap is not None]
    return {
        "map": float(np.mean(rated)) if rated else None,
        "classes_rated": len(rated),
        "classes_without_positives": len(per_class) - len(rated),
        "per_class": per_class,
    }


def fold_accuracy(
    predicted: np.ndarray, truth: np.ndarray, folds: Sequence[int], wanted: Sequence[int]
) -> dict[str, Any]:
    """Accuracy per fold of `wanted` (clips, correct, accuracy; None for an empty fold),
    their unweighted mean over folds with clips, and the accuracy pooled over all clips."""
    predicted, truth, fold_of = np.asarray(predicted), np.asarray(truth), np.asarray(folds)
    per_fold: dict[str, dict[str, Any]] = {}
    for fold in wanted:
        mine = fold_of == fold
        n = int(mine.sum())
        correct = int((predicted[mine] == truth[mine]).sum())
        per_fold[str(fold)] = {
            "clips": n,
            "correct": correct,
            "accuracy": correct / n if n else None,
        }
    present = [f["accuracy"] for f in per_fold.values() if f["accuracy"] is not None]
    return {
        "per_fold": per_fold,
        "folds_with_clips": len(present),
        "mean_fold_accuracy": float(np.mean(present)) if present else None,
        "pooled_accuracy": float((predicted == truth).mean()) if len(truth) else None,
    }


def _csv_rows(uri: str, storage_cfg: StorageConfig, needed: Sequence[str]) -> list[dict[str, str]]:
    try:
        text = storage.read_bytes(uri, storage_cfg).decode("utf-8-sig")
    except OSError as exc:
        raise ZeroShotError(f"cannot read {uri}: {exc}") from exc
    rows = list(csv.DictReader(io.StringIO(text)))
    missing = [c for c in needed if rows and c not in rows[0]]
    if not rows or missing:
        raise ZeroShotError(f"{uri}: needs columns {list(needed)} and rows; missing {missing}")
    return rows


def esc50_clips(cfg: ZeroShotConfig, storage_cfg: StorageConfig) -> LabelledClips:
    """The ESC-50 clips of `cfg.folds` listed in `<root>/meta/esc50.csv`; classes are every
    category the file lists, in target order."""
    if not cfg.root:
        raise ZeroShotError("zero_shot.root is empty: the ESC-50 folder (meta/esc50.csv, audio/)")
    meta = storage.join(cfg.root, "meta", "esc50.csv")
    rows = _csv_rows(meta, storage_cfg, ("filename", "fold", "target", "category"))
    by_target = {int(r["target"]): r["category"] for r in rows}
    classes = [by_target[t] for t in sorted(by_target)]
    index = {name: i for i, name in enumerate(classes)}
    chosen = [r for r in rows if int(r["fold"]) in set(cfg.folds)]
    if not chosen:
        raise ZeroShotError(f"{meta}: no clips in folds {cfg.folds}")
    targets = np.zeros((len(chosen), len(classes)), dtype=np.int8)
    for i, r in enumerate(chosen):
        targets[i, index[r["category"]]] = 1
    return LabelledClips(
        uris=[storage.join(cfg.root, "audio", r["filename"]) for r in chosen],
        targets=targets,
        classes=classes,
        names=list(classes),
        folds=[int(r["fold"]) for r in chosen],
    )


def labels_csv_clips(cfg: ZeroShotConfig, storage_cfg: StorageConfig) -> LabelledClips:
    """Multi-label clips of `cfg.labels_csv` (`file_name`, `labels`); the vocabulary and
    prompt names from `cfg.class_names` (AudioSet's index, mid, display_name) if given."""
    if not cfg.labels_csv:
        raise ZeroShotError("zero_shot.labels_csv is empty: a CSV of file_name,labels")
    rows = _csv_rows(cfg.labels_csv, storage_cfg, ("file_name", "labels"))
    clip_labels = [
        [x.strip() for x in r["labels"].split(cfg.label_separator) if x.strip()] for r in rows
    ]
    if cfg.class_names:
        vocab = _csv_rows(cfg.class_names, storage_cfg, ("mid", "display_name"))
        classes = [v["mid"] for v in vocab]
        names = [v["display_name"] for v in vocab]
    else:
        classes = sorted({label for labels in clip_labels for label in labels})
        names = list(classes)
    index = {c: i for i, c in enumerate(classes)}
    targets = np.zeros((len(rows), len(classes)), dtype=np.int8)
    for i, (r, labels) in enumerate(zip(rows, clip_labels, strict=True)):
        unknown = [label for label in labels if label not in index]
        if unknown:
            raise ZeroShotError(
                f"{cfg.labels_csv} row {i + 2} ({r['file_name']}): labels {unknown} are not "
                f"in {cfg.class_names or 'the vocabulary'}"
            )
        targets[i, [index[label] for label in labels]] = 1
    base = cfg.audio_dir or os.path.dirname(cfg.labels_csv)
    return LabelledClips(
        uris=[storage.join(base, r["file_name"]) for r in rows],
        targets=targets,
        classes=classes,
        names=names,
        folds=None,
    )


def load_clips(cfg: ZeroShotConfig, storage_cfg: StorageConfig) -> LabelledClips:
    if cfg.dataset == "esc50":
        return esc50_clips(cfg, storage_cfg)
    if cfg.dataset == "labels_csv":
        return labels_csv_clips(cfg, storage_cfg)
    raise ZeroShotError(f"zero_shot.dataset must be one of {DATASETS}, got {cfg.dataset!r}")


def clip_label_scores(model: Any, clips: LabelledClips, templates: Sequence[str]) -> np.ndarray:
    """R [clips, classes] (`GPA.label_scores`), the audio embedded `AUDIO_STEP` clips at a
    time and the prompts once."""
    from gpa_ray.models.gpa import Embeddings

    parts = []
    for start in range(0, len(clips.uris), AUDIO_STEP):
        parts.append(model.embed_audio(clips.uris[start : start + AUDIO_STEP]))
        logger.info(
            "zero-shot: embedded %d/%d clips", start + len(parts[-1].global_), len(clips.uris)
        )
    audio = Embeddings.cat(parts)
    return model.label_scores(audio, clips.names, list(templates))


def evaluate_scores(
    scores: np.ndarray, clips: LabelledClips, folds: Sequence[int]
) -> dict[str, Any]:
    """The metrics of label scores [clips, classes]: mAP always; for single-label data
    (one class per clip) top-1 accuracy, per fold when clips have folds."""
    found: dict[str, Any] = {"map": mean_average_precision(scores, clips.targets)}
    if np.all(clips.targets.sum(axis=1) == 1):
        predicted = scores.argmax(axis=1)
        truth = clips.targets.argmax(axis=1)
        if clips.folds is None:
            found["accuracy"] = {"pooled_accuracy": float((predicted == truth).mean())}
        else:
            found["accuracy"] = fold_accuracy(predicted, truth, clips.folds, folds)
    return found


def run_zero_shot(cfg: Config) -> dict[str, Any]:
    """Evaluate `zero_shot.checkpoint` as `cfg.zero_shot` says; write `<output>/summary.json`
    (figures, settings, the weights' digest) and `predictions.jsonl` (each clip's top 5)."""
    from gpa_ray.api import GPA

    zs = cfg.zero_shot
    if not zs.checkpoint:
        raise ZeroShotError("zero_shot.checkpoint is empty: a GPA checkpoint or run URI")
    if not zs.templates:
        raise ZeroShotError("zero_shot.templates is empty: give at least one '{label}' template")
    clips = load_clips(zs, cfg.storage)
    started = time.perf_counter()
    model = GPA.load(
        zs.checkpoint, device=zs.device or None, batch_size=zs.batch_size, storage_cfg=cfg.storage
    )
    scores = clip_label_scores(model, clips, zs.templates)
    took = time.perf_counter() - started
    summary: dict[str, Any] = {
        "checkpoint": model.checkpoint,
        "weights_sha256": model.digest,
        "dataset": zs.dataset,
        "data": zs.root if zs.dataset == "esc50" else zs.labels_csv,
        "templates": list(zs.templates),
        "clips": len(clips.uris),
        "classes": len(clips.classes),
        **evaluate_scores(scores, clips, zs.folds),
        "seconds": round(took, 1),
    }
    summary["map"]["per_class"] = dict(zip(clips.classes, summary["map"]["per_class"], strict=True))
    lines = []
    for uri, row, target in zip(clips.uris, scores, clips.targets, strict=True):
        top = np.argsort(-row, kind="stable")[:5]
        lines.append(
            json.dumps(
                {
                    "source_uri": uri,
                    "labels": [clips.classes[j] for j in np.flatnonzero(target)],
                    "top": {clips.classes[j]: float(row[j]) for j in top},
                }
            )
        )
    storage.write_bytes(
        storage.join(zs.output, PREDICTIONS_FILE), ("\n".join(lines) + "\n").encode(), cfg.storage
    )
    storage.write_bytes(
        storage.join(zs.output, SUMMARY_FILE), json.dumps(summary, indent=2).encode(), cfg.storage
    )
    return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """A few printable lines of a `run_zero_shot` summary."""
    lines = [
        f"{summary['clips']} clips, {summary['classes']} classes, templates {summary['templates']}"
    ]
    acc = summary.get("accuracy")
    if acc:
        for fold, f in acc.get("per_fold", {}).items():
            value = "-" if f["accuracy"] is None else f"{100 * f['accuracy']:.1f}%"
            lines.append(f"fold {fold}: {f['clips']} clips, accuracy {value}")
        if acc.get("mean_fold_accuracy") is not None:
            lines.append(
                f"mean over {acc['folds_with_clips']} folds "
                f"{100 * acc['mean_fold_accuracy']:.1f}%, "
                f"pooled {100 * acc['pooled_accuracy']:.1f}%"
            )
    m = summary["map"]
    if m["map"] is not None:
        lines.append(f"mAP {100 * m['map']:.1f} over {m['classes_rated']} classes")
    return lines

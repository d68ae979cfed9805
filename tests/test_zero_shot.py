"""Zero-shot evaluation (`gpa_ray.zero_shot`, `jobs/evaluate_zero_shot.py`): AP and mAP
pinned by hand-computed cases and a plain loop written from the definition, per-fold
accuracy, and the job on a tiny GPA and real ESC-50 clips against the Python API."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from gpa_ray import GPA
from gpa_ray.cli import TOOLS
from gpa_ray.jobs_cli import job_main, job_names
from gpa_ray.testing.data import esc50_records
from gpa_ray.testing.models import tiny_gpa_run
from gpa_ray.zero_shot import (
    ZeroShotError,
    average_precision,
    fold_accuracy,
    mean_average_precision,
)


def reference_ap(scores: list[float], positive: list[bool]) -> float:
    """AP from its definition: for each positive clip, the share of positives among the
    clips scored at least as high; the mean over positives."""
    precisions = []
    for i, is_pos in enumerate(positive):
        if not is_pos:
            continue
        above = [j for j in range(len(scores)) if scores[j] >= scores[i]]
        precisions.append(sum(1 for j in above if positive[j]) / len(above))
    return sum(precisions) / len(precisions)


@pytest.mark.parametrize(
    ("scores", "positive", "expected"),
    [
        ([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0], (1 / 1 + 2 / 3) / 2),
        ([0.6, 0.7, 0.8, 0.9], [1, 0, 1, 0], (1 / 2 + 2 / 4) / 2),
        ([0.9, 0.5, 0.5], [0, 1, 0], 1 / 3),
        # the tied pair at 0.5 holds one positive (1/2); the positive at 0.1 has 2 of 3
        ([0.5, 0.5, 0.1], [1, 0, 1], 7 / 12),
        ([0.3, 0.2, 0.1], [1, 1, 1], 1.0),
    ],
)
def test_average_precision_hand_computed(
    scores: list[float], positive: list[int], expected: float
) -> None:
    got = average_precision(np.array(scores), np.array(positive, dtype=bool))
    assert got == pytest.approx(expected, abs=1e-12)


def test_map_matches_the_reference_loop_with_ties_and_empty_classes() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(40, 7)).round(1)  # rounding makes many ties
    targets = (rng.random((40, 7)) < 0.3).astype(np.int8)
    targets[:, 3] = 0  # a class with no positive clip has no AP
    found = mean_average_precision(scores, targets)
    expected = [
        reference_ap(list(scores[:, c]), [bool(t) for t in targets[:, c]]) if c != 3 else None
        for c in range(7)
    ]
    assert found["per_class"][3] is None
    for got, want in zip(found["per_class"], expected, strict=True):
        assert (got is None and want is None) or got == pytest.approx(want, abs=1e-12)
    rated = [v for v in expected if v is not None]
    assert found["map"] == pytest.approx(sum(rated) / len(rated), abs=1e-12)
    assert (found["classes_rated"], found["classes_without_positives"]) == (6, 1)


def test_map_hand_computed_two_classes() -> None:
    scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.1, 0.8]])
    targets = np.array([[1, 0], [0, 1], [1, 0]])
    # class 0: positives ranked 1st and 3rd -> (1 + 2/3) / 2; class 1: ranked 2nd -> 1/2.
    found = mean_average_precision(scores, targets)
    assert found["map"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 2) / 2)


def test_average_precision_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one positive"):
        average_precision(np.array([0.1, 0.2]), np.array([False, False]))
    with pytest.raises(ValueError, match="finite"):
        average_precision(np.array([np.nan, 0.2]), np.array([True, False]))


def test_fold_accuracy_per_fold_mean_and_missing_folds() -> None:
    predicted = np.array([0, 1, 2, 2, 1, 0])
    truth = np.array([0, 1, 1, 2, 0, 0])
    folds = [1, 1, 1, 4, 4, 5]
    found = fold_accuracy(predicted, truth, folds, [1, 2, 3, 4, 5])
    per = found["per_fold"]
    assert per["1"] == {"clips": 3, "correct": 2, "accuracy": 2 / 3}
    assert per["2"] == {"clips": 0, "correct": 0, "accuracy": None}
    assert per["4"]["accuracy"] == 1 / 2 and per["5"]["accuracy"] == 1.0
    assert found["folds_with_clips"] == 3
    assert found["mean_fold_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert found["pooled_accuracy"] == pytest.approx(4 / 6)


def test_no_job_shadows_a_tool() -> None:
    # `gpa-ray <name>` runs a job when one has that name: a job named like a tool would
    # hide the tool.
    assert not {tool.replace("-", "_") for tool in TOOLS} & set(job_names())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_gpa_run(tmp_path_factory.mktemp("zs") / "runs" / "gpa")


@pytest.fixture(scope="module")
def esc50_subset(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ESC-50 folder of 10 real clips from each fold the shared copy has (2-5), with
    meta/esc50.csv listing exactly them."""
    root = tmp_path_factory.mktemp("esc50")
    records = esc50_records(shared_data / "esc50")
    per_fold = {"2": 3, "3": 1, "4": 4, "5": 2}  # the shared copy has no fold 1
    chosen: list[dict[str, str]] = []
    for fold, n in per_fold.items():
        chosen += [r for r in records if r["fold"] == fold][:n]
    (root / "meta").mkdir()
    (root / "audio").symlink_to(shared_data / "esc50" / "audio")
    with open(root / "meta" / "esc50.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(chosen)
    return root


def test_job_on_real_esc50_clips_matches_the_api(
    tiny_run: str, esc50_subset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "zs"
    templates = ["this is a sound of {label}", "a {label} can be heard"]
    rc = job_main("evaluate_zero_shot")(
        [
            f"zero_shot.checkpoint={tiny_run}",
            f"zero_shot.root={esc50_subset}",
            f"zero_shot.output={out}",
            "zero_shot.batch_size=4",
            f"zero_shot.templates={json.dumps(templates)}",
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    records = esc50_records(esc50_subset)
    by_target = {int(r["target"]): r["category"] for r in records}  # the listed classes
    classes = [by_target[t] for t in sorted(by_target)]
    assert summary["clips"] == 10 and summary["classes"] == len(classes)

    # The same clips one by one through the API's zero_shot, and the accuracy by a loop.
    model = GPA.load(tiny_run, device="cpu", batch_size=4)
    correct: dict[str, list[bool]] = {}
    probs = []
    for rec in records:
        p = model.zero_shot(esc50_subset / "audio" / rec["filename"], classes, templates)[0]
        probs.append(p)
        correct.setdefault(rec["fold"], []).append(classes[int(p.argmax())] == rec["category"])
    for fold in "12345":
        got = summary["accuracy"]["per_fold"][fold]
        if fold not in correct:
            assert got == {"clips": 0, "correct": 0, "accuracy": None}
        else:
            assert got["clips"] == len(correct[fold])
            assert got["accuracy"] == pytest.approx(sum(correct[fold]) / len(correct[fold]))
    means = [sum(v) / len(v) for v in correct.values()]
    assert summary["accuracy"]["mean_fold_accuracy"] == pytest.approx(sum(means) / len(means))
    assert summary["accuracy"]["folds_with_clips"] == len(correct) == 4

    # mAP ranks clips by R; the softmax over labels keeps each clip's order, not the
    # clips' order within a class, so the reference takes R from the API's score.
    scores = model.label_scores(
        [esc50_subset / "audio" / r["filename"] for r in records], classes, templates
    )
    expected = []
    for c, name in enumerate(classes):
        positive = [r["category"] == name for r in records]
        expected.append(reference_ap(list(scores[:, c]), positive))
    assert summary["map"]["map"] == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 10 and json.loads(lines[0])["labels"] == [records[0]["category"]]


def test_multi_label_csv_with_audioset_class_names(
    tiny_run: str, shared_data: Path, tmp_path: Path
) -> None:
    audio = shared_data / "esc50" / "audio"
    files = [r["filename"] for r in esc50_records(shared_data / "esc50")[:6]]
    labels = ["/m/dog,/m/rain", "/m/rain", "/m/bell,/m/dog", "/m/dog", "/m/bell", "/m/rain,/m/bell"]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "labels"])
        writer.writerows(zip(files, labels, strict=True))
    vocab = [("/m/dog", "Dog"), ("/m/rain", "Rain"), ("/m/bell", "Church bell"), ("/m/x", "X")]
    with open(tmp_path / "classes.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "mid", "display_name"])
        writer.writerows((i, mid, name) for i, (mid, name) in enumerate(vocab))
    out = tmp_path / "out"
    job_main("evaluate_zero_shot")(
        [
            f"zero_shot.checkpoint={tiny_run}",
            "zero_shot.dataset=labels_csv",
            f"zero_shot.labels_csv={tmp_path / 'labels.csv'}",
            f"zero_shot.class_names={tmp_path / 'classes.csv'}",
            f"zero_shot.audio_dir={audio}",
            f"zero_shot.output={out}",
            "zero_shot.batch_size=4",
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert "accuracy" not in summary  # several labels a clip: mAP only
    model = GPA.load(tiny_run, device="cpu", batch_size=4)
    scores = model.label_scores(
        [audio / f for f in files], [name for _, name in vocab], "this is a sound of {label}"
    )
    per_class = summary["map"]["per_class"]
    assert per_class["/m/x"] is None  # no clip has it
    expected = []
    for c, (mid, _) in enumerate(vocab[:3]):
        ap = reference_ap(list(scores[:, c]), [mid in row.split(",") for row in labels])
        assert per_class[mid] == pytest.approx(ap, abs=1e-6)
        expected.append(ap)
    assert summary["map"]["map"] == pytest.approx(sum(expected) / 3, abs=1e-6)


def test_clear_errors(tiny_run: str, tmp_path: Path) -> None:
    run = job_main("evaluate_zero_shot")
    with pytest.raises(ZeroShotError, match="zero_shot.checkpoint is empty"):
        run([f"zero_shot.root={tmp_path}"])
    with pytest.raises(ZeroShotError, match="zero_shot.dataset must be one of"):
        run([f"zero_shot.checkpoint={tiny_run}", "zero_shot.dataset=imagenet"])
    (tmp_path / "labels.csv").write_text("file_name,labels\na.wav,/m/dog\nb.wav,/m/cat\n")
    (tmp_path / "classes.csv").write_text("index,mid,display_name\n0,/m/dog,Dog\n")
    with pytest.raises(ZeroShotError, match=r"row 3 \(b.wav\): labels \['/m/cat'\]"):
        run(
            [
                f"zero_shot.checkpoint={tiny_run}",
                "zero_shot.dataset=labels_csv",
                f"zero_shot.labels_csv={tmp_path / 'labels.csv'}",
                f"zero_shot.class_names={tmp_path / 'classes.csv'}",
            ]
        )

"""Retrieval and classification metrics against hand-worked ranks and plain Python loops."""

from __future__ import annotations

import pytest
import torch

from gpa_ray.metrics import (
    accuracy,
    audio_to_text_metrics,
    audio_to_text_ranks,
    average_precision_per_class,
    classification_metrics,
    clip_major_caption_to_clip,
    mean_average_precision,
    retrieval_metrics,
    text_to_audio_metrics,
    text_to_audio_ranks,
)

# 3 clips x 6 captions, 2 captions per clip stored clip-major (clip i owns 2i, 2i+1).
SCORES = torch.tensor(
    [
        [0.9, 0.3, 0.2, 0.1, 0.6, 0.0],
        [0.2, 0.5, 0.2, 0.8, 0.7, 0.1],
        [0.2, 0.95, 0.1, 0.0, 0.5, 0.9],
    ]
)


def test_clip_major_index() -> None:
    assert clip_major_caption_to_clip(3, 2).tolist() == [0, 0, 1, 1, 2, 2]


def test_t2a_ranks_by_hand() -> None:
    # Caption columns over clips: c0 [.9,.2,.2] -> 1; c1 [.3,.5,.95] -> 3;
    # c2 [.2,.2,.1] relevant clip 1 ties clip 0 -> 2 (ties count against the query);
    # c3 [.1,.8,0] -> 1; c4 [.6,.7,.5] -> 3; c5 [0,.1,.9] -> 1.
    ranks = text_to_audio_ranks(SCORES.T, clip_major_caption_to_clip(3, 2))
    assert ranks.tolist() == [1, 3, 2, 1, 3, 1]


def test_a2t_ranks_by_hand() -> None:
    # Clip 0: relevant (.9, .3); non-relevant >= .9: none -> 1; >= .3: {.6} -> 2 + 1 = 3.
    # Clip 1: relevant (.8, .2); >= .8: none -> 1; >= .2: {.2 tie, .5, .7} -> 2 + 3 = 5.
    # Clip 2: relevant (.9, .5); >= .9: {.95} -> 2; >= .5: {.95} -> 2 + 1 = 3.
    ranks, valid = audio_to_text_ranks(SCORES, clip_major_caption_to_clip(3, 2))
    assert ranks.tolist() == [[1, 3], [1, 5], [2, 3]]
    assert valid.all()


def test_metrics_by_hand() -> None:
    m = retrieval_metrics(SCORES, n_caps=2, ks=(1, 2, 5))
    # T2A ranks [1,3,2,1,3,1]: R@1 = 3/6, R@2 = 4/6, R@5 = 1;
    # mAP@10 = MRR = (1 + 1/3 + 1/2 + 1 + 1/3 + 1) / 6 = 0.6944444.
    assert m["t2a_R@1"] == pytest.approx(0.5)
    assert m["t2a_R@2"] == pytest.approx(4 / 6)
    assert m["t2a_R@5"] == pytest.approx(1.0)
    assert m["t2a_mAP@10"] == pytest.approx(25 / 36)
    assert m["t2a_MRR"] == pytest.approx(25 / 36)
    # A2T first ranks [1,1,2]: R@1 = 2/3, R@2 = 1, MRR = (1 + 1 + 1/2) / 3.
    # AP@10: clip0 (1/1 + 2/3)/2 = .833333, clip1 (1/1 + 2/5)/2 = .7,
    # clip2 (1/2 + 2/3)/2 = .583333 -> mean 0.7055556.
    assert m["a2t_R@1"] == pytest.approx(2 / 3)
    assert m["a2t_R@2"] == pytest.approx(1.0)
    assert m["a2t_MRR"] == pytest.approx(2.5 / 3)
    assert m["a2t_mAP@10"] == pytest.approx((5 / 6 + 0.7 + 7 / 12) / 3)
    # With cutoff 2: T2A (1 + 0 + 1/2 + 1 + 0 + 1)/6; A2T clip0 (1)/2, clip1 (1)/2,
    # clip2 (1/2)/2 -> mean 1.25/3.
    cut = retrieval_metrics(SCORES, n_caps=2, cutoff=2)
    assert cut["t2a_mAP@2"] == pytest.approx(3.5 / 6)
    assert cut["a2t_mAP@2"] == pytest.approx(1.25 / 3)
    assert set(retrieval_metrics(SCORES, n_caps=2)) == {
        f"{d}_{k}" for d in ("t2a", "a2t") for k in ("R@1", "R@5", "R@10", "mAP@10", "MRR")
    }


def test_constant_scores_get_the_worst_ranks() -> None:
    # Every tie counts against the query: 3 clips -> every T2A rank is 3; A2T: 4
    # non-relevant captions tie with both relevant ones -> ranks 1 + 4 and 2 + 4.
    flat = torch.zeros(3, 6)
    assert text_to_audio_ranks(flat.T, clip_major_caption_to_clip(3, 2)).tolist() == [3] * 6
    ranks, _ = audio_to_text_ranks(flat, clip_major_caption_to_clip(3, 2))
    assert ranks.tolist() == [[5, 6]] * 3
    m = retrieval_metrics(flat, n_caps=2)
    assert m["t2a_R@1"] == 0.0 and m["a2t_R@1"] == 0.0


def loop_t2a(scores: list[list[float]], target: list[int], cutoff: int = 10) -> dict:
    """T2A by explicit loops over caption rows [n_captions][n_clips]."""
    ranks = []
    for row, clip in zip(scores, target, strict=True):
        ranks.append(1 + sum(1 for j, s in enumerate(row) if j != clip and s >= row[clip]))
    n = len(ranks)
    out = {f"t2a_R@{k}": sum(r <= k for r in ranks) / n for k in (1, 5, 10)}
    out[f"t2a_mAP@{cutoff}"] = sum(1 / r for r in ranks if r <= cutoff) / n
    out["t2a_MRR"] = sum(1 / r for r in ranks) / n
    return out


def loop_a2t(scores: list[list[float]], target: list[int], cutoff: int = 10) -> dict:
    """A2T by explicit loops over clip rows [n_clips][n_captions]."""
    first, aps = [], []
    for clip, row in enumerate(scores):
        rel = [p for p, c in enumerate(target) if c == clip]
        if not rel:
            continue
        rel_scores = sorted((row[p] for p in rel), reverse=True)
        ranks = []
        for k, s in enumerate(rel_scores, start=1):
            ranks.append(k + sum(1 for j, v in enumerate(row) if j not in rel and v >= s))
        first.append(ranks[0])
        aps.append(sum(k / r for k, r in enumerate(ranks, start=1) if r <= cutoff) / len(rel))
    n = len(first)
    out = {f"a2t_R@{k}": sum(r <= k for r in first) / n for k in (1, 5, 10)}
    out[f"a2t_mAP@{cutoff}"] = sum(aps) / n
    out["a2t_MRR"] = sum(1 / r for r in first) / n
    return out


def test_random_50x250_matches_python_loops() -> None:
    torch.manual_seed(0)
    # Scores on a coarse grid so that ties are frequent and the tie rule is exercised.
    scores = torch.randint(0, 12, (50, 250)).double() / 12
    target = clip_major_caption_to_clip(50, 5)
    expected = loop_t2a(scores.T.tolist(), target.tolist())
    expected.update(loop_a2t(scores.tolist(), target.tolist()))
    got = retrieval_metrics(scores, n_caps=5, block_size=16)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_uneven_caption_to_clip_matches_loops() -> None:
    # 30 clips, 100 captions with a random clip each; some clips have no caption (they stay
    # in the T2A gallery but are not A2T queries).
    torch.manual_seed(1)
    target = torch.randint(0, 27, (100,))
    scores = torch.randint(0, 8, (30, 100)).double() / 8
    expected = loop_t2a(scores.T.tolist(), target.tolist())
    expected.update(loop_a2t(scores.tolist(), target.tolist()))
    got = retrieval_metrics(scores, caption_to_clip=target, block_size=7)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_blockwise_and_callable_equal_full() -> None:
    torch.manual_seed(2)
    scores = torch.randn(40, 200)
    target = clip_major_caption_to_clip(40, 5)
    full_t2a = text_to_audio_metrics(scores.T, target, block_size=10_000)
    full_a2t = audio_to_text_metrics(scores, target, block_size=10_000)
    calls: list[slice] = []

    def caption_rows(rows: slice) -> torch.Tensor:
        calls.append(rows)
        return scores.T[rows].clone()

    assert text_to_audio_metrics(caption_rows, target, block_size=9) == full_t2a
    assert len(calls) == 23 and all(r.stop - r.start <= 9 for r in calls)
    assert audio_to_text_metrics(lambda rows: scores[rows], target, block_size=3) == full_a2t
    assert audio_to_text_metrics(scores, target, block_size=1) == full_a2t


def test_text_bias_applies_to_a2t_only() -> None:
    bias = torch.tensor([0.0, -1.0, 0.0, 0.0, 0.0, 0.0])
    plain = retrieval_metrics(SCORES, n_caps=2)
    biased = retrieval_metrics(SCORES, n_caps=2, text_bias=bias)
    target = clip_major_caption_to_clip(3, 2)
    assert {k: v for k, v in biased.items() if k.startswith("t2a")} == {
        k: v for k, v in plain.items() if k.startswith("t2a")
    }
    assert biased["a2t_mAP@10"] == audio_to_text_metrics(SCORES + bias, target)["a2t_mAP@10"]
    # Penalising the hub caption 1 (.95 for clip 2) lifts clip 2's first caption to rank 1.
    assert biased["a2t_R@1"] == pytest.approx(1.0)


def test_shape_mismatch_is_reported() -> None:
    with pytest.raises(ValueError, match="caption_to_clip"):
        retrieval_metrics(torch.zeros(3, 7), n_caps=2)


def loop_average_precision(scores: list[float], labels: list[int]) -> float:
    """AP of one class with the pessimistic tie rule, by explicit loops."""
    pos = sorted((s for s, y in zip(scores, labels, strict=True) if y), reverse=True)
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    total = 0.0
    for k, s in enumerate(pos, start=1):
        total += k / (k + sum(1 for v in neg if v >= s))
    return total / len(pos)


def test_classification_map_by_hand() -> None:
    # Class 0: scores .9 .8 .7 .6, labels 1 0 1 0 -> (1/1 + 2/3)/2 = 0.833333.
    # Class 1: no positive -> left out of the macro average.
    # Class 2: the positive ties a negative at .5 -> rank 2 -> AP 0.5.
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.2, 0.5], [0.7, 0.3, 0.1], [0.6, 0.4, 0.2]])
    targets = torch.tensor([[1, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0]])
    ap = average_precision_per_class(scores, targets)
    assert ap[0].item() == pytest.approx(5 / 6) and ap[2].item() == pytest.approx(0.5)
    assert torch.isnan(ap[1])
    assert mean_average_precision(scores, targets) == pytest.approx((5 / 6 + 0.5) / 2)
    assert classification_metrics(scores, targets) == {"mAP": pytest.approx((5 / 6 + 0.5) / 2)}


def test_classification_map_matches_loop() -> None:
    torch.manual_seed(3)
    scores = torch.randint(0, 6, (60, 8)).double()
    targets = (torch.rand(60, 8) < 0.3).long()
    ap = average_precision_per_class(scores, targets)
    for c in range(8):
        col = targets[:, c].tolist()
        if any(col):
            expected = loop_average_precision(scores[:, c].tolist(), col)
            assert ap[c].item() == pytest.approx(expected, abs=1e-12)


def test_accuracy_and_single_label_metrics() -> None:
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = torch.tensor([1, 0, 0, 0])
    # argmax = [1, 0, 1, 0] vs [1, 0, 0, 0]: 3 of 4 correct.
    assert accuracy(scores, labels) == pytest.approx(0.75)
    m = classification_metrics(scores, labels)
    # Class 0 positives (rows 1,2,3) ranked by .8 .6 .3 against negative .1: AP 1.
    # Class 1 positive row 0 (.9) is first: AP 1.
    assert m == {"accuracy": pytest.approx(0.75), "mAP": pytest.approx(1.0)}

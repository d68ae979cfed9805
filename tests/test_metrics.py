"""Retrieval and classification metrics against hand-worked ranks and plain Python loops,
and against the DP baseline's evaluation code (argsort per query) on continuous scores."""

from __future__ import annotations

import itertools

import numpy as np
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
    per_query_metrics,
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
    # c2 [.2,.2,.1] relevant clip 1 ties clip 0 -> 2 pessimistic, 1.5 mid (either order
    # equally likely); c3 [.1,.8,0] -> 1; c4 [.6,.7,.5] -> 3; c5 [0,.1,.9] -> 1.
    target = clip_major_caption_to_clip(3, 2)
    ranks = text_to_audio_ranks(SCORES.T, target, ties="pessimistic")
    assert ranks.tolist() == [1, 3, 2, 1, 3, 1]
    assert text_to_audio_ranks(SCORES.T, target).tolist() == [1, 3, 1.5, 1, 3, 1]


def test_a2t_ranks_by_hand() -> None:
    # Clip 0: relevant (.9, .3); non-relevant >= .9: none -> 1; >= .3: {.6} -> 2 + 1 = 3.
    # Clip 1: relevant (.8, .2); >= .8: none -> 1; >= .2: {.2 tie, .5, .7} -> 2 + 3 = 5
    # pessimistic; mid: 3 items above, the tie group {.2, .2} -> 3 + 1.5 = 4.5.
    # Clip 2: relevant (.9, .5); >= .9: {.95} -> 2; >= .5: {.95} -> 2 + 1 = 3.
    target = clip_major_caption_to_clip(3, 2)
    ranks, valid = audio_to_text_ranks(SCORES, target, ties="pessimistic")
    assert ranks.tolist() == [[1, 3], [1, 5], [2, 3]]
    assert valid.all()
    assert audio_to_text_ranks(SCORES, target)[0].tolist() == [[1, 3], [1, 4.5], [2, 3]]


def test_mid_rank_metrics_by_hand() -> None:
    m = retrieval_metrics(SCORES, n_caps=2)
    # T2A ranks [1, 3, 1.5, 1, 3, 1]: mAP@10 = MRR = (3 + 1/3 + 1/3 + 1/1.5) / 6.
    assert m["t2a_R@1"] == pytest.approx(0.5)
    assert m["t2a_MRR"] == pytest.approx((3 + 4 / 3) / 6)
    assert m["t2a_mAP@10"] == pytest.approx((3 + 4 / 3) / 6)
    # A2T: clip 1's second caption at 4.5: AP (1 + 2/4.5) / 2; the others as pessimistic.
    assert m["a2t_mAP@10"] == pytest.approx((5 / 6 + (1 + 2 / 4.5) / 2 + 7 / 12) / 3)
    assert m["a2t_R@1"] == pytest.approx(2 / 3)


def test_per_query_metrics_by_hand() -> None:
    """The A2T ranks above, mid-rank: [[1, 3], [1, 4.5], [2, 3]]. Per clip: R@1 1, 1, 0;
    reciprocal rank 1, 1, 1/2; AP@10 (1 + 2/3)/2, (1 + 2/4.5)/2, (1/2 + 2/3)/2. Their
    means are the pool's metrics."""
    target = clip_major_caption_to_clip(3, 2)
    ranks, valid = audio_to_text_ranks(SCORES, target)
    values = per_query_metrics(ranks, valid)
    assert list(values) == ["R@1", "R@5", "R@10", "MRR", "mAP@10"]
    assert values["R@1"].tolist() == [1.0, 1.0, 0.0]
    assert values["R@5"].tolist() == [1.0, 1.0, 1.0]
    assert values["MRR"].tolist() == [1.0, 1.0, 0.5]
    assert values["mAP@10"].tolist() == pytest.approx([5 / 6, (1 + 2 / 4.5) / 2, 7 / 12])
    pool = audio_to_text_metrics(SCORES, target)
    assert {f"a2t_{m}": float(v.mean()) for m, v in values.items()} == pytest.approx(pool)


def test_unknown_tie_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="tie rule 'optimistic'"):
        retrieval_metrics(SCORES, n_caps=2, ties="optimistic")


def test_metrics_by_hand() -> None:
    m = retrieval_metrics(SCORES, n_caps=2, ks=(1, 2, 5), ties="pessimistic")
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
    cut = retrieval_metrics(SCORES, n_caps=2, cutoff=2, ties="pessimistic")
    assert cut["t2a_mAP@2"] == pytest.approx(3.5 / 6)
    assert cut["a2t_mAP@2"] == pytest.approx(1.25 / 3)
    assert set(retrieval_metrics(SCORES, n_caps=2)) == {
        f"{d}_{k}" for d in ("t2a", "a2t") for k in ("R@1", "R@5", "R@10", "mAP@10", "MRR")
    }


def test_constant_scores_get_the_worst_ranks_pessimistic() -> None:
    # Every tie counts against the query: 3 clips -> every T2A rank is 3; A2T: 4
    # non-relevant captions tie with both relevant ones -> ranks 1 + 4 and 2 + 4.
    flat = torch.zeros(3, 6)
    target = clip_major_caption_to_clip(3, 2)
    assert text_to_audio_ranks(flat.T, target, ties="pessimistic").tolist() == [3] * 6
    ranks, _ = audio_to_text_ranks(flat, target, ties="pessimistic")
    assert ranks.tolist() == [[5, 6]] * 3
    m = retrieval_metrics(flat, n_caps=2, ties="pessimistic")
    assert m["t2a_R@1"] == 0.0 and m["a2t_R@1"] == 0.0


def test_constant_scores_get_the_ranks_of_a_random_order() -> None:
    # Mid: T2A, 3 tied clips -> (3 + 1) / 2 = 2; A2T, 2 relevant among 6 tied captions ->
    # the j-th relevant at j * 7 / 3, the expected order statistics of a random order.
    flat = torch.zeros(3, 6)
    target = clip_major_caption_to_clip(3, 2)
    assert text_to_audio_ranks(flat.T, target).tolist() == [2] * 6
    ranks, _ = audio_to_text_ranks(flat, target)
    assert ranks.tolist() == [[pytest.approx(7 / 3), pytest.approx(14 / 3)]] * 3


def loop_rank(row: list[float], relevant: list[int], k: int, s: float, ties: str) -> float:
    """Rank of the k-th best relevant item (score s) of one query row, by counting."""
    above = sum(1 for v in row if v > s)
    tied = sum(1 for v in row if v == s)
    rel_above = sum(1 for p in relevant if row[p] > s)
    rel_tied = sum(1 for p in relevant if row[p] == s)
    j = k - rel_above
    if ties == "mid":
        return above + j * (tied + 1) / (rel_tied + 1)
    return above + (tied - rel_tied) + j


def loop_t2a(
    scores: list[list[float]], target: list[int], cutoff: int = 10, ties: str = "pessimistic"
) -> dict:
    """T2A by explicit loops over caption rows [n_captions][n_clips]."""
    ranks = [
        loop_rank(row, [clip], 1, row[clip], ties) for row, clip in zip(scores, target, strict=True)
    ]
    n = len(ranks)
    out = {f"t2a_R@{k}": sum(r <= k for r in ranks) / n for k in (1, 5, 10)}
    out[f"t2a_mAP@{cutoff}"] = sum(1 / r for r in ranks if r <= cutoff) / n
    out["t2a_MRR"] = sum(1 / r for r in ranks) / n
    return out


def loop_a2t(
    scores: list[list[float]], target: list[int], cutoff: int = 10, ties: str = "pessimistic"
) -> dict:
    """A2T by explicit loops over clip rows [n_clips][n_captions]."""
    first, aps = [], []
    for clip, row in enumerate(scores):
        rel = [p for p, c in enumerate(target) if c == clip]
        if not rel:
            continue
        rel_scores = sorted((row[p] for p in rel), reverse=True)
        ranks = [loop_rank(row, rel, k, s, ties) for k, s in enumerate(rel_scores, start=1)]
        first.append(ranks[0])
        aps.append(sum(k / r for k, r in enumerate(ranks, start=1) if r <= cutoff) / len(rel))
    n = len(first)
    out = {f"a2t_R@{k}": sum(r <= k for r in first) / n for k in (1, 5, 10)}
    out[f"a2t_mAP@{cutoff}"] = sum(aps) / n
    out["a2t_MRR"] = sum(1 / r for r in first) / n
    return out


@pytest.mark.parametrize("ties", ["mid", "pessimistic"])
def test_random_50x250_matches_python_loops(ties: str) -> None:
    torch.manual_seed(0)
    # Scores on a coarse grid so that ties are frequent and the tie rule is exercised.
    scores = torch.randint(0, 12, (50, 250)).double() / 12
    target = clip_major_caption_to_clip(50, 5)
    expected = loop_t2a(scores.T.tolist(), target.tolist(), ties=ties)
    expected.update(loop_a2t(scores.tolist(), target.tolist(), ties=ties))
    got = retrieval_metrics(scores, n_caps=5, block_size=16, ties=ties)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("ties", ["mid", "pessimistic"])
def test_uneven_caption_to_clip_matches_loops(ties: str) -> None:
    # 30 clips, 100 captions with a random clip each; some clips have no caption (they stay
    # in the T2A gallery but are not A2T queries).
    torch.manual_seed(1)
    target = torch.randint(0, 27, (100,))
    scores = torch.randint(0, 8, (30, 100)).double() / 8
    expected = loop_t2a(scores.T.tolist(), target.tolist(), ties=ties)
    expected.update(loop_a2t(scores.tolist(), target.tolist(), ties=ties))
    got = retrieval_metrics(scores, caption_to_clip=target, block_size=7, ties=ties)
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


def enumerated_expected_ranks(row: list[float], relevant: list[int]) -> list[float]:
    """Expected rank of the k-th best relevant item over every order of the items that
    breaks ties (all permutations as tie-breakers, each equally likely)."""
    totals = [0.0] * len(relevant)
    orders = list(itertools.permutations(range(len(row))))
    for breaker in orders:
        ranking = sorted(range(len(row)), key=lambda i: (-row[i], breaker[i]))
        positions = sorted(ranking.index(p) + 1 for p in relevant)
        totals = [t + p for t, p in zip(totals, positions, strict=True)]
    return [t / len(orders) for t in totals]


def test_mid_rank_is_the_expected_rank_under_random_tie_breaking() -> None:
    # 3 clips x 7 captions (clip 0 owns 0-2, clip 1 owns 3-4, clip 2 owns 5-6) on a grid of
    # 3 score levels: tie groups mixing relevant and non-relevant items in every row.
    torch.manual_seed(4)
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    scores = torch.randint(0, 3, (3, 7)).double()
    ranks, valid = audio_to_text_ranks(scores, target)
    for clip in range(3):
        relevant = [p for p in range(7) if int(target[p]) == clip]
        expected = enumerated_expected_ranks(scores[clip].tolist(), relevant)
        assert ranks[clip][valid[clip]].tolist() == pytest.approx(expected, abs=1e-12)
    t2a = text_to_audio_ranks(scores.T, target)
    for caption in range(7):
        expected = enumerated_expected_ranks(scores[:, caption].tolist(), [int(target[caption])])
        assert t2a[caption].item() == pytest.approx(expected[0], abs=1e-12)


def dp_baseline_metrics(scores: np.ndarray, n_caps: int = 5) -> dict[str, float]:
    """The DP baseline's `a2t` / `t2a` evaluation (Mei et al., tools/utils.py) on a score
    matrix [n_clips, n_clips * n_caps], clip-major: an argsort per query, rank = the
    0-based position of the relevant item; R@k = ranks < k; T2A mAP@10 = sum of
    1/(rank+1) over ranks < 10 / n; A2T AP@10 = sum over its captions within the top 10 of
    (order among them)/(position) / n_caps. MRR (not in the DP code) from the same ranks."""
    n_clips = scores.shape[0]
    a2t_ranks, ap10 = np.zeros(n_clips), np.zeros(n_clips)
    for index in range(n_clips):
        inds = np.argsort(scores[index])[::-1]
        rank = 1e20
        inds_map = []
        for i in range(n_caps * index, n_caps * index + n_caps):
            tmp = np.where(inds == i)[0][0]
            rank = min(rank, tmp)
            if tmp < 10:
                inds_map.append(tmp + 1)
        inds_map = np.sort(np.array(inds_map))
        if len(inds_map) != 0:
            ap10[index] = np.sum(np.arange(1, len(inds_map) + 1) / inds_map) / n_caps
        a2t_ranks[index] = rank
    t2a_ranks = np.zeros(n_caps * n_clips)
    for index in range(n_clips):
        queries = scores[:, n_caps * index : n_caps * index + n_caps].T
        for i in range(len(queries)):
            inds = np.argsort(queries[i])[::-1]
            t2a_ranks[n_caps * index + i] = np.where(inds == index)[0][0]
    out: dict[str, float] = {}
    for prefix, ranks in (("t2a", t2a_ranks), ("a2t", a2t_ranks)):
        for k in (1, 5, 10):
            out[f"{prefix}_R@{k}"] = len(np.where(ranks < k)[0]) / len(ranks)
        out[f"{prefix}_MRR"] = float(np.mean(1 / (ranks + 1)))
    out["t2a_mAP@10"] = np.sum(1 / (t2a_ranks[np.where(t2a_ranks < 10)[0]] + 1)) / len(t2a_ranks)
    out["a2t_mAP@10"] = np.sum(ap10) / n_clips
    return out


@pytest.mark.parametrize("ties", ["mid", "pessimistic"])
def test_continuous_scores_equal_the_dp_baseline_code(ties: str) -> None:
    torch.manual_seed(5)
    scores = torch.randn(40, 200, dtype=torch.float64)
    expected = dp_baseline_metrics(scores.numpy())
    # Distinct caption texts, as a real test split has: text relevance changes nothing.
    texts = [f"caption {j}" for j in range(200)]
    for caption_texts in (None, texts):
        got = retrieval_metrics(
            scores, n_caps=5, block_size=16, ties=ties, caption_texts=caption_texts
        )
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-9), key


def templated_pool(per_class: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """ESC-50-style pool: 3 categories x `per_class` clips, every clip captioned with the
    two ESC-50 templates of its category; a perfect scorer's matrix (1 on the same
    category, 0 elsewhere: identical texts score identically, as any text model does)."""
    templates = ["the sound of a {category}", "a {category} can be heard"]
    categories = ["dog", "rain", "church bells"]
    clip_class = torch.arange(3).repeat_interleave(per_class)
    target = torch.arange(3 * per_class).repeat_interleave(2)
    texts = [
        template.format(category=categories[int(clip_class[clip])])
        for clip in range(3 * per_class)
        for template in templates
    ]
    scores = (clip_class[:, None] == clip_class[target][None, :]).double()
    return scores, target, texts


def test_perfect_scorer_on_templated_captions_gets_perfect_recall() -> None:
    scores, target, texts = templated_pool(per_class=4)
    m = retrieval_metrics(scores, caption_to_clip=target, caption_texts=texts)
    for direction in ("t2a", "a2t"):
        assert m[f"{direction}_R@1"] == 1.0
        assert m[f"{direction}_MRR"] == 1.0
        # Every relevant item ahead of every other: average precision 1.
        assert m[f"{direction}_mAP@10"] == pytest.approx(1.0)
    # Without the texts, each copy of a sentence on another clip counts as a wrong answer
    # tied with the right one: the old rule ranked them all first, R@1 = 0.
    old = retrieval_metrics(scores, caption_to_clip=target, ties="pessimistic")
    assert old["a2t_R@1"] == 0.0 and old["t2a_R@1"] == 0.0
    # A scorer that only tells categories apart in A2T is still not rewarded for a wrong
    # category: swapping two categories' rows drops their clips' R@1 to 0.
    swapped = scores[[4, 5, 6, 7, 0, 1, 2, 3, 8, 9, 10, 11]]
    m = retrieval_metrics(swapped, caption_to_clip=target, caption_texts=texts)
    assert m["a2t_R@1"] == pytest.approx(4 / 12)


def test_identical_texts_are_relevant_in_both_directions() -> None:
    # Clip 0 "a dog", "rain"; clip 1 "a dog"; clip 2 "wind". Clip 0's relevant captions
    # are its own and clip 1's "a dog"; caption "a dog" (either copy) finds clips 0 and 1.
    target = torch.tensor([0, 0, 1, 2])
    texts = ["a dog", "rain", "a dog", "wind"]
    scores = torch.tensor(
        [[0.1, 0.9, 0.8, 0.2], [0.3, 0.1, 0.5, 0.0], [0.0, 0.2, 0.1, 0.4]], dtype=torch.float64
    )
    ranks, valid = audio_to_text_ranks(scores, target, caption_texts=texts)
    # Clip 0 row [.1 .9 .8 .2]: relevant 0, 1, 2 -> ranks 1 (.9), 2 (.8), 4 (.1 after .2).
    assert ranks[0].tolist() == [1, 2, 4]
    # Clip 1 row [.3 .1 .5 0]: relevant 0 and 2 -> ranks 1 (.5), 2 (.3).
    assert ranks[1][valid[1]].tolist() == [1, 2]
    assert ranks[2][valid[2]].tolist() == [1]
    # T2A: caption 0 ("a dog", clip 0's) over clips [.1 .3 0] and caption 2 ("a dog",
    # clip 1's) over [.8 .5 .1]: each is answered at rank 1 by the other clip carrying the
    # same sentence; by ownership alone their own clip is second.
    assert text_to_audio_ranks(scores.T, target, caption_texts=texts).tolist() == [1, 1, 1, 1]
    assert text_to_audio_ranks(scores.T, target).tolist() == [2, 1, 2, 1]
    with pytest.raises(ValueError, match="3 caption texts for 4 captions"):
        retrieval_metrics(scores, caption_to_clip=target, caption_texts=texts[:3])


def test_shape_mismatch_is_reported() -> None:
    with pytest.raises(ValueError, match="caption_to_clip"):
        retrieval_metrics(torch.zeros(3, 7), n_caps=2)
    with pytest.raises(ValueError, match="have 7 columns, caption_to_clip implies 6"):
        audio_to_text_metrics(torch.zeros(3, 7), clip_major_caption_to_clip(3, 2))


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

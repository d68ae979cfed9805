"""Two-stage search over mapped shards: ANN kinds, stage-2 parity with exhaustive scoring,
the text bias, filters, more-like-this, and S shards equal to one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from gpa_ray.index import mapped, store
from gpa_ray.index.ann import AnnSettings
from gpa_ray.index.search import ClipFilter, IndexSearcher
from gpa_ray.models.gpa import Embeddings
from gpa_ray.testing.models import tiny_gpa_config, tiny_gpa_model
from gpa_ray.testing.synthetic import random_unit_embeddings, synthetic_index_clips

E, K1 = 16, 4  # the tiny GPA: embed_dim 16, K + 1 = 4 prototypes
FLAT = AnnSettings(kind="flat")


def random_embeddings(n: int, seed: int, prototypes: bool = True) -> Embeddings:
    return random_unit_embeddings(n, E, K1 if prototypes else 0, seed)


def write_random_index(
    root: Path,
    n_clips: int,
    *,
    prototypes: bool = True,
    bias: torch.Tensor | None = None,
    seed: int = 0,
    shards: int = 1,
    ann: AnnSettings = FLAT,
    units: int = 1,
) -> tuple[list[dict], Embeddings, Embeddings, list[mapped.MappedShard]]:
    """A float32 version of random embeddings: its clips, clip and text embeddings, shards."""
    clips = synthetic_index_clips(n_clips, 2)
    texts = store.caption_rows(clips)
    bias_table = None
    if bias is not None:
        bias_table = pa.table({"text_id": [t["text_id"] for t in texts], "bias": bias.numpy()})
    clip_emb = random_embeddings(n_clips, seed, prototypes)
    text_emb = random_embeddings(len(texts), seed + 1, prototypes)
    store.write_version(
        str(root),
        "v1",
        clips,
        clip_emb,
        text_emb,
        checkpoint="ckpt",
        dtype="float32",
        bias=bias_table,
        units=units,
        shards=shards,
        ann_settings=ann,
    )
    return clips, clip_emb, text_emb, mapped.open_version(str(root))


def ids_of(results: list[dict], key: str = "clip_id") -> list[str]:
    return [r[key] for r in results]


# ------------------------------------------------------------------ stage 1 + 2


@pytest.mark.parametrize("kind", ["flat", "ivf"])
@pytest.mark.parametrize("scorer", ["lass", "mean", "none"])
def test_full_shortlist_equals_exhaustive_scoring(tmp_path: Path, kind: str, scorer: str) -> None:
    """With every list probed and a shortlist as large as the pool, the two stages give
    the model's own full score of every item, best first (reference: `score_pool`)."""
    model = tiny_gpa_model(tiny_gpa_config(scorer=scorer)).eval()
    ann = AnnSettings(kind=kind, nlist=4, nprobe=4)
    clips, clip_emb, text_emb, shards = write_random_index(
        tmp_path, 60, prototypes=scorer != "none", ann=ann
    )
    texts = store.caption_rows(clips)
    searcher = IndexSearcher(shards, model, ann, shortlist=len(texts))
    text_queries = random_embeddings(3, seed=11, prototypes=scorer != "none")
    audio_queries = random_embeddings(3, seed=12, prototypes=scorer != "none")
    with torch.no_grad():
        t2a = model.score_pool(clip_emb, text_queries).T  # [query, clip]
        a2t = model.score_pool(audio_queries, text_emb)  # [query, text]
    for results, full, names, key in (
        (searcher.text_to_audio(text_queries, k=len(clips)), t2a, clips, "clip_id"),
        (searcher.audio_to_text(audio_queries, k=len(texts)), a2t, texts, "text_id"),
    ):
        for b, row in enumerate(results):
            expected = torch.sort(full[b], descending=True, stable=True)
            assert ids_of(row, key) == [names[i][key] for i in expected.indices.tolist()]
            got = torch.tensor([r["score"] for r in row])
            torch.testing.assert_close(got, expected.values, atol=1e-5, rtol=0)


def test_small_shortlist_reranks_the_stage1_candidates(tmp_path: Path) -> None:
    model = tiny_gpa_model().eval()
    clips, clip_emb, _, shards = write_random_index(tmp_path, 50)
    query = random_embeddings(1, seed=21)
    searcher = IndexSearcher(shards, model, FLAT, shortlist=10)
    results = searcher.text_to_audio(query, k=4)[0]
    # Reference by hand: the 10 best clips by S_g, then the 4 best of those by R.
    s_g = (clip_emb.global_ @ query.global_.T)[:, 0]
    candidates = torch.topk(s_g, 10).indices
    with torch.no_grad():
        r = model.score(clip_emb[candidates], query)[:, 0]
    best = candidates[torch.argsort(r, descending=True)[:4]]
    assert ids_of(results) == [clips[i]["clip_id"] for i in best.tolist()]
    position = {c["clip_id"]: i for i, c in enumerate(clips)}
    for h in results:
        assert h["stage1_score"] == pytest.approx(float(s_g[position[h["clip_id"]]]), abs=1e-6)
        assert h["score"] == pytest.approx(h["global_score"] + h["prototype_score"], abs=1e-6)
        assert h["bias"] == 0.0
    # k larger than the shortlist widens it: k results come back.
    assert len(searcher.text_to_audio(query, k=25)[0]) == 25


def test_ivf_with_few_probes_returns_true_scores_best_first(tmp_path: Path) -> None:
    ann = AnnSettings(kind="ivf", nprobe=1)
    clips, clip_emb, _, shards = write_random_index(tmp_path, 800, prototypes=False, ann=ann)
    assert shards[0].clips.ann.nlist == min(800 // 39, int(4 * np.sqrt(800)))
    model = tiny_gpa_model(tiny_gpa_config(scorer="none")).eval()
    queries = random_embeddings(4, seed=6, prototypes=False)
    position = {c["clip_id"]: i for i, c in enumerate(clips)}
    for b, row in enumerate(IndexSearcher(shards, model, ann, 10).text_to_audio(queries, 10)):
        exact = clip_emb.global_ @ queries.global_[b]
        for r in row:
            assert r["stage1_score"] == pytest.approx(
                float(exact[position[r["clip_id"]]]), abs=1e-5
            )
        assert all(a["score"] >= b_["score"] for a, b_ in zip(row, row[1:], strict=False))


def test_unknown_ann_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="index.ann must be one of"):
        AnnSettings(kind="hnsw")


# ------------------------------------------------------------------ shards


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_four_shards_return_exactly_one_shards_results(tmp_path: Path, kind: str) -> None:
    """One trained ANN for all shards and the three-step merge: S = 4 returns the very
    items of S = 1, in the same order, on every query in both directions. Scores agree to
    float rounding (stage 2 scores each shard's candidates in one batch, and a batch of
    another size may round the last bit differently)."""
    model = tiny_gpa_model().eval()
    ann = AnnSettings(kind=kind, nprobe=2)
    bias = torch.linspace(-0.2, 0.2, 800)
    answers = []
    for shards in (1, 4):
        *_, opened = write_random_index(
            tmp_path / f"s{shards}", 400, bias=bias, shards=shards, ann=ann, units=3
        )
        assert len(opened) == shards
        searcher = IndexSearcher(opened, model, ann, shortlist=20)
        queries = random_embeddings(100, seed=7)
        answers.append(searcher.text_to_audio(queries, 10) + searcher.audio_to_text(queries, 10))
    for one, four in zip(*answers, strict=True):
        assert [r.get("text_id", r["clip_id"]) for r in one] == [
            r.get("text_id", r["clip_id"]) for r in four
        ]
        for a, b in zip(one, four, strict=True):
            assert {k: v for k, v in a.items() if not k.endswith("score")} == {
                k: v for k, v in b.items() if not k.endswith("score")
            }
            for key in ("score", "global_score", "prototype_score", "stage1_score"):
                assert a[key] == pytest.approx(b[key], abs=1e-6)
    assert sum(len(s.clips) for s in opened) == 400 and min(len(s.clips) for s in opened) > 50


# ------------------------------------------------------------------ bias


def test_bias_folded_into_stage1_hand_numbers(tmp_path: Path) -> None:
    """Two texts g1 = [1, 0], g2 = [0.8, 0.6] with biases 0 and 0.5; query [1, 0].
    By hand: S_g = (1.0, 0.8); with the bias stage 1 ranks by (1.0, 1.3), so text 2 wins
    a shortlist of one; without it, text 1 does."""
    model = tiny_gpa_model(tiny_gpa_config(scorer="none", embed_dim=2)).eval()
    clips = synthetic_index_clips(2, 1)
    texts = Embeddings(torch.tensor([[1.0, 0.0], [0.8, 0.6]]))
    bias = pa.table({"text_id": ["toy/000000#0", "toy/000001#0"], "bias": [0.0, 0.5]})
    store.write_version(
        str(tmp_path), "v1", clips, texts, texts, checkpoint="c", dtype="float32", bias=bias,
        ann_settings=FLAT,
    )  # fmt: skip
    searcher = IndexSearcher(mapped.open_version(str(tmp_path)), model, FLAT, shortlist=1)
    query = Embeddings(torch.tensor([[1.0, 0.0]]))
    ((with_bias,),) = searcher.audio_to_text(query, k=1)
    ((without,),) = searcher.audio_to_text(query, k=1, use_bias=False)
    assert with_bias["text_id"] == "toy/000001#0"
    assert with_bias["stage1_score"] == pytest.approx(1.3)
    assert with_bias["score"] == pytest.approx(1.3) and with_bias["bias"] == pytest.approx(0.5)
    assert without["text_id"] == "toy/000000#0" and without["stage1_score"] == pytest.approx(1.0)
    assert without["bias"] == 0.0


def test_audio_to_text_with_bias_differs_exactly_by_the_bias(tmp_path: Path) -> None:
    model = tiny_gpa_model().eval()
    bias = torch.linspace(-0.3, 0.3, 80)
    clips, _, _, shards = write_random_index(tmp_path, 40, bias=bias)
    texts = store.caption_rows(clips)
    by_id = {t["text_id"]: float(b) for t, b in zip(texts, bias, strict=True)}
    searcher = IndexSearcher(shards, model, FLAT, shortlist=len(texts))
    queries = random_embeddings(2, seed=31)
    k = len(texts)
    for with_bias, without in zip(
        searcher.audio_to_text(queries, k),
        searcher.audio_to_text(queries, k, use_bias=False),
        strict=True,
    ):
        plain = {h["text_id"]: h for h in without}
        for h in with_bias:
            b = by_id[h["text_id"]]
            assert h["score"] - plain[h["text_id"]]["score"] == pytest.approx(b, abs=1e-6)
            assert h["bias"] == pytest.approx(b)
            assert h["stage1_score"] - plain[h["text_id"]]["stage1_score"] == pytest.approx(
                b, abs=1e-6
            )
    # Text-to-audio never uses the bias.
    assert all(h["bias"] == 0.0 for h in searcher.text_to_audio(queries, 5)[0])


# ------------------------------------------------------------------ records, filters, similar


def test_results_carry_metadata(tmp_path: Path) -> None:
    clips, _, _, shards = write_random_index(tmp_path, 5)
    searcher = IndexSearcher(shards, tiny_gpa_model().eval(), FLAT, 100)
    found = searcher.text_to_audio(random_embeddings(1, 41), 2)[0]
    assert [c["rank"] for c in found] == [1, 2]
    assert found[0]["clip_id"].startswith("toy/") and found[0]["labels"]
    assert found[0]["has_audio"] is False
    text_of = {t["text_id"]: t["text"] for t in store.caption_rows(clips)}
    for t in searcher.audio_to_text(random_embeddings(1, 42), 3)[0]:
        assert t["text"] == text_of[t["text_id"]]
        assert t["text_id"].startswith(t["clip_id"] + "#")


def test_filters_hold_inside_stage1_and_still_meet_k(tmp_path: Path) -> None:
    """Only passing clips come back, k of them while k pass, in the order an unfiltered
    search over just the passing clips gives (reference: exact S_g over those clips)."""
    ann = AnnSettings(kind="ivf", nprobe=1)
    clips, clip_emb, _, shards = write_random_index(tmp_path, 400, ann=ann, shards=2)
    model = tiny_gpa_model().eval()
    searcher = IndexSearcher(shards, model, ann, shortlist=400)
    labels = {c["clip_id"]: c["labels"] for c in clips}
    rare = ClipFilter(labels=("label2",))
    passing = [i for i, c in enumerate(clips) if "label2" in c["labels"]]
    assert 10 < len(passing) < 200
    query = random_embeddings(1, seed=3)
    found = searcher.text_to_audio(query, k=10, where=rare)[0]
    assert len(found) == 10 and all("label2" in labels[r["clip_id"]] for r in found)
    with torch.no_grad():
        full = model.score(clip_emb[torch.tensor(passing)], query)[:, 0]
    best = [clips[passing[i]]["clip_id"] for i in torch.argsort(full, descending=True)[:10]]
    assert ids_of(found) == best
    texts = searcher.audio_to_text(query, k=5, where=ClipFilter(labels=("label2",)))[0]
    assert len(texts) == 5 and all("label2" in labels[t["clip_id"]] for t in texts)
    nothing = ClipFilter(min_duration_s=5.0)
    assert searcher.text_to_audio(query, k=3, where=nothing) == [[]]


def test_filter_mask_by_hand() -> None:
    meta = pa.table(
        {
            "corpus": ["a", "b", "a"],
            "split": ["test", "test", "train"],
            "labels": [["dog"], ["cat", "dog"], []],
            "duration_s": [1.0, 5.0, 10.0],
        }
    )
    assert ClipFilter(corpus=("a",)).mask(meta).tolist() == [True, False, True]
    assert ClipFilter(labels=("cat",)).mask(meta).tolist() == [False, True, False]
    assert ClipFilter(split=("test",), max_duration_s=2.0).mask(meta).tolist() == [
        True,
        False,
        False,
    ]
    assert ClipFilter(min_duration_s=5.0).mask(meta).tolist() == [False, True, True]


def test_similar_clips_rank_by_audio_embedding_without_the_clip_itself(tmp_path: Path) -> None:
    clips, clip_emb, _, shards = write_random_index(tmp_path, 60, shards=3)
    searcher = IndexSearcher(shards, tiny_gpa_model().eval(), FLAT, 20)
    target = clips[7]["clip_id"]
    found = searcher.similar_clips(target, k=5)
    sims = clip_emb.global_ @ clip_emb.global_[7]
    sims[7] = -np.inf
    assert ids_of(found) == [clips[i]["clip_id"] for i in torch.argsort(sims, descending=True)[:5]]
    assert found[0]["score"] == pytest.approx(float(sims.max()), abs=1e-5)
    assert searcher.similar_clips("nope", k=5) is None


def test_model_and_index_must_agree_on_prototypes(tmp_path: Path) -> None:
    *_, shards = write_random_index(tmp_path, 5, prototypes=False)
    with pytest.raises(ValueError, match="prototypes"):
        IndexSearcher(shards, tiny_gpa_model().eval(), FLAT, 10)
    searcher = IndexSearcher(
        shards, tiny_gpa_model(tiny_gpa_config(scorer="none")).eval(), FLAT, 10
    )
    with pytest.raises(ValueError, match="k must be positive"):
        searcher.text_to_audio(random_embeddings(1, 0, prototypes=False), 0)


def test_search_and_service_modules_import_without_ray() -> None:
    """Search and the service logic stay usable without Ray (only the build and the Serve
    deployments need it)."""
    import subprocess
    import sys

    modules = ["gpa_ray.index.store", "gpa_ray.index.search", "gpa_ray.serve.retriever",
               "gpa_ray.serve.api", "gpa_ray.serve.local"]  # fmt: skip
    script = "import sys\nsys.modules['ray'] = None\n" + "".join(f"import {m}\n" for m in modules)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

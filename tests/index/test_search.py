"""Two-stage search: stage-1 backends, stage-2 parity with exhaustive scoring, the text bias."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from gpa_ray.index import store
from gpa_ray.index.search import IndexSearcher, InnerProductIndex
from gpa_ray.models.gpa import Embeddings
from gpa_ray.testing.models import tiny_gpa_config, tiny_gpa_model
from gpa_ray.testing.synthetic import random_unit_embeddings, synthetic_index_clips

E, K1 = 16, 4  # the tiny GPA: embed_dim 16, K + 1 = 4 prototypes


def random_embeddings(n: int, seed: int, prototypes: bool = True) -> Embeddings:
    return random_unit_embeddings(n, E, K1 if prototypes else 0, seed)


def clip_rows(n: int, captions: int = 2) -> list[dict]:
    return synthetic_index_clips(n, captions)


def write_random_index(
    root: Path,
    n_clips: int,
    *,
    dtype: str = "float32",
    prototypes: bool = True,
    bias: torch.Tensor | None = None,
    seed: int = 0,
) -> store.LoadedIndex:
    clips = clip_rows(n_clips)
    texts = store.caption_rows(clips)
    bias_table = None
    if bias is not None:
        bias_table = pa.table({"text_id": [t["text_id"] for t in texts], "bias": bias.numpy()})
    store.write_version(
        str(root),
        "v1",
        clips,
        random_embeddings(n_clips, seed, prototypes),
        random_embeddings(len(texts), seed + 1, prototypes),
        checkpoint="ckpt",
        dtype=dtype,
        bias=bias_table,
    )
    return store.load_index(str(root))


# ------------------------------------------------------------------ stage 1


def test_exact_inner_product_hand_numbers() -> None:
    # Scores of query [1, 0] against the rows, by hand: 1.0, 0.6, 0.0, -1.0.
    vectors = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    scores, ids = InnerProductIndex(vectors).top(torch.tensor([[1.0, 0.0]]), 3)
    assert ids.tolist() == [[0, 1, 2]]
    torch.testing.assert_close(scores, torch.tensor([[1.0, 0.6, 0.0]]))
    # n larger than the pool returns the whole pool.
    assert InnerProductIndex(vectors).top(torch.tensor([[0.0, 1.0]]), 10)[1].tolist() == [
        [2, 1, 0, 3]
    ]


def test_faiss_flat_and_full_probe_ivf_equal_exact() -> None:
    vectors = random_embeddings(800, seed=3, prototypes=False).global_
    queries = random_embeddings(5, seed=4, prototypes=False).global_
    exact_scores, exact_ids = InnerProductIndex(vectors, "exact").top(queries, 20)
    flat_scores, flat_ids = InnerProductIndex(vectors, "flat").top(queries, 20)
    assert torch.equal(flat_ids, exact_ids)
    torch.testing.assert_close(flat_scores, exact_scores, atol=1e-5, rtol=0)
    ivf = InnerProductIndex(vectors, "ivf", nlist=8, nprobe=8)  # every list probed: exact
    ivf_scores, ivf_ids = ivf.top(queries, 20)
    assert ivf.nlist == 8 and torch.equal(ivf_ids, exact_ids)
    torch.testing.assert_close(ivf_scores, exact_scores, atol=1e-5, rtol=0)


def test_ivf_with_few_probes_is_approximate_but_consistent() -> None:
    vectors = random_embeddings(800, seed=5, prototypes=False).global_
    queries = random_embeddings(4, seed=6, prototypes=False).global_
    ivf = InnerProductIndex(vectors, "ivf", nprobe=1)
    assert ivf.nlist == min(800 // 39, int(4 * math.sqrt(800)))  # the automatic list count
    scores, ids = ivf.top(queries, 10)
    exact = queries @ vectors.T
    for b in range(len(queries)):
        found = ids[b][ids[b] >= 0]
        # Every returned score is the true inner product, best first.
        torch.testing.assert_close(scores[b][: len(found)], exact[b, found], atol=1e-5, rtol=0)
        assert torch.all(scores[b][: len(found)].diff() <= 1e-6)


def test_unknown_ann_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="index.ann must be one of"):
        InnerProductIndex(torch.zeros(3, 2), "hnsw")


# ------------------------------------------------------------------ stage 2


@pytest.mark.parametrize("ann", ["exact", "flat", "ivf"])
@pytest.mark.parametrize("scorer", ["lass", "mean", "none"])
def test_full_shortlist_equals_exhaustive_scoring(tmp_path: Path, ann: str, scorer: str) -> None:
    model = tiny_gpa_model(tiny_gpa_config(scorer=scorer)).eval()
    index = write_random_index(tmp_path, 60, prototypes=scorer != "none")
    n_clips, n_texts = len(index.clips), len(index.texts)
    searcher = IndexSearcher(
        index, model, ann=ann, shortlist=max(n_clips, n_texts), ivf_nlist=4, ivf_nprobe=4
    )
    text_queries = random_embeddings(3, seed=11, prototypes=scorer != "none")
    audio_queries = random_embeddings(3, seed=12, prototypes=scorer != "none")
    with torch.no_grad():
        t2a = model.score_pool(index.clips.embeddings, text_queries).T  # [query, clip]
        a2t = model.score_pool(audio_queries, index.texts.embeddings)  # [query, text]
    for hits, full in (
        (searcher.text_to_audio(text_queries, k=n_clips), t2a),
        (searcher.audio_to_text(audio_queries, k=n_texts), a2t),
    ):
        for b, row in enumerate(hits):
            expected = torch.sort(full[b], descending=True, stable=True)
            assert [h.position for h in row] == expected.indices.tolist()
            got = torch.tensor([h.score for h in row])
            torch.testing.assert_close(got, expected.values, atol=1e-5, rtol=0)


def test_small_shortlist_reranks_the_stage1_candidates(tmp_path: Path) -> None:
    model = tiny_gpa_model().eval()
    index = write_random_index(tmp_path, 50)
    query = random_embeddings(1, seed=21)
    searcher = IndexSearcher(index, model, shortlist=10)
    hits = searcher.text_to_audio(query, k=4)[0]
    # Reference by hand: the 10 best clips by S_g, then the 4 best of those by R.
    s_g = (index.clips.embeddings.global_ @ query.global_.T)[:, 0]
    candidates = torch.topk(s_g, 10).indices
    with torch.no_grad():
        r = model.score(index.clips.embeddings[candidates], query)[:, 0]
    best = candidates[torch.argsort(r, descending=True)[:4]]
    assert [h.position for h in hits] == best.tolist()
    for h in hits:
        assert h.stage1_score == pytest.approx(float(s_g[h.position]), abs=1e-6)
        assert h.score == pytest.approx(h.global_score + h.prototype_score, abs=1e-6)
        assert h.bias == 0.0
    # k larger than the shortlist widens it: k results come back.
    assert len(searcher.text_to_audio(query, k=25)[0]) == 25


def test_bias_folded_into_stage1_hand_numbers(tmp_path: Path) -> None:
    """Two texts g1 = [1, 0], g2 = [0.8, 0.6] with biases 0 and 0.5; query [1, 0].
    By hand: S_g = (1.0, 0.8); with the bias stage 1 ranks by (1.0, 1.3), so text 2 wins
    a shortlist of one; without it, text 1 does."""
    model = tiny_gpa_model(tiny_gpa_config(scorer="none", embed_dim=2)).eval()
    clips = clip_rows(2, captions=1)
    texts = Embeddings(torch.tensor([[1.0, 0.0], [0.8, 0.6]]))
    bias = pa.table({"text_id": ["toy/000000#0", "toy/000001#0"], "bias": [0.0, 0.5]})
    store.write_version(
        str(tmp_path), "v1", clips, texts, texts, checkpoint="c", dtype="float32", bias=bias
    )
    searcher = IndexSearcher(store.load_index(str(tmp_path)), model, shortlist=1)
    query = Embeddings(torch.tensor([[1.0, 0.0]]))
    (with_bias,) = searcher.audio_to_text(query, k=1)
    (without,) = searcher.audio_to_text(query, k=1, use_bias=False)
    assert with_bias[0].position == 1 and with_bias[0].stage1_score == pytest.approx(1.3)
    assert with_bias[0].score == pytest.approx(1.3) and with_bias[0].bias == pytest.approx(0.5)
    assert without[0].position == 0 and without[0].stage1_score == pytest.approx(1.0)
    assert without[0].bias == 0.0


def test_audio_to_text_with_bias_differs_exactly_by_the_bias(tmp_path: Path) -> None:
    model = tiny_gpa_model().eval()
    bias = torch.linspace(-0.3, 0.3, 80)
    index = write_random_index(tmp_path, 40, bias=bias)
    torch.testing.assert_close(index.text_bias, bias)
    searcher = IndexSearcher(index, model, shortlist=len(index.texts))
    queries = random_embeddings(2, seed=31)
    k = len(index.texts)
    for with_bias, without in zip(
        searcher.audio_to_text(queries, k),
        searcher.audio_to_text(queries, k, use_bias=False),
        strict=True,
    ):
        plain = {h.position: h for h in without}
        for h in with_bias:
            assert h.score - plain[h.position].score == pytest.approx(
                float(bias[h.position]), abs=1e-6
            )
            assert h.bias == pytest.approx(float(bias[h.position]))
            assert h.stage1_score - plain[h.position].stage1_score == pytest.approx(
                float(bias[h.position]), abs=1e-6
            )
    # Text-to-audio never uses the bias.
    assert all(h.bias == 0.0 for h in searcher.text_to_audio(queries, 5)[0])


def test_results_carry_metadata(tmp_path: Path) -> None:
    index = write_random_index(tmp_path, 5)
    searcher = IndexSearcher(index, tiny_gpa_model().eval())
    clips = searcher.clip_results(searcher.text_to_audio(random_embeddings(1, 41), 2)[0])
    assert [c["rank"] for c in clips] == [1, 2]
    assert clips[0]["clip_id"].startswith("toy/") and clips[0]["labels"]
    assert clips[0]["has_audio"] is False
    texts = searcher.text_results(searcher.audio_to_text(random_embeddings(1, 42), 3)[0])
    for t in texts:
        assert t["text"] == index.texts.metadata[index.texts.positions[t["text_id"]]]["text"]
        assert t["text_id"].startswith(t["clip_id"] + "#")


def test_model_and_index_must_agree_on_prototypes(tmp_path: Path) -> None:
    index = write_random_index(tmp_path, 5, prototypes=False)
    with pytest.raises(ValueError, match="prototypes"):
        IndexSearcher(index, tiny_gpa_model().eval())
    with pytest.raises(ValueError, match="k must be positive"):
        IndexSearcher(index, tiny_gpa_model(tiny_gpa_config(scorer="none")).eval()).text_to_audio(
            random_embeddings(1, 0, prototypes=False), 0
        )


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

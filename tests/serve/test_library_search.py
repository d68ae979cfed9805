"""`GPA.search` / `GPA.search_audio` (the Python API) on the test index of real ESC-50
clips, against exhaustive scoring of every indexed clip and caption with the same model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpa_ray import GPA
from gpa_ray.cli import main
from gpa_ray.data.schema import text_id
from gpa_ray.index.search import ClipFilter
from gpa_ray.serve.retriever import IndexMismatchError
from gpa_ray.testing.models import save_tiny_text_model, tiny_gpa_checkpoint, tiny_gpa_run_config

K = 3


@pytest.fixture(scope="module")
def indexed(served_index: dict) -> GPA:
    return GPA.from_index(
        served_index["index_uri"], device="cpu", storage_cfg=served_index["storage"]
    )


def check_ranking(results: list[dict], id_key: str, reference: dict[str, float]) -> None:
    """Rank r holds an item whose exhaustive score is the r-th best (the index keeps
    float16 vectors, so scores agree to ~1e-3 and near-ties may swap)."""
    best = sorted(reference.values(), reverse=True)[:K]
    assert [r["rank"] for r in results] == list(range(1, K + 1))
    for r, expected in zip(results, best, strict=True):
        assert reference[r[id_key]] == pytest.approx(expected, abs=5e-3)
        assert r["score"] == pytest.approx(reference[r[id_key]], abs=5e-3)


def test_text_search_ranks_clips_as_exhaustive_scoring(indexed: GPA, served_index: dict) -> None:
    assert indexed.checkpoint == served_index["checkpoint"]
    clips = served_index["clips"]
    query = clips[2]["captions"][0]
    scores = indexed.score([c["audio"] for c in clips], query)[:, 0]
    reference = {c["clip_id"]: float(s) for c, s in zip(clips, scores, strict=True)}
    results = indexed.search(query, served_index["index_uri"], k=K)
    check_ranking(results, "clip_id", reference)
    only = clips[5]["labels"][0]
    filtered = indexed.search(
        query, served_index["index_uri"], k=K, where=ClipFilter(labels=(only,))
    )
    assert {r["clip_id"] for r in filtered} == {c["clip_id"] for c in clips if only in c["labels"]}


def test_audio_search_ranks_captions_with_the_bias(indexed: GPA, served_index: dict) -> None:
    clips, bias = served_index["clips"], served_index["bias"]
    texts = [(text_id(c["clip_id"], i), t) for c in clips for i, t in enumerate(c["captions"])]
    scores = indexed.score(clips[4]["audio"], [t for _, t in texts])[0]
    for use_bias in (True, False):
        reference = {
            tid: float(s) + (bias[tid] if use_bias else 0.0)
            for (tid, _), s in zip(texts, scores, strict=True)
        }
        results = indexed.search_audio(
            clips[4]["audio"], served_index["index_uri"], k=K, use_bias=use_bias
        )
        check_ranking(results, "text_id", reference)
        assert all(
            np.isclose(r["bias"], bias[r["text_id"]] if use_bias else 0.0, atol=1e-3)
            for r in results
        )


def test_an_index_of_other_weights_is_refused(served_index: dict, tmp_path: Path) -> None:
    cfg = tiny_gpa_run_config(save_tiny_text_model(tmp_path / "text"))
    tiny_gpa_checkpoint(str(tmp_path / "other"), cfg, seed=1)
    other = GPA.load(tmp_path / "other", device="cpu", storage_cfg=served_index["storage"])
    with pytest.raises(IndexMismatchError, match="was built with checkpoint"):
        other.search("a dog", served_index["index_uri"])


def test_the_search_command_prints_the_apis_results(
    indexed: GPA, served_index: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    storage_args = [a for o in served_index["storage_args"] for a in ("--set", o)]
    query = served_index["clips"][1]["captions"][0]
    args = ["search", query, "--index", served_index["index_uri"], "-k", "3", *storage_args]
    assert main([*args, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = indexed.search(query, served_index["index_uri"], k=3)
    assert [r["clip_id"] for r in printed] == [r["clip_id"] for r in expected]
    assert [r["score"] for r in printed] == pytest.approx([r["score"] for r in expected])
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].split()[2] == expected[0]["clip_id"]

"""Full-pool evaluation: the table by hand, the rescoring methods, the properties of the
text bias (shift invariance, hub suppression), then the bias job followed by
`jobs/evaluate.py` end to end on the shared local Ray with every file on the S3 server."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from gpa_ray import storage
from gpa_ray.audio.inputs import AudioInputs
from gpa_ray.bias_file import read_bias
from gpa_ray.bias_job import run_bias_job
from gpa_ray.checkpoints import read_config, weights_digest
from gpa_ray.config import ActorPoolConfig, Config, EvalConfig, SinkhornConfig
from gpa_ray.evaluation import (
    METRICS_FILE,
    PLOT_FILE,
    TABLE_FILE,
    EvaluationError,
    Rescoring,
    evaluate_scores,
    markdown_table,
    plot_png,
    recall_curve,
    rescore,
    run_evaluation,
)
from gpa_ray.metrics import audio_to_text_metrics, retrieval_metrics
from gpa_ray.models.factory import load_gpa
from gpa_ray.ray_embedding import read_captions
from gpa_ray.sinkhorn import (
    dual_softmax,
    qb_norm,
    qb_norm_statistics,
    sinkhorn_potentials,
)
from gpa_ray.testing.data import ESC50_POOL_TEST, ESC50_POOL_TRAIN
from gpa_ray.testing.jobs import job_main
from gpa_ray.testing.models import tiny_gpa_checkpoint
from gpa_ray.testing.services import S3Server

N_TRAIN, N_TEST = ESC50_POOL_TRAIN, ESC50_POOL_TEST
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# 3 clips x 6 captions, clip-major (captions 2c, 2c+1 belong to clip c).
R_3X6 = torch.tensor(
    [
        [0.9, 0.2, 0.3, 0.1, 0.5, 0.0],
        [0.4, 0.6, 0.8, 0.7, 0.1, 0.2],
        [0.3, 0.5, 0.2, 0.9, 0.4, 0.6],
    ],
    dtype=torch.float64,
)
CAPTION_TO_CLIP = [0, 0, 1, 1, 2, 2]


def _row(results: dict[str, Any], direction: str, method: str = "none") -> dict[str, Any]:
    (row,) = [r for r in results["rows"] if (r["direction"], r["method"]) == (direction, method)]
    return row


# ---------------------------------------------------------------- without Ray


def test_recall_curve_by_hand() -> None:
    # First ranks 1, 3, 2, 5: R@1 = 1/4, R@2 = 2/4, R@3 = R@4 = 3/4, R@5 = 1.
    assert recall_curve(torch.tensor([1, 3, 2, 5]), 5) == [0.25, 0.5, 0.75, 0.75, 1.0]


def test_table_by_hand() -> None:
    # T2A (columns rank the 3 clips): ranks of the true clip per caption 1, 3, 1, 2, 2, 1 ->
    #   R@1 = 3/6, R@5 = R@10 = 1, mAP@10 = MRR = (1 + 1/3 + 1 + 1/2 + 1/2 + 1)/6 = 0.7222.
    # A2T (rows rank the 6 captions): clip 0's captions rank 1 and 4, clip 1's 1 and 2,
    #   clip 2's 2 and 4 -> R@1 = 2/3, MRR = (1 + 1 + 1/2)/3 = 0.8333,
    #   mAP@10 = ((1 + 2/4)/2 + (1 + 2/2)/2 + (1/2 + 2/4)/2)/3 = 0.75.
    # With the bias b = 0.5 on caption 5 only: clip 0's captions rank 1 and 5, clip 1's 1
    #   and 2.5 (its 0.7 ties caption 5's 0.7: mid-rank; 3 with eval.ties=pessimistic),
    #   clip 2's 1 and 4 -> R@1 = 1, MRR = 1, mAP@10 = ((1 + 2/5)/2 + (1 + 2/2.5)/2 +
    #   (1 + 2/4)/2)/3 (pessimistic: (1 + 2/3)/2 for clip 1).
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.5], dtype=torch.float64)
    results = evaluate_scores(R_3X6, CAPTION_TO_CLIP, ["none", "sinkhorn"], Rescoring(bias=bias))
    t2a = _row(results, "T2A")
    assert [t2a[k] for k in ("R@1", "R@5", "R@10")] == pytest.approx([0.5, 1.0, 1.0])
    assert t2a["mAP@10"] == pytest.approx(4.333333333 / 6) == t2a["MRR"]
    a2t = _row(results, "A2T", "none")
    assert [a2t[k] for k in ("R@1", "R@5", "MRR", "mAP@10")] == pytest.approx(
        [2 / 3, 1.0, 2.5 / 3, 0.75]
    )
    biased = _row(results, "A2T", "sinkhorn")
    assert [biased[k] for k in ("R@1", "MRR")] == pytest.approx([1.0, 1.0])
    assert biased["mAP@10"] == pytest.approx((0.7 + 0.9 + 0.75) / 3)
    pessimistic = evaluate_scores(
        R_3X6, CAPTION_TO_CLIP, ["sinkhorn"], Rescoring(bias=bias), ties="pessimistic"
    )
    assert _row(pessimistic, "A2T", "sinkhorn")["mAP@10"] == pytest.approx((0.7 + 5 / 6 + 0.75) / 3)
    assert results["curves"]["T2A"] == pytest.approx([0.5, 5 / 6, 1.0])
    assert results["curves"]["A2T none"] == pytest.approx([2 / 3, 1, 1, 1, 1, 1])
    # The same numbers as the metrics module's own entry point (bias on A2T only).
    reference = retrieval_metrics(R_3X6, torch.tensor(CAPTION_TO_CLIP), text_bias=bias)
    assert biased["mAP@10"] == pytest.approx(reference["a2t_mAP@10"])
    assert t2a["R@1"] == pytest.approx(reference["t2a_R@1"])


def test_markdown_table_labels_the_leaking_method() -> None:
    results = evaluate_scores(R_3X6, CAPTION_TO_CLIP, ["none", "dual_softmax"])
    table = markdown_table(results["rows"])
    lines = table.splitlines()
    assert lines[0] == "| direction | A2T rescoring | R@1 | R@5 | R@10 | mAP@10 | MRR |"
    assert lines[2] == "| T2A | - | 50.00 | 100.00 | 100.00 | 72.22 | 72.22 |"
    assert lines[3].startswith("| A2T | no rescoring | 66.67 |")
    assert "DSL (leaking" in lines[4]
    assert "uses the other test queries" in table.split("\n\n")[1]
    assert "leaking" not in markdown_table(evaluate_scores(R_3X6, CAPTION_TO_CLIP)["rows"])


def test_rescore_methods() -> None:
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    stats = qb_norm_statistics(bank, beta=5.0, k=2)
    rescoring = Rescoring(qb_norm=stats, qb_norm_beta=5.0, dsl_temperature=0.1)
    assert torch.equal(rescore(R_3X6, "qb_norm", rescoring), qb_norm(R_3X6, bank, 5.0, 2))
    assert torch.equal(rescore(R_3X6, "dual_softmax", rescoring), dual_softmax(R_3X6, 0.1))
    assert rescore(R_3X6, "none", rescoring) is R_3X6
    with pytest.raises(EvaluationError, match="text bias"):
        rescore(R_3X6, "sinkhorn", rescoring)
    with pytest.raises(EvaluationError, match="unknown A2T method"):
        rescore(R_3X6, "bogus", rescoring)


def test_sinkhorn_rescoring_adds_the_text_potential() -> None:
    bank = torch.tensor([[0.9, 0.1, 0.5, 0.4, 0.2, 0.7], [0.3, 0.8, 0.2, 0.6, 0.1, 0.4]])
    _, g = sinkhorn_potentials(bank.double(), 0.05, 10)
    rescored = rescore(R_3X6, "sinkhorn", Rescoring(bias=g))
    assert torch.equal(rescored, R_3X6 + g.to(R_3X6)[None, :])


def test_constant_shift_leaves_a2t_unchanged() -> None:
    # g is invariant to R' + c (the first f absorbs c), so R + c + g ranks as R + g.
    gen = torch.Generator().manual_seed(1)
    test = torch.rand(5, 10, generator=gen, dtype=torch.float64)
    bank = torch.rand(20, 10, generator=gen, dtype=torch.float64)
    target = torch.arange(5).repeat_interleave(2)
    _, g = sinkhorn_potentials(bank, 0.05, 10)
    _, g_shifted = sinkhorn_potentials(bank + 3.0, 0.05, 10)
    assert torch.allclose(g, g_shifted, atol=1e-9)
    plain = evaluate_scores(test, target, ["none", "sinkhorn"], Rescoring(bias=g))
    shifted = evaluate_scores(test + 3.0, target, ["none", "sinkhorn"], Rescoring(bias=g_shifted))
    assert shifted["rows"] == plain["rows"]
    assert torch.equal(torch.argsort(test + g, dim=1), torch.argsort(test + 3.0 + g_shifted, dim=1))


def _hubbed(n_queries: int) -> torch.Tensor:
    """Query q matches text q % 4 (score 0.6), but text 0 scores 0.7 for every query (0.8
    for its own): a hub that wins every query; all other scores 0.1."""
    scores = torch.full((n_queries, 4), 0.1, dtype=torch.float64)
    for q in range(n_queries):
        scores[q, q % 4] = 0.6
        scores[q, 0] = 0.8 if q % 4 == 0 else 0.7
    return scores


def test_bias_lowers_the_share_of_a_hub_text() -> None:
    test, bank = _hubbed(4), _hubbed(8)
    _, g = sinkhorn_potentials(bank, 0.05, 10)
    # Text 0 gets a lower bias than the others by more than the 0.1 it wins by.
    assert float(g[1:].min() - g[0]) > 0.1
    share = float((test.argmax(dim=1) == 0).double().mean())
    share_biased = float(((test + g).argmax(dim=1) == 0).double().mean())
    assert (share, share_biased) == (1.0, 0.25)
    results = evaluate_scores(test, torch.arange(4), ["none", "sinkhorn"], Rescoring(bias=g))
    assert _row(results, "A2T", "none")["R@1"] == 0.25
    assert _row(results, "A2T", "sinkhorn")["R@1"] == 1.0


def test_plot_is_a_png() -> None:
    import matplotlib.image

    results = evaluate_scores(R_3X6, CAPTION_TO_CLIP, ["none", "dual_softmax"])
    data = plot_png(results, "hand case")
    assert data.startswith(PNG_SIGNATURE)
    height, width, _ = matplotlib.image.imread(io.BytesIO(data)).shape
    assert (height, width) == (450, 1200)


def test_unknown_method_is_refused() -> None:
    cfg = Config(eval=EvalConfig(checkpoint="anything", methods=["none", "sinkhorm"]))
    with pytest.raises(EvaluationError, match="sinkhorm"):
        run_evaluation(cfg)


# ---------------------------------------------------------------- real clips, real Ray


def test_missing_bias_is_reported(
    esc50_pool: str, lass_checkpoint: str, s3_server: S3Server, tmp_path: Path
) -> None:
    cfg = Config(
        storage=s3_server.storage,
        eval=EvalConfig(
            checkpoint=lass_checkpoint,
            data=esc50_pool,
            bias=s3_server.uri("bias-eval", "no-bias-here"),
            output=str(tmp_path / "eval"),
        ),
    )
    with pytest.raises(EvaluationError, match="eval.methods=\\[none,dual_softmax\\]"):
        run_evaluation(cfg)


@pytest.mark.slow
@pytest.mark.s3
def test_bias_job_then_evaluate_end_to_end_on_s3(
    ray_session: None, esc50_pool: str, lass_checkpoint: str, s3_server: S3Server
) -> None:
    s3 = s3_server.storage
    bias_uri = s3_server.uri("bias-eval", "bias-job")
    if not storage.exists(storage.join(bias_uri, "bias.json"), s3):
        run_bias_job(
            Config(
                storage=s3,
                sinkhorn=SinkhornConfig(
                    checkpoint=lass_checkpoint,
                    queries=esc50_pool,
                    output=bias_uri,
                    num_actors=2,
                    cpus_per_actor=0.25,
                ),
            )
        )
    output = s3_server.uri("bias-eval", "evaluation")
    argv = [
        "--config",
        "debug",
        *s3_server.overrides(),
        f"eval.checkpoint={lass_checkpoint}",
        f"eval.data={esc50_pool}",
        f"eval.bias={bias_uri}",
        f"eval.output={output}",
    ]
    assert job_main("evaluate")(argv) == 0

    report = json.loads(storage.read_bytes(storage.join(output, METRICS_FILE), s3))
    assert report["pool"]["clips"] == N_TEST and report["pool"]["captions"] == 2 * N_TEST
    assert [(r["direction"], r["method"]) for r in report["rows"]] == [
        ("T2A", "none"),
        ("A2T", "none"),
        ("A2T", "sinkhorn"),
        ("A2T", "qb_norm"),
        ("A2T", "dual_softmax"),
    ]

    # The same numbers from an in-process computation (no Ray): embeddings of the test
    # clips and captions, R, and the bias job's g and QB-Norm statistics on the train clips.
    model, cfg = load_gpa(lass_checkpoint, s3)
    inputs = AudioInputs.from_config(cfg)
    clips = storage.read_parquet(storage.join(esc50_pool, "clips", "esc50", "test"), s3).to_pylist()
    train = storage.read_parquet(
        storage.join(esc50_pool, "clips", "esc50", "train"), s3
    ).to_pylist()
    captions = read_captions(esc50_pool, "test", storage_cfg=s3)
    clip_index = {c["clip_id"]: i for i, c in enumerate(clips)}
    target = torch.tensor([clip_index[c] for c in captions.column("clip_id").to_pylist()])
    # ESC-50's templated captions: a clip's relevant captions include every copy of its
    # sentences on other clips of its category (relevance by identical text).
    caption_texts = captions.column("caption").to_pylist()
    with torch.inference_mode():
        texts = model.embed_text(caption_texts)
        audio = model.embed_audio(inputs.collate([inputs.from_row(c) for c in clips]))
        bank = model.embed_audio(inputs.collate([inputs.from_row(c) for c in train]))
        scores = model.score(audio, texts)
        querybank = model.score(bank, texts)
    _, g = sinkhorn_potentials(querybank, 0.05, 10)
    table, _ = read_bias(bias_uri, s3)
    assert table.column("bias").to_pylist() == pytest.approx(g.tolist(), abs=1e-5)
    expected = retrieval_metrics(scores, target, text_bias=g, caption_texts=caption_texts)
    names = ("R@1", "R@5", "R@10", "mAP@10", "MRR")
    for (direction, method), prefix in (
        (("T2A", "none"), "t2a"),
        (("A2T", "sinkhorn"), "a2t"),
    ):
        row = _row(report, direction, method)
        assert [row[n] for n in names] == pytest.approx([expected[f"{prefix}_{n}"] for n in names])
    for method, rescored in (
        ("none", scores),
        ("qb_norm", qb_norm(scores, querybank, 20.0, 1)),
        ("dual_softmax", dual_softmax(scores, 0.01)),
    ):
        reference = audio_to_text_metrics(rescored, target, len(clips), caption_texts=caption_texts)
        row = _row(report, "A2T", method)
        assert [row[n] for n in names] == pytest.approx([reference[f"a2t_{n}"] for n in names])
    assert _row(report, "A2T", "dual_softmax")["leaking"]

    table_md = storage.read_bytes(storage.join(output, TABLE_FILE), s3).decode()
    assert "Sinkhorn text bias" in table_md and "DSL (leaking" in table_md
    assert storage.read_bytes(storage.join(output, PLOT_FILE), s3).startswith(PNG_SIGNATURE)
    assert storage.exists(storage.join(output, storage.CONFIG_FILE), s3)


@pytest.mark.slow
@pytest.mark.s3
def test_a_rerun_reuses_the_embeddings_and_other_weights_recompute_them(
    ray_session: None,
    esc50_pool: str,
    lass_checkpoint: str,
    s3_server: S3Server,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The evaluation keeps the test pool's embeddings at its output: a rerun reads them
    (no embedding job) and reports the very same table; a checkpoint overwritten with
    other weights at the same URI is recomputed, because the key is the weights digest."""
    s3 = s3_server.storage
    checkpoint = str(tmp_path / "checkpoint")
    model_cfg = read_config(lass_checkpoint, s3)
    tiny_gpa_checkpoint(checkpoint, model_cfg, seed=0)
    cfg = Config(
        storage=s3,
        eval=EvalConfig(
            checkpoint=checkpoint,
            data=esc50_pool,
            output=str(tmp_path / "eval"),
            methods=["none", "dual_softmax"],
            embed_pool=ActorPoolConfig(actors=1, cpus_per_actor=0.5, batch_size=5),
        ),
    )
    caplog.set_level(logging.INFO, logger="gpa_ray")
    first = run_evaluation(cfg)
    assert not first["pool"]["embeddings_reused"]
    caplog.clear()
    again = run_evaluation(cfg)
    assert again["pool"]["embeddings_reused"] and again["rows"] == first["rows"]
    assert "no embedding job" in caplog.text and "embedded " not in caplog.text
    stored = json.loads((tmp_path / "eval" / "embeddings" / "settings.json").read_text())
    assert stored["weights_sha256"] == weights_digest(checkpoint)

    tiny_gpa_checkpoint(checkpoint, model_cfg, seed=1)
    caplog.clear()
    other = run_evaluation(cfg)
    assert not other["pool"]["embeddings_reused"]
    assert "other weights_sha256: recomputing" in caplog.text
    assert other["rows"] != first["rows"]
    assert json.loads((tmp_path / "eval" / "embeddings" / "settings.json").read_text())[
        "weights_sha256"
    ] == weights_digest(checkpoint)

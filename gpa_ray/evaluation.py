"""Full-pool retrieval evaluation: T2A, and A2T with and without text-side rescoring.

The protocol is the DP baseline's (see `gpa_ray.metrics`): every caption of the test split
queries all clips of the split (T2A); every clip queries all captions (A2T). Both read one
score matrix R [clips, captions] of the GPA model (eq 9), computed in blocks. A caption
whose text is identical to one of a clip's own captions is relevant to that clip, and ties
are ranked by `eval.ties` (mid-rank by default).

A2T is reported under each configured method, all from the same R:

- `none`: R as is;
- `sinkhorn`: R + b with the text bias b of the bias job (GPA eq 10; training queries);
- `qb_norm`: QB-Norm's dynamic inverted softmax with the training querybank, from the
  querybank statistics the bias job stored beside the bias (same beta as it used);
- `dual_softmax`: DSL, whose prior is a softmax over the *test* queries. It uses the other
  test queries to score each one, so it is labelled as leaking and is no fair single-query
  setting; it is listed because published comparisons include it.

Outputs under `eval.output` (local or s3://): `metrics.json` (every number, the recall@k
curves, provenance), `metrics.md` (the table), `recall.png` (bars of R@1/5/10 and the
recall@k curves), `config.yaml`, and `embeddings/`: the test pool's embeddings, which a
rerun with the same weights, data and settings reuses instead of embedding again
(`gpa_ray.evaluation_embeddings`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gpa_ray import storage
from gpa_ray.bias_file import BiasFileError, align_to_texts, read_bias
from gpa_ray.config import Config, resolve_stage_uris
from gpa_ray.metrics import (
    TIE_RULES,
    audio_to_text_metrics,
    audio_to_text_ranks,
    text_to_audio_metrics,
    text_to_audio_ranks,
)
from gpa_ray.models.factory import load_gpa
from gpa_ray.sinkhorn import QBNormStats, dual_softmax, qb_norm_apply

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
TABLE_FILE = "metrics.md"
PLOT_FILE = "recall.png"
METRIC_NAMES = ("R@1", "R@5", "R@10", "mAP@10", "MRR")
METHOD_LABELS = {
    "none": "no rescoring",
    "sinkhorn": "Sinkhorn text bias (GPA eq 10)",
    "qb_norm": "QB-Norm, training querybank",
    "dual_softmax": "DSL (leaking: uses the other test queries)",
}
RESCORING_METHODS = tuple(METHOD_LABELS)
LEAKING_METHODS = ("dual_softmax",)
NEEDS_BIAS_OUTPUT = ("sinkhorn", "qb_norm")
MAX_CURVE_K = 50


class EvaluationError(RuntimeError):
    """The evaluation cannot run as configured."""


@dataclasses.dataclass(frozen=True)
class Rescoring:
    """What A2T methods need besides R: the text bias b [J] (sinkhorn), the querybank
    statistics and their beta (qb_norm), the DSL temperature (dual_softmax)."""

    bias: Tensor | None = None
    qb_norm: QBNormStats | None = None
    qb_norm_beta: float = 20.0
    dsl_temperature: float = 0.01


def rescore(scores: Tensor, method: str, rescoring: Rescoring) -> Tensor:
    """A2T scores [clips, captions] under `method` (see the module docstring)."""
    if method == "none":
        return scores
    if method == "sinkhorn":
        if rescoring.bias is None:
            raise EvaluationError("method 'sinkhorn' needs the text bias of the bias job")
        return scores + rescoring.bias.to(scores)[None, :]
    if method == "qb_norm":
        if rescoring.qb_norm is None:
            raise EvaluationError("method 'qb_norm' needs the querybank statistics of the bias job")
        return qb_norm_apply(scores, rescoring.qb_norm, rescoring.qb_norm_beta)
    if method == "dual_softmax":
        return dual_softmax(scores, rescoring.dsl_temperature)
    raise EvaluationError(f"unknown A2T method {method!r}; choose from {RESCORING_METHODS}")


def recall_curve(first_ranks: Tensor, max_k: int) -> list[float]:
    """R@k for k = 1..max_k from each query's rank of its first relevant item."""
    ranks = first_ranks.reshape(-1, 1).double()
    ks = torch.arange(1, max_k + 1, dtype=torch.float64)[None, :]
    return (ranks <= ks).double().mean(dim=0).tolist()


def _row(direction: str, method: str, metrics: dict[str, float], prefix: str) -> dict[str, Any]:
    label = "-" if direction == "T2A" else METHOD_LABELS[method]
    row: dict[str, Any] = {
        "direction": direction,
        "method": method,
        "label": label,
        "leaking": method in LEAKING_METHODS,
    }
    row.update({name: metrics[f"{prefix}_{name}"] for name in METRIC_NAMES})
    return row


def evaluate_scores(
    scores: Tensor,
    caption_to_clip: Tensor | Sequence[int],
    methods: Sequence[str] = ("none",),
    rescoring: Rescoring | None = None,
    block_size: int = 1024,
    ties: str = "mid",
    caption_texts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """T2A once, A2T under every method, from R [clips, captions].

    `ties` and `caption_texts` (relevance by identical text) as in `gpa_ray.metrics`.
    Returns {"rows": [one dict per table row], "curves": {row name: [R@1..R@max_k]}}.
    """
    rescoring = rescoring or Rescoring()
    rank_options = {"ties": ties, "caption_texts": caption_texts}
    target = torch.as_tensor(caption_to_clip, dtype=torch.long)
    n_clips, n_captions = scores.shape
    t2a_k = min(MAX_CURVE_K, n_clips)
    a2t_k = min(MAX_CURVE_K, n_captions)
    t2a_scores = scores.T
    t2a = text_to_audio_metrics(t2a_scores, target, block_size, **rank_options)
    rows = [_row("T2A", "none", t2a, "t2a")]
    curves = {
        "T2A": recall_curve(
            text_to_audio_ranks(t2a_scores, target, block_size, **rank_options), t2a_k
        )
    }
    for method in methods:
        a2t = rescore(scores, method, rescoring)
        metrics = audio_to_text_metrics(a2t, target, n_clips, block_size, **rank_options)
        rows.append(_row("A2T", method, metrics, "a2t"))
        ranks, valid = audio_to_text_ranks(a2t, target, n_clips, block_size, **rank_options)
        first = ranks[valid[:, 0], 0]
        curves[f"A2T {method}"] = recall_curve(first, a2t_k)
    return {"rows": rows, "curves": curves}


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The result rows as a markdown table (metrics in percent, two decimals)."""
    header = ["direction", "A2T rescoring", *METRIC_NAMES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        values = [f"{100 * row[name]:.2f}" for name in METRIC_NAMES]
        lines.append("| " + " | ".join([row["direction"], row["label"], *values]) + " |")
    if any(row["leaking"] for row in rows):
        lines.append("")
        lines.append(
            "DSL rescales each caption's scores by a softmax over all test clips, so it uses "
            "the other test queries: not a fair single-query setting, listed for comparison."
        )
    return "\n".join(lines) + "\n"


def plot_png(results: dict[str, Any], title: str = "") -> bytes:
    """Bars of R@1/5/10 per table row and the recall@k curves, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    names = ["T2A" if r["direction"] == "T2A" else f"A2T {r['method']}" for r in rows]
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / 3
    for i, metric in enumerate(("R@1", "R@5", "R@10")):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        bars.bar(xs, [100 * r[metric] for r in rows], width, label=metric)
    bars.set_xticks(range(len(rows)))
    bars.set_xticklabels(
        [f"{n}\n(leaking)" if r["leaking"] else n for n, r in zip(names, rows, strict=True)],
        fontsize=8,
    )
    bars.set_ylabel("recall (%)")
    bars.set_ylim(0, 115)
    bars.legend(ncol=3, loc="upper center", fontsize=8)
    bars.set_title("R@1 / R@5 / R@10")
    for name, values in results["curves"].items():
        style = "--" if name.split(" ")[-1] in LEAKING_METHODS else "-"
        curves.plot(range(1, len(values) + 1), [100 * v for v in values], style, label=name)
    curves.set_xlabel("k")
    curves.set_ylabel("R@k (%)")
    curves.set_ylim(0, 100)
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    curves.set_title("recall@k")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def caption_index(clip_ids: Sequence[str], caption_clip_ids: Sequence[str]) -> Tensor:
    """caption_to_clip: the position in `clip_ids` of each caption's clip."""
    position = {clip: i for i, clip in enumerate(clip_ids)}
    missing = sorted({c for c in caption_clip_ids if c not in position})
    if missing:
        raise EvaluationError(f"captions of clips that were not embedded: {missing[:3]}")
    return torch.tensor([position[c] for c in caption_clip_ids], dtype=torch.long)


def _rescoring(
    cfg: Config, methods: Sequence[str], text_ids: Sequence[str]
) -> tuple[Rescoring, dict[str, Any] | None]:
    """The bias job's output aligned to the test captions, if a method needs it."""
    dsl = cfg.eval.dsl_temperature
    if not any(m in NEEDS_BIAS_OUTPUT for m in methods):
        return Rescoring(dsl_temperature=dsl), None
    uri = cfg.eval.bias
    try:
        table, metadata = read_bias(uri, cfg.storage)
        bias = align_to_texts(table, "bias", text_ids)
        lse = align_to_texts(table, "qb_lse", text_ids)
        active = align_to_texts(table, "qb_active", text_ids).bool()
    except BiasFileError as exc:
        raise EvaluationError(
            f"{exc}; or leave the bias out with eval.methods=[none,dual_softmax]"
        ) from exc
    rescoring = Rescoring(
        bias=bias,
        qb_norm=QBNormStats(lse, active),
        qb_norm_beta=float(metadata["qb_norm"]["beta"]),
        dsl_temperature=dsl,
    )
    return rescoring, {"uri": uri, "metadata": metadata}


def _write_report(cfg: Config, report: dict[str, Any], results: dict[str, Any], title: str) -> str:
    """`metrics.json`, `metrics.md` and `recall.png` under `eval.output`; returns the table."""
    ev = cfg.eval
    table = markdown_table(results["rows"])
    storage.write_bytes(
        storage.join(ev.output, METRICS_FILE), json.dumps(report, indent=2).encode(), cfg.storage
    )
    storage.write_bytes(storage.join(ev.output, TABLE_FILE), table.encode(), cfg.storage)
    storage.write_bytes(storage.join(ev.output, PLOT_FILE), plot_png(results, title), cfg.storage)
    return table


def run_evaluation(cfg: Config) -> dict[str, Any]:
    """Evaluate the configured checkpoint on the full test pool and write the report."""
    from gpa_ray.evaluation_embeddings import pool_embeddings
    from gpa_ray.ray_embedding import read_captions, start_embedding_job

    cfg = resolve_stage_uris(cfg)
    ev = cfg.eval
    unknown = [m for m in ev.methods if m not in RESCORING_METHODS]
    if unknown:
        raise EvaluationError(f"unknown eval.methods {unknown}; choose from {RESCORING_METHODS}")
    if ev.ties not in TIE_RULES:
        raise EvaluationError(f"unknown eval.ties {ev.ties!r}; choose one of {TIE_RULES}")
    if not ev.checkpoint:
        raise EvaluationError("set eval.checkpoint (or sinkhorn.checkpoint) to a GPA checkpoint")
    started = time.perf_counter()
    checkpoint = start_embedding_job(
        cfg, ev.checkpoint, ev.embed_pool, "eval.embed_pool", ev.output
    )

    captions = read_captions(ev.data, ev.split, ev.corpus, cfg.storage)
    text_ids = captions.column("text_id").to_pylist()
    rescoring, bias_info = _rescoring(cfg, ev.methods, text_ids)
    embedded = pool_embeddings(cfg, checkpoint, captions)
    clip_ids = embedded.clip_ids
    if not embedded.reused:
        logger.info("embedded %d test clips and %d captions", len(clip_ids), len(text_ids))
    target = caption_index(clip_ids, captions.column("clip_id").to_pylist())
    model, _ = load_gpa(checkpoint, cfg.storage, "cpu")
    with torch.inference_mode():
        scores = model.score_pool(embedded.audio, embedded.texts, ev.block_size)
    texts = captions.column("caption").to_pylist()
    results = evaluate_scores(
        scores, target, ev.methods, rescoring, ev.block_size, ev.ties, caption_texts=texts
    )
    pool = {
        "data": ev.data,
        "split": ev.split,
        "corpus": ev.corpus,
        "clips": len(clip_ids),
        "captions": len(text_ids),
        "embeddings_reused": embedded.reused,
    }
    report = {
        "checkpoint": checkpoint,
        "pool": pool,
        "bias": bias_info,
        **results,
        "seconds": round(time.perf_counter() - started, 3),
    }
    title = f"{len(clip_ids)} clips x {len(text_ids)} captions ({ev.split})"
    table = _write_report(cfg, report, results, title)
    logger.info("evaluation of %s on %s:\n%s", checkpoint, title, table)
    return {"output": ev.output, "pool": pool, "rows": results["rows"]}

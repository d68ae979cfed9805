"""Validation A2T under the Sinkhorn text bias, for sweeps that vary `sinkhorn.epsilon`.

Epsilon does not change training: it shapes the text bias b the bias job derives from
the model (GPA eq 10, `gpa_ray.sinkhorn`). To rank epsilons per epoch, each checkpoint
is scored as the bias job and evaluation would: the first `sweep.bias_queries` clips of
the training split are the querybank, Sinkhorn over R' [querybank x validation captions]
gives b, and A2T over the validation clips is ranked on R + b (`evaluation.rescore`).
Everything runs in the calling process, on CPU: meant for the small validation splits
of a sweep, not for a paper-scale pool (the bias job is the distributed version).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gpa_ray import storage
from gpa_ray.audio.inputs import AudioInputs
from gpa_ray.config import Config
from gpa_ray.data.loaders import LoaderError, split_files
from gpa_ray.evaluation import METRIC_NAMES, Rescoring, caption_index, evaluate_scores
from gpa_ray.models.factory import load_gpa
from gpa_ray.models.gpa import Embeddings, GPAModel
from gpa_ray.sinkhorn import sinkhorn_potentials

PREFIX = "val_a2t_sinkhorn_"
_BATCH = 16


def _clips(cfg: Config, split: str, column: str, limit: int | None) -> pa.Table:
    """`clip_id`, `captions` and the tower's input column of a split, in file order."""
    files = split_files(cfg.train.data, split, cfg.train.corpus, cfg.storage)
    if not files:
        raise LoaderError(f"no clip shards of split {split!r} under {cfg.train.data}")
    tables, rows = [], 0
    for uri in files:
        fs, path = storage.resolve(uri, cfg.storage)
        table = pq.read_table(path, filesystem=fs, columns=["clip_id", "captions", column])
        tables.append(table)
        rows += table.num_rows
        if limit is not None and rows >= limit:
            break
    table = pa.concat_tables(tables)
    return table if limit is None else table.slice(0, limit)


def _embed_audio(
    model: GPAModel, inputs: AudioInputs, rows: Sequence[dict[str, Any]]
) -> Embeddings:
    parts = [
        model.embed_audio(inputs.collate([inputs.from_row(r) for r in rows[i : i + _BATCH]]))
        for i in range(0, len(rows), _BATCH)
    ]
    return Embeddings.cat(parts)


def _embed_text(model: GPAModel, texts: Sequence[str]) -> Embeddings:
    parts = [model.embed_text(list(texts[i : i + _BATCH])) for i in range(0, len(texts), _BATCH)]
    return Embeddings.cat(parts)


def sinkhorn_val_metrics(checkpoint: str, cfg: Config) -> dict[str, float]:
    """`val_a2t_sinkhorn_<R@1, R@5, R@10, mAP@10, MRR>` of a GPA checkpoint with the
    bias of `cfg.sinkhorn.epsilon` / `n_iter` (see the module docstring)."""
    model, model_cfg = load_gpa(checkpoint, cfg.storage, "cpu")
    inputs = AudioInputs.from_config(model_cfg)
    column = "codes" if inputs.needs_codes else "audio"
    bank = _clips(cfg, cfg.train.train_split, column, cfg.sweep.bias_queries).to_pylist()
    val = _clips(cfg, cfg.train.val_split, column, None).to_pylist()
    texts = [caption for row in val for caption in row["captions"]]
    owners = [row["clip_id"] for row in val for _ in row["captions"]]
    block = cfg.eval.block_size
    with torch.inference_mode():
        text_emb = _embed_text(model, texts)
        querybank = model.score_pool(_embed_audio(model, inputs, bank), text_emb, block)
        _, bias = sinkhorn_potentials(querybank, cfg.sinkhorn.epsilon, cfg.sinkhorn.n_iter)
        scores = model.score_pool(_embed_audio(model, inputs, val), text_emb, block)
    target = caption_index([row["clip_id"] for row in val], owners)
    results = evaluate_scores(
        scores,
        target,
        ["sinkhorn"],
        Rescoring(bias=bias),
        block,
        cfg.eval.ties,
        caption_texts=texts,
    )
    row = next(r for r in results["rows"] if r["method"] == "sinkhorn")
    return {f"{PREFIX}{name}": float(row[name]) for name in METRIC_NAMES}

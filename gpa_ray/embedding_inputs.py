"""What stored embeddings were computed from, so that a rerun reuses them only when
nothing they depend on changed. Evaluation (`gpa_ray.evaluation_embeddings`) and the bias
job (`gpa_ray.bias_progress`) both keep the embeddings they computed at their output and
key them by this record:

- the checkpoint's weights (SHA-256 of `model.pt`) and its `config.yaml` (the audio
  preprocessing the embedders apply comes from it), not its URI: a run that trained
  further, or a checkpoint overwritten in place, has other weights;
- per input: its data URI, split and corpus, and every clip shard read with its size (a
  re-ingest under the same URI shows);
- the embedding batch size (batches are padded to their longest item, so it can move
  the last float bits).
"""

from __future__ import annotations

import hashlib
from typing import Any

from gpa_ray import storage
from gpa_ray.checkpoints import CONFIG_FILE, weights_digest
from gpa_ray.config import StorageConfig
from gpa_ray.data.loaders import split_files


def shard_sizes(files: list[str], storage_cfg: StorageConfig) -> list[list[Any]]:
    """[[uri, bytes], ...] of the clip shards, from one listing request."""
    if not files:
        return []
    fs, _ = storage.resolve(files[0], storage_cfg)
    infos = fs.get_file_info([storage.resolve(uri, storage_cfg)[1] for uri in files])
    return [[uri, info.size] for uri, info in zip(files, infos, strict=True)]


def embedding_inputs(
    checkpoint: str,
    inputs: dict[str, tuple[str, str, str]],
    batch_size: int,
    storage_cfg: StorageConfig,
) -> dict[str, Any]:
    """The record (see the module docstring) for embeddings of `inputs` (name ->
    (data URI, split, corpus)) made with `checkpoint` in batches of `batch_size`."""
    model_config = storage.read_bytes(storage.join(checkpoint, CONFIG_FILE), storage_cfg)
    record: dict[str, Any] = {
        "weights_sha256": weights_digest(checkpoint, storage_cfg),
        "model_config_sha256": hashlib.sha256(model_config).hexdigest(),
        "batch_size": batch_size,
    }
    for name, (data, split, corpus) in inputs.items():
        files = split_files(data, split, corpus, storage_cfg)
        record[name] = {
            "data": data,
            "split": split,
            "corpus": corpus,
            "shards": shard_sizes(files, storage_cfg),
        }
    return record

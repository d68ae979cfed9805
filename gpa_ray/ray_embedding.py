"""GPA embeddings of clips and captions on Ray Data actor pools.

Evaluation and the Sinkhorn bias job embed whole splits of an ingest output the same way:
`map_batches` with an embedder class on an `ActorPoolStrategy` of fractional-CPU actors
(`ActorPoolConfig`: actors, CPUs per actor, rows per model call), each actor loading the
GPA checkpoint once and running torch on as many threads as it holds CPUs. Clips go
through `AudioInputs`, the one preprocessing path of training, indexing and serving.
Results are Arrow tables in the `gpa_ray.embedding_table` layout.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gpa_ray import storage
from gpa_ray.audio.inputs import AudioInputs
from gpa_ray.checkpoints import read_config, resolve_checkpoint
from gpa_ray.config import ActorPoolConfig, Config, StorageConfig
from gpa_ray.data.loaders import LoaderError, ordered, read_clips, split_files
from gpa_ray.data.schema import text_id
from gpa_ray.embedding_table import embedding_table, embeddings_from_table
from gpa_ray.models.factory import load_gpa
from gpa_ray.models.gpa import Embeddings

if TYPE_CHECKING:
    import ray.data


class EmbeddingError(RuntimeError):
    """An embedding dataset does not hold the rows it was asked for."""


def torch_threads(cpus: float) -> int:
    """Torch threads for an actor holding `cpus` CPUs (1 below one CPU: more threads on a
    shared core only contend)."""
    return max(1, int(cpus))


def start_embedding_job(
    cfg: Config, checkpoint: str, pool: ActorPoolConfig, pool_key: str, output: str
) -> str:
    """What evaluation and the bias job do first: refuse a GPU pool, resolve `checkpoint`
    (a run URI: its best checkpoint) and write the resolved config under `output`.
    Returns the concrete checkpoint URI every actor loads."""
    check_cpu_pool(pool, pool_key)
    resolved = resolve_checkpoint(checkpoint, "best", cfg.storage)
    storage.dump_config(cfg, storage.join(output, storage.CONFIG_FILE))
    return resolved


def check_cpu_pool(pool: ActorPoolConfig, key: str) -> None:
    """The GPA embedders run on CPU; refuse a GPU request (`key`: the pool's config key)
    rather than ignore it."""
    if pool.gpus_per_actor > 0:
        raise ValueError(
            f"{key}.gpus_per_actor={pool.gpus_per_actor}: GPA embedding actors run on CPU "
            "only (GPUs are used by ingest and training); set it to 0"
        )


class _CheckpointEmbedder:
    """Loads the GPA checkpoint once per Ray Data actor."""

    def __init__(self, checkpoint: str, storage_cfg: StorageConfig, cpus: float) -> None:
        torch.set_num_threads(torch_threads(cpus))
        self.model, self.model_cfg = load_gpa(checkpoint, storage_cfg, "cpu")


class ClipEmbedder(_CheckpointEmbedder):
    """Ray Data callable: clip-shard rows (`clip_id`, `audio` or `codes`) -> embeddings."""

    def __init__(self, checkpoint: str, storage_cfg: StorageConfig, cpus: float) -> None:
        super().__init__(checkpoint, storage_cfg, cpus)
        self.inputs = AudioInputs.from_config(self.model_cfg)

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        inputs = self.inputs.collate([self.inputs.from_row(row) for row in rows])
        emb = self.model.embed_audio(inputs)
        return embedding_table([row["clip_id"] for row in rows], "clip_id", emb)


class TextEmbedder(_CheckpointEmbedder):
    """Ray Data callable: (`text_id`, `caption`) rows -> embeddings."""

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        emb = self.model.embed_text(batch.column("caption").to_pylist())
        return embedding_table(batch.column("text_id").to_pylist(), "text_id", emb)


class FileEmbedder:
    """Ray Data callable: `source_uri` rows (audio files, local or s3://) -> their
    embeddings through the Python API (`gpa_ray.api.embed_files_table`), so each file gets
    the very bits `GPA.embed_audio` gives it in any process; unreadable files get an
    `error` instead of stopping the job."""

    def __init__(
        self, checkpoint: str, storage_cfg: StorageConfig, cpus: float, batch_size: int
    ) -> None:
        from gpa_ray.api import GPA
        from gpa_ray.models.factory import load_gpa_checkpoint

        torch.set_num_threads(torch_threads(cpus))
        loaded = load_gpa_checkpoint(checkpoint, storage_cfg, "cpu")
        self.model = GPA(loaded, device="cpu", batch_size=batch_size, storage_cfg=storage_cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from gpa_ray.api import FILE_ID_COLUMN, embed_files_table

        return embed_files_table(self.model, batch.column(FILE_ID_COLUMN).to_pylist())


def embed_files(
    checkpoint: str,
    uris: Sequence[str],
    *,
    batch_size: int,
    pool: ActorPoolConfig | None = None,
    storage_cfg: StorageConfig | None = None,
) -> Iterator[pa.Table]:
    """`gpa_ray.api.embed_files_table` of every file on a Ray Data actor pool, streamed
    back to the driver in input order, one table per `pool.batch_size` files (the model
    itself runs `batch_size` rows per call). `checkpoint` must be a resolved checkpoint."""
    import ray

    from gpa_ray.api import FILE_ID_COLUMN

    pool = pool or ActorPoolConfig()
    check_cpu_pool(pool, "embed pool")
    storage_cfg = storage_cfg or StorageConfig()
    step = max(1, pool.batch_size)
    blocks = [
        pa.table({FILE_ID_COLUMN: list(uris[i : i + step])}) for i in range(0, len(uris), step)
    ]
    dataset = ordered(ray.data.from_arrow(blocks))
    embedded = _on_actor_pool(dataset, FileEmbedder, checkpoint, pool, storage_cfg, batch_size)
    yield from embedded.iter_batches(batch_size=None, batch_format="pyarrow")


def audio_columns(checkpoint: str, storage_cfg: StorageConfig | None = None) -> list[str]:
    """Clip columns the checkpoint's audio tower needs: `codes` (AudioFormer) or `audio`."""
    needs_codes = AudioInputs.from_config(read_config(checkpoint, storage_cfg)).needs_codes
    return ["clip_id", "codes" if needs_codes else "audio"]


def _on_actor_pool(
    dataset: ray.data.Dataset,
    embedder: type,
    checkpoint: str,
    pool: ActorPoolConfig,
    storage_cfg: StorageConfig,
    *extra_args: object,
) -> ray.data.Dataset:
    """`dataset` embedded by `embedder` actors, each loading the checkpoint once
    (constructed with the checkpoint, storage, CPUs per actor, then `extra_args`)."""
    import ray

    return dataset.map_batches(
        embedder,
        fn_constructor_args=(checkpoint, storage_cfg, pool.cpus_per_actor, *extra_args),
        batch_format="pyarrow",
        batch_size=pool.batch_size,
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        num_cpus=pool.cpus_per_actor,
    )


def embed_clips(
    checkpoint: str,
    data: str,
    split: str,
    *,
    corpus: str = "",
    pool: ActorPoolConfig | None = None,
    storage_cfg: StorageConfig | None = None,
) -> ray.data.MaterializedDataset:
    """Every clip of one split of an ingest output, embedded on a Ray Data actor pool.

    Returns a materialised Dataset (`clip_id`, `global`, `prototypes`) whose blocks stay in
    the object store. `checkpoint` must be a resolved checkpoint directory.
    """
    storage_cfg = storage_cfg or StorageConfig()
    clips = read_clips(
        data,
        split,
        corpus=corpus,
        columns=audio_columns(checkpoint, storage_cfg),
        storage_cfg=storage_cfg,
    )
    pool = pool or ActorPoolConfig()
    return _on_actor_pool(clips, ClipEmbedder, checkpoint, pool, storage_cfg).materialize()


def read_captions(
    data: str, split: str, corpus: str = "", storage_cfg: StorageConfig | None = None
) -> pa.Table:
    """(`text_id`, `clip_id`, `caption`) for every caption of a split, clip-major, in file
    order. Only two small columns are read, never audio or codes."""
    files = split_files(data, split, corpus, storage_cfg)
    if not files:
        where = storage.join(data, "clips", corpus or "*", split)
        raise LoaderError(f"no clip shards found at {where}; run ingest first")
    ids: list[str] = []
    clip_ids: list[str] = []
    captions: list[str] = []
    for uri in files:
        fs, path = storage.resolve(uri, storage_cfg)
        for row in pq.read_table(path, filesystem=fs, columns=["clip_id", "captions"]).to_pylist():
            for index, caption in enumerate(row["captions"]):
                ids.append(text_id(row["clip_id"], index))
                clip_ids.append(row["clip_id"])
                captions.append(caption)
    if not ids:
        raise LoaderError(f"split {split!r} under {data} has no captions")
    return pa.table({"text_id": ids, "clip_id": clip_ids, "caption": captions})


def embed_captions(
    checkpoint: str,
    captions: pa.Table,
    *,
    pool: ActorPoolConfig | None = None,
    storage_cfg: StorageConfig | None = None,
) -> Embeddings:
    """Embeddings of `captions` (`text_id`, `caption`) on a Ray Data actor pool, gathered
    on the driver in the table's row order."""
    import ray

    storage_cfg = storage_cfg or StorageConfig()
    texts = ordered(ray.data.from_arrow(captions.select(["text_id", "caption"])))
    pool = pool or ActorPoolConfig()
    dataset = _on_actor_pool(texts, TextEmbedder, checkpoint, pool, storage_cfg)
    return fetch_embeddings_in_order(dataset, "text_id", captions.column("text_id").to_pylist())


def fetch_embeddings(dataset: ray.data.Dataset, id_column: str) -> tuple[list[str], Embeddings]:
    """Bring an embedding dataset to the driver: (ids, Embeddings) in the dataset's order."""
    import ray

    table = pa.concat_tables(ray.get(list(dataset.to_arrow_refs())))
    return table.column(id_column).to_pylist(), embeddings_from_table(table)


def fetch_embeddings_in_order(
    dataset: ray.data.Dataset, id_column: str, order: Sequence[str]
) -> Embeddings:
    """Bring an embedding dataset to the driver, in the order of the ids `order`."""
    ids, emb = fetch_embeddings(dataset, id_column)
    position = {item: i for i, item in enumerate(ids)}
    missing = [item for item in order if item not in position]
    if missing or len(ids) != len(order):
        raise EmbeddingError(
            f"embedding dataset has {len(ids)} rows for {len(order)} ids "
            f"(missing e.g. {missing[:3]})"
        )
    return emb[torch.tensor([position[item] for item in order], dtype=torch.long)]

"""Helpers for tests and demos: the shared local Ray, the local S3 server, real test data.

These are real components (a real Ray cluster on loopback, a real S3 HTTP endpoint from
moto's server, real audio from the shared data folder), sized for a 2-core machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gpa_ray.config import StorageConfig
from gpa_ray.jobs_cli import set_ray_process_env

SHARED_DATA_ENV = "GPA_RAY_SHARED_DATA"
TEST_BUCKET = "gpa-ray-test"
ESC50_POOL_TRAIN, ESC50_POOL_TEST = 12, 4
"""Real ESC-50 clips in the tests' small retrieval pool (the `esc50_pool` fixture): training
queries for the bias job, and test clips (two captions each) for evaluation."""


def shared_data_dir() -> Path:
    """Folder of real test audio: `$GPA_RAY_SHARED_DATA`, else `../shared/data` from the repo."""
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def loopback_ray_env() -> None:
    """Environment that keeps a local Ray on 127.0.0.1 and without token auth (tests only),
    plus the project's own Ray process environment (what the jobs run with)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    set_ray_process_env()


def start_local_ray(num_cpus: int = 2) -> None:
    """Start (or join) the one embedded local Ray that a test session shares."""
    import ray

    loopback_ray_env()
    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=True,
            object_store_memory=512 * 1024 * 1024,
        )


@dataclass(frozen=True)
class S3Server:
    """A running S3 HTTP endpoint on loopback and the storage config that reaches it."""

    endpoint_url: str
    bucket: str
    storage: StorageConfig

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *[p.strip("/") for p in parts]])

    def overrides(self) -> list[str]:
        """Dotted config overrides that point a job's `storage` section at this server."""
        s = self.storage
        return [
            f"storage.endpoint_url={s.endpoint_url}",
            f"storage.region={s.region}",
            f"storage.access_key_id={s.access_key_id}",
            f"storage.secret_access_key={s.secret_access_key}",
        ]


@contextmanager
def local_s3_server(bucket: str = TEST_BUCKET) -> Iterator[S3Server]:
    """Run moto's real S3 server on 127.0.0.1 (free port) with one bucket created."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **creds).create_bucket(
            Bucket=bucket
        )
        storage = StorageConfig(
            endpoint_url=endpoint,
            region="us-east-1",
            access_key_id="testing",
            secret_access_key="testing",
        )
        yield S3Server(endpoint_url=endpoint, bucket=bucket, storage=storage)
    finally:
        server.stop()


_TINY_VOCABULARY = """
a the of and is in on with while then dog cat bird car engine rain water wind door bell
siren man woman child people music piano guitar drum voice speaks talks barks sings plays
runs passes falls knocks rings chirps loud quiet distant close street room roof crowd
applause footsteps birds dogs cars
"""
TINY_WORDS = tuple(_TINY_VOCABULARY.split())
TINY_AUDIO_MELS = 32
"""Mel bins of the tiny audio encoder's log-mel input ([B, T >= 32, 32])."""


def tiny_tokenizer() -> object:
    """A real WordPiece (whole-word) fast tokenizer over `TINY_WORDS`, BERT special tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {word: i for i, word in enumerate([*specials, *TINY_WORDS])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def tiny_bert(seed: int = 0, dropout: float = 0.1) -> object:
    """A randomly initialised 2-layer, 32-wide BERT over `tiny_tokenizer`'s vocabulary."""
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=len(tiny_tokenizer()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return BertModel(config)


def tiny_text_encoder(
    trainable_layers: int = -1, pooling: str = "cls", max_length: int = 16, seed: int = 0
) -> object:
    """A `TextEncoder` over a randomly initialised 2-layer, 32-wide BERT (seeded)."""
    from gpa_ray.models.text import TextEncoder

    return TextEncoder(
        tiny_bert(seed=seed),
        tiny_tokenizer(),
        max_length=max_length,
        pooling=pooling,
        trainable_layers=trainable_layers,
    )


def tiny_audio_encoder(seed: int = 0) -> object:
    """A PANNs CNN14 at width 2 (64-d frames, 1/32 time rate) on 32-bin log-mel, seeded."""
    import torch

    from gpa_ray.models.audio_cnn import Cnn14

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Cnn14(n_mels=TINY_AUDIO_MELS, width=2, dropout=0.0)


def tiny_audio_batch(batch: int = 3, frames: int = 96, seed: int = 0) -> dict[str, object]:
    """Keyword inputs for `tiny_audio_encoder()`: random log-mel and ragged `lengths`."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    logmel = torch.randn(batch, frames, TINY_AUDIO_MELS, generator=gen)
    lengths = torch.tensor([frames - (i * 32) % frames for i in range(batch)])
    return {"logmel": logmel, "lengths": lengths}


def tiny_gpa_config(**overrides: object) -> object:
    """`GPAConfig` sized for tests (embed_dim 16, K = 3); keyword overrides replace fields."""
    import dataclasses

    from gpa_ray.config import GPAConfig

    return dataclasses.replace(GPAConfig(embed_dim=16, n_prototypes=3), **overrides)


def tiny_gpa_model(
    cfg: object | None = None, text_trainable_layers: int = -1, seed: int = 0
) -> object:
    """A `GPAModel` from tiny real towers (CNN14 width 2, 2-layer BERT), seeded."""
    import torch

    from gpa_ray.models.gpa import GPAModel

    audio = tiny_audio_encoder(seed)
    text = tiny_text_encoder(trainable_layers=text_trainable_layers, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GPAModel(cfg or tiny_gpa_config(), audio, text)


def tiny_audio_cnn(kind: str = "cnn14", n_mels: int = TINY_AUDIO_MELS, seed: int = 0) -> object:
    """A PANNs `cnn14` or `resnet38` at width 8 (256-d frames, 1/32 time rate), seeded."""
    import torch

    from gpa_ray.models.audio_cnn import build_audio_cnn

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_audio_cnn(kind, n_mels=n_mels, width=8)


def tiny_spectrogram_resnet(
    n_mels: int = TINY_AUDIO_MELS, channels: str = "repeat", seed: int = 0
) -> object:
    """A 4-stage bottleneck ResNet (widths 8..32, one block each) on spectrograms, seeded."""
    import torch
    from transformers import ResNetConfig

    from gpa_ray.models.spectrogram_vision import build_spectrogram_vision

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_spectrogram_vision("resnet50", n_mels=n_mels, config=config, channels=channels)


def tiny_spectrogram_vit(
    n_mels: int = TINY_AUDIO_MELS, channels: str = "repeat", seed: int = 0
) -> object:
    """A 2-layer, 32-wide ViT with 8x8 patches (32x32 position grid) on spectrograms, seeded."""
    import torch
    from transformers import ViTConfig

    from gpa_ray.models.spectrogram_vision import build_spectrogram_vision

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_spectrogram_vision("vit_b16", n_mels=n_mels, config=config, channels=channels)


def tiny_audioformer_config(**overrides: object) -> object:
    """`AudioFormerConfig` for tests: 2 layers x 32 x 2 heads, 128 positions."""
    import dataclasses

    from gpa_ray.config import AudioFormerConfig

    base = AudioFormerConfig(
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=128
    )
    return dataclasses.replace(base, **overrides)


def tiny_audioformer_encoder(seed: int = 0) -> object:
    """An `AudioFormerEncoder` (tiny RoFormer over EnCodec token ids), seeded."""
    import torch

    from gpa_ray.models.audioformer import AudioFormerEncoder

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AudioFormerEncoder.from_config(tiny_audioformer_config())


def tiny_code_ids(batch: int = 3, n_codes: int = 40, seed: int = 0, ragged: bool = True) -> object:
    """Random AudioFormer id sequences [B, n_codes + 2]: BOA codes EOA, PAD-ragged if asked."""
    import torch

    from gpa_ray.audio.codec import BOA, CODE_OFFSET, CODEBOOK_SIZE, EOA, PAD

    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, CODEBOOK_SIZE, (batch, n_codes), generator=gen) + CODE_OFFSET
    ids = torch.full((batch, n_codes + 2), PAD, dtype=torch.long)
    for b in range(batch):
        n = n_codes - (b * n_codes // (2 * batch) if ragged else 0)
        ids[b, 0] = BOA
        ids[b, 1 : n + 1] = codes[b, :n]
        ids[b, n + 1] = EOA
    return ids


def tiny_gpa_run_config(text_model: str, scorer: str = "lass", **sections: object) -> object:
    """A full `Config` that `build_gpa` turns into a tiny GPA: CNN14 width 2 on 32-bin
    log-mel of 2 s of audio, the tiny BERT at `text_model` (see `save_tiny_text_model`),
    embed_dim 16, K = 3. `sections` replace whole config sections (e.g. `storage=...`)."""
    import dataclasses

    from gpa_ray.config import AudioConfig, AudioEncoderConfig, Config, FeaturesConfig, TextConfig

    return dataclasses.replace(
        Config(
            audio=AudioConfig(max_seconds=2.0),
            features=FeaturesConfig(n_mels=TINY_AUDIO_MELS),
            audio_encoder=AudioEncoderConfig(kind="cnn14", width=2, dropout=0.0),
            text=TextConfig(model=text_model, max_length=16, pooling="cls", trainable_layers=-1),
            gpa=tiny_gpa_config(scorer=scorer),
        ),
        **sections,
    )


def tiny_gpa_checkpoint(
    uri: str, cfg: object, storage_cfg: StorageConfig | None = None, seed: int = 0
) -> object:
    """Build the GPA of `cfg` with seeded random weights, save it at `uri` with `save_gpa`
    (local or s3://) and return the model (in eval mode)."""
    import torch

    from gpa_ray.checkpoints import save_gpa
    from gpa_ray.models.factory import build_gpa

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_gpa(cfg)
    save_gpa(model, cfg, uri, storage_cfg)
    return model.eval()


def save_tiny_text_model(directory: str | Path, dropout: float = 0.0, seed: int = 0) -> str:
    """Save a tiny BERT (2 layers x 32, `TINY_WORDS` tokenizer) where `text.model` can
    point: a real transformers folder, loaded by the same code as any pretrained model.
    Dropout defaults to 0 so a trainable text tower is deterministic (parity tests)."""
    tiny_bert(seed=seed, dropout=dropout).save_pretrained(str(directory))
    tiny_tokenizer().save_pretrained(str(directory))
    return str(directory)


def esc50_clip_table(
    esc50_dir: str | Path, n_clips: int, sample_rate: int = 32000, max_seconds: float = 5.0
) -> object:
    """A clip-shard-like Arrow table (`clip_id`, `captions`, `labels`, FLAC `audio`) of the
    first `n_clips` real ESC-50 clips of `meta/esc50.csv`, with one templated caption
    each ("the sound of a dog"), cut to `max_seconds`. Skips EnCodec, so tests that only
    need audio + captions get rows in well under a second per clip."""
    import csv

    import pyarrow as pa

    from gpa_ray.audio.io import encode_flac, load_waveform

    esc50_dir = Path(esc50_dir)
    with open(esc50_dir / "meta" / "esc50.csv", newline="") as f:
        records = list(csv.DictReader(f))[:n_clips]
    rows: dict[str, list[object]] = {"clip_id": [], "captions": [], "labels": [], "audio": []}
    for rec in records:
        data = (esc50_dir / "audio" / rec["filename"]).read_bytes()
        wave = load_waveform(data, rec["filename"], sample_rate)[: round(max_seconds * sample_rate)]
        category = rec["category"]
        rows["clip_id"].append(f"esc50/{Path(rec['filename']).stem}")
        rows["captions"].append([f"the sound of a {category.replace('_', ' ')}"])
        rows["labels"].append([category])
        rows["audio"].append(encode_flac(wave, sample_rate))
    return pa.table(
        {
            "clip_id": pa.array(rows["clip_id"], pa.string()),
            "captions": pa.array(rows["captions"], pa.list_(pa.string())),
            "labels": pa.array(rows["labels"], pa.list_(pa.string())),
            "audio": pa.array(rows["audio"], pa.binary()),
        }
    )


def random_unit_embeddings(n: int, dim: int = 16, n_prototypes: int = 4, seed: int = 0) -> object:
    """GPA `Embeddings` of n items: random unit global vectors [n, dim] and, unless
    n_prototypes is 0, random unit prototypes [n, n_prototypes, dim] (seeded)."""
    import torch
    import torch.nn.functional as F

    from gpa_ray.models.gpa import Embeddings

    gen = torch.Generator().manual_seed(seed)
    global_ = F.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    if not n_prototypes:
        return Embeddings(global_)
    return Embeddings(
        global_, F.normalize(torch.randn(n, n_prototypes, dim, generator=gen), dim=-1)
    )


def synthetic_index_clips(n: int, captions: int = 2, corpus: str = "toy") -> list[dict]:
    """Clip-shard-like rows (no audio) for index tests and benchmarks: ids `<corpus>/NNNNNN`,
    `captions` captions each and one of three labels."""
    return [
        {
            "clip_id": f"{corpus}/{i:06d}",
            "corpus": corpus,
            "split": "test",
            "source_uri": f"{corpus}/{i:06d}.wav",
            "start_s": 0.0,
            "duration_s": 1.0,
            "captions": [f"caption {c} of clip {i}" for c in range(captions)],
            "labels": [f"label{i % 3}"],
            "audio": None,
            "audio_sample_rate": None,
        }
        for i in range(n)
    ]


def gpa_one_step_worker(config: dict[str, object]) -> None:
    """Ray Train worker for GPA parity tests: for each `GPALoop` in `config["loops"]`,
    build its model, take ONE optimizer step on this rank's rows of `config["table"]`
    (rank r of W gets rows r*n .. r*n+n-1, n = rows / W) exactly as the training worker
    steps (DDP, clipping, Adam), and on rank 0 save [{"loss", "grads", "state"}, ...]
    (the gradients Adam consumed, the parameters after its step) to `config["out"]`.
    `config["float64"]` runs model and inputs in double precision, so a comparison of
    worker counts is not blurred by float32 rounding of sums taken in another order."""
    import ray.train
    import ray.train.torch
    import torch

    from gpa_ray.train.worker import clip_gradients, seed_everything, unwrap

    torch.set_num_threads(1)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    table = config["table"]
    per_rank = table.num_rows // world
    shard = table.slice(rank * per_rank, per_rank)
    results = []
    for loop in config["loops"]:
        seed_everything(loop.cfg.train.seed)
        model = loop.build_model()
        if config.get("float64"):
            model = model.double()
        optimizer = loop.build_optimizer(model)
        model = ray.train.torch.prepare_model(model)
        model.train()
        batch = loop.collate_fn(True)(shard)
        if config.get("float64"):
            batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
        loss, logs = loop.train_step(model, batch, torch.Generator())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(optimizer, loop.cfg.train.grad_clip)
        net = unwrap(model)
        grads = {
            k: p.grad.detach().cpu().clone()
            for k, p in net.named_parameters()
            if p.grad is not None
        }
        optimizer.step()
        state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        results.append({"loss": logs["loss"], "grads": grads, "state": state})
    if rank == 0:
        torch.save(results, str(config["out"]))
    ray.train.report({"steps": len(results)})


def tiny_esc50_ingest(output: str, n_clips: int = 8, seconds: float = 1.0) -> dict:
    """Run the real ingest (Ray Data, EnCodec `random:0`, FLAC audio kept) on the first
    `n_clips` clips of the shared ESC-50 subset cut to `seconds`, 4 clips per shard, into
    a local `output`. Needs a running Ray; a completed output is left as it is."""
    from gpa_ray.config import load_config
    from gpa_ray.data.ingest import run_ingest

    cfg = load_config(
        overrides=[
            "corpus.kind=esc50",
            f"corpus.root={shared_data_dir() / 'esc50'}",
            f"corpus.limit={n_clips}",
            f"ingest.output={output}",
            f"ingest.max_seconds={seconds}",
            "ingest.rows_per_commit=4",
            "ingest.encode_pool.actors=1",
        ]
    )
    return run_ingest(cfg)


def write_esc50_clip_shards(
    output: str,
    esc50_root: str | Path,
    n_train: int = 12,
    n_test: int = 4,
    seconds: float = 1.0,
    storage_cfg: StorageConfig | None = None,
) -> None:
    """Real ESC-50 clips through the ingest pipeline's own reader and `ClipEncoder` into the
    ingest layout under `output` (`clips/esc50/{train,test}/part-000000.parquet`, local or
    s3://), without a Ray Data run: the first clip of `n_train` categories (train) and the
    second clip of the first `n_test` of them (test), `seconds` long, captioned by the
    ESC-50 templates. Does nothing if `output` already holds clip shards, so tests of one
    session can share one output."""
    import csv
    import tempfile

    from gpa_ray import storage
    from gpa_ray.config import CodecConfig, Config, CorpusConfig, IngestConfig
    from gpa_ray.data.corpora import iter_manifest
    from gpa_ray.data.ingest import ClipEncoder, clip_shard_table
    from gpa_ray.data.work_units import Layout

    if storage.list_files(storage.join(output, "clips"), ".parquet", storage_cfg):
        return
    root = Path(esc50_root)
    with open(root / "meta" / "esc50.csv", newline="") as f:
        records = list(csv.DictReader(f))
    seen: dict[str, int] = {}
    chosen: list[dict[str, str]] = []
    for rec in records:
        seen[rec["category"]] = seen.get(rec["category"], 0) + 1
        if seen[rec["category"]] == 1 and len(seen) <= n_train:
            chosen.append({**rec, "fold": "1"})
    train_categories = [rec["category"] for rec in chosen][:n_test]
    for category in train_categories:
        second = [rec for rec in records if rec["category"] == category][1]
        chosen.append({**second, "fold": "5"})
    cfg = Config(
        storage=storage_cfg or StorageConfig(),
        codec=CodecConfig(weights="random:0"),
        ingest=IngestConfig(output=output, max_seconds=seconds),
    )
    layout = Layout(output, "esc50")
    with tempfile.TemporaryDirectory() as subset:
        (Path(subset) / "meta").mkdir()
        with open(Path(subset) / "meta" / "esc50.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(chosen)
        corpus = CorpusConfig(
            kind="esc50",
            root=subset,
            audio_dir=str(root / "audio"),
            esc50_train_folds=[1],
            esc50_val_folds=[],
            esc50_test_folds=[5],
        )
        encoder = ClipEncoder(cfg)
        rows: dict[str, list[dict[str, object]]] = {}
        for row in iter_manifest(corpus, cfg.storage):
            rows.setdefault(row["split"], []).append(encoder.process(row, encoder.fetch(row)))
    for split, split_rows in rows.items():
        storage.write_parquet(
            layout.clips_file(split, 0), clip_shard_table(split_rows), storage_cfg
        )


def esc50_holdout_captions(
    esc50_dir: str | Path,
    out_csv: str | Path,
    templates: tuple[str, ...] | list[str] = (
        "the sound of a {category}",
        "a {category} can be heard",
    ),
    holdout_per_class: int = 2,
) -> str:
    """A `folder`-corpus `captions.csv` over the real ESC-50 clips with a held-out part.

    The shared ESC-50 copy holds all of fold 4 but only 14 clips of the other folds, so a
    fold split leaves a 14-clip test. Here, within fold 4, each category's source
    recordings (`src_file`, which ESC-50 keeps inside one fold so that takes of one
    recording never straddle a split) are taken in a fixed hashed order until at least
    `holdout_per_class` clips are held out (`val`); the rest of fold 4 is `train`, and
    the clips of the other folds are held out too. Captions come from `templates`
    (`{category}` with spaces). Returns the CSV path; use it with
    `corpus.kind=folder corpus.root=<esc50_dir> corpus.audio_dir=audio
    corpus.caption_files=[<csv>]`.
    """
    import csv
    import hashlib

    esc50_dir = Path(esc50_dir)
    with open(esc50_dir / "meta" / "esc50.csv", newline="") as f:
        records = list(csv.DictReader(f))
    sources: dict[str, dict[str, int]] = {}
    for rec in records:
        if rec["fold"] == "4":
            per_class = sources.setdefault(rec["category"], {})
            per_class[rec["src_file"]] = per_class.get(rec["src_file"], 0) + 1
    held: set[tuple[str, str]] = set()
    for category, counts in sources.items():
        order = sorted(counts, key=lambda s: hashlib.sha256(f"{category}/{s}".encode()).digest())
        n = 0
        for src in order:
            if n >= holdout_per_class:
                break
            held.add((category, src))
            n += counts[src]
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "caption", "split", "labels"])
        for rec in records:
            category = rec["category"]
            train = rec["fold"] == "4" and (category, rec["src_file"]) not in held
            for template in templates:
                caption = template.format(category=category.replace("_", " "))
                writer.writerow([rec["filename"], caption, "train" if train else "val", category])
    return str(out_csv)


def free_loopback_ports(n: int) -> list[int]:
    """`n` distinct TCP ports that were free on 127.0.0.1 a moment ago (all held at once
    while asking, so they differ)."""
    import socket

    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass(frozen=True)
class LocalRayCluster:
    """A running `ray start --head` cluster on loopback and how to reach it."""

    pid: int
    gcs_address: str
    """`127.0.0.1:<port>`: what `RAY_ADDRESS` / `ray.init(address=...)` take."""
    dashboard_url: str
    """`http://127.0.0.1:<port>`: what `ray job submit --address` takes."""
    temp_dir: str
    env: dict[str, str]
    """Environment for CLI calls against the cluster (same auth and interface settings)."""

    @property
    def ray_cli(self) -> str:
        """The `ray` command of the running Python environment."""
        import sys

        return str(Path(sys.executable).parent / "ray")


def descendant_pids(pid: int) -> list[int]:
    """PIDs of every live process below `pid` (read from /proc; Linux), so tests and
    benchmarks can measure or clean up exactly the processes they started."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def steady_commit_rate(commits_dir: Path, field: str, warm_up: int = 2) -> float | None:
    """Rate of a resumable job once its actors are up, from its commit markers (JSON files
    named `unit-*.json` carrying a count `field`, e.g. ingest's `audio_seconds` or the
    index build's `clips`): the count of the units committed after the first `warm_up`
    (one per actor), divided by the time from commit `warm_up` to the last. None with too
    few commits. Benchmarks report it beside the end-to-end rate, which includes starting
    the actors and loading their models."""
    commits = sorted(
        (marker.stat().st_mtime, float(json.loads(marker.read_text())[field]))
        for marker in Path(commits_dir).rglob("unit-*.json")
    )
    if len(commits) <= warm_up or commits[-1][0] <= commits[warm_up - 1][0]:
        return None
    done = sum(count for _, count in commits[warm_up:])
    return round(done / (commits[-1][0] - commits[warm_up - 1][0]), 2)


def cluster_processes(temp_dir: str, root_pid: int | None = None) -> dict[int, str]:
    """Live processes of the cluster rooted at `temp_dir`, as {pid: start time}: Ray's
    node processes and workers name the session folder on their command line, job
    drivers run in a working directory under it, and all of them (with the dashboard's
    and client server's helpers, which do neither) descend from `root_pid` while it
    lives. The start time (`/proc/<pid>/stat` field 22) tells a reused PID apart."""
    marker = temp_dir.rstrip("/") + "/"
    stats: dict[int, tuple[int, str]] = {}
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            stats[int(entry.name)] = (int(fields[1]), fields[19])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
            cwd = os.readlink(entry / "cwd") + "/"
        except (OSError, IndexError):
            continue
        if marker in cmdline or cwd.startswith(marker):
            found[int(entry.name)] = fields[19]
    if root_pid is not None:
        for pid, (_, start) in stats.items():
            ancestor = pid
            while ancestor in stats and ancestor != root_pid:
                ancestor = stats[ancestor][0]
            if ancestor == root_pid and pid != root_pid:
                found[pid] = start
    return found


def _still_running(processes: dict[int, str], temp_dir: str) -> list[int]:
    """PIDs among `processes` that still run (same start time), plus any process that has
    appeared under `temp_dir` since."""
    now = cluster_processes(temp_dir)
    alive = []
    for pid, start in processes.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[19] == start and fields[0] != "Z":
            alive.append(pid)
    return sorted(set(alive) | set(now))


@contextmanager
def local_ray_cluster(
    num_cpus: int = 2, start_timeout: float = 300.0, stop_timeout: float = 60.0
) -> Iterator[LocalRayCluster]:
    """Run a real Ray head node (with the dashboard, so job submission works) on 127.0.0.1.

    `ray start --head --block` runs as one child process with every port chosen free on
    loopback and its own short temp dir (Unix socket paths must stay under 108 bytes, so
    not under pytest's tmp path); token auth is off for it and for `env`. Yields once the
    Jobs API answers. On exit the `ray start` process is sent SIGTERM (SIGKILL after
    `stop_timeout`), which stops everything it started; then no process of this cluster
    may remain: leftovers are killed by PID and reported as an error. Nothing here ever
    runs `ray stop`, which would stop every Ray on the machine.
    """
    import contextlib
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request

    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    (
        gcs,
        dashboard,
        node_manager,
        object_manager,
        client_server,
        agent_grpc,
        agent_http,
        metrics,
        runtime_env_agent,
    ) = free_loopback_ports(9)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_AUTH_MODE="disabled",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
    )
    set_ray_process_env(env)
    command = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--object-store-memory={512 * 1024 * 1024}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}",
        f"--ray-client-server-port={client_server}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env_agent}",
        "--min-worker-port=0",
        "--max-worker-port=0",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    log_path = Path(temp_dir) / "ray_start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    cluster = LocalRayCluster(
        pid=proc.pid,
        gcs_address=f"127.0.0.1:{gcs}",
        dashboard_url=f"http://127.0.0.1:{dashboard}",
        temp_dir=temp_dir,
        env=env,
    )

    def log_tail() -> str:
        return log_path.read_text(errors="replace")[-4000:]

    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log_tail()}")
            try:
                with urllib.request.urlopen(f"{cluster.dashboard_url}/api/jobs/", timeout=10):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"Ray Jobs API not up after {start_timeout} s:\n{log_tail()}"
                    ) from None
                time.sleep(1.0)
        yield cluster
    finally:
        started = cluster_processes(temp_dir, proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        deadline = time.monotonic() + stop_timeout
        left = _still_running(started, temp_dir)
        while left and time.monotonic() < deadline:
            time.sleep(1.0)
            left = _still_running(started, temp_dir)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        tail = log_tail()
        shutil.rmtree(temp_dir, ignore_errors=True)
        if left:
            raise RuntimeError(f"processes of the test Ray cluster outlived it: {left}\n{tail}")


def job_main(name: str) -> Callable[[list[str] | None], int]:
    """`main` of `jobs/<name>.py`: jobs are scripts, not a package, so tests load them by path."""
    path = Path(__file__).resolve().parents[1] / "jobs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"gpa_ray_job_{name}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no job script at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main

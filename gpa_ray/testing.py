"""Helpers for tests and demos: the shared local Ray, the local S3 server, real test data.

These are real components (a real Ray cluster on loopback, a real S3 HTTP endpoint from
moto's server, real audio from the shared data folder), sized for a 2-core machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gpa_ray.config import StorageConfig

SHARED_DATA_ENV = "GPA_RAY_SHARED_DATA"
TEST_BUCKET = "gpa-ray-test"


def shared_data_dir() -> Path:
    """Folder of real test audio: `$GPA_RAY_SHARED_DATA`, else `../shared/data` from the repo."""
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def loopback_ray_env() -> None:
    """Environment that keeps a local Ray on 127.0.0.1 and without token auth (tests only)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


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


def tiny_text_encoder(
    trainable_layers: int = -1, pooling: str = "cls", max_length: int = 16, seed: int = 0
) -> object:
    """A `TextEncoder` over a randomly initialised 2-layer, 32-wide BERT (seeded)."""
    import torch
    from transformers import BertConfig, BertModel

    from gpa_ray.models.text import TextEncoder

    tokenizer = tiny_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        backbone = BertModel(config)
    return TextEncoder(
        backbone,
        tokenizer,
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

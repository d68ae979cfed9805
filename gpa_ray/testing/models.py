"""Tiny real models for tests: the project's own towers at toy sizes, seeded.

Every builder returns the same classes the jobs build (a real BERT, CNN14, RoFormer, GPA),
only a few layers and a few dozen units wide, so a forward pass takes milliseconds on CPU.
Also here: random inputs of those models, full run configs that `build_gpa`
turns into a tiny GPA, and tiny checkpoints saved where a config can point.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from transformers import (
    BertConfig,
    BertModel,
    PreTrainedTokenizerFast,
    ResNetConfig,
    ViTConfig,
)

from gpa_ray.audio.codec import BOA, CODE_OFFSET, CODEBOOK_SIZE, EOA, PAD
from gpa_ray.checkpoints import save_gpa
from gpa_ray.config import (
    AudioConfig,
    AudioEncoderConfig,
    AudioFormerConfig,
    Config,
    FeaturesConfig,
    GPAConfig,
    StorageConfig,
    TextConfig,
)
from gpa_ray.models.audio_cnn import Cnn14, PannsEncoder, build_audio_cnn
from gpa_ray.models.audioformer import AudioFormerEncoder
from gpa_ray.models.factory import build_gpa
from gpa_ray.models.gpa import GPAModel
from gpa_ray.models.spectrogram_vision import SpectrogramVision, build_spectrogram_vision
from gpa_ray.models.text import TextEncoder

_TINY_VOCABULARY = """
a the of and is in on with while then dog cat bird car engine rain water wind door bell
siren man woman child people music piano guitar drum voice speaks talks barks sings plays
runs passes falls knocks rings chirps loud quiet distant close street room roof crowd
applause footsteps birds dogs cars
"""
TINY_WORDS = tuple(_TINY_VOCABULARY.split())
TINY_AUDIO_MELS = 32
"""Mel bins of the tiny audio encoder's log-mel input ([B, T >= 32, 32])."""


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A real WordPiece (whole-word) fast tokenizer over `TINY_WORDS`, BERT special tokens."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {word: i for i, word in enumerate([*specials, *TINY_WORDS])}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
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


def tiny_bert(seed: int = 0, dropout: float = 0.1) -> BertModel:
    """A randomly initialised 2-layer, 32-wide BERT over `tiny_tokenizer`'s vocabulary."""
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
) -> TextEncoder:
    """A `TextEncoder` over a randomly initialised 2-layer, 32-wide BERT (seeded)."""
    return TextEncoder(
        tiny_bert(seed=seed),
        tiny_tokenizer(),
        max_length=max_length,
        pooling=pooling,
        trainable_layers=trainable_layers,
    )


def tiny_audio_encoder(seed: int = 0) -> Cnn14:
    """A PANNs CNN14 at width 2 (64-d frames, 1/32 time rate) on 32-bin log-mel, seeded."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Cnn14(n_mels=TINY_AUDIO_MELS, width=2, dropout=0.0)


def tiny_audio_batch(batch: int = 3, frames: int = 96, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword inputs for `tiny_audio_encoder()`: random log-mel and ragged `lengths`."""
    gen = torch.Generator().manual_seed(seed)
    logmel = torch.randn(batch, frames, TINY_AUDIO_MELS, generator=gen)
    lengths = torch.tensor([frames - (i * 32) % frames for i in range(batch)])
    return {"logmel": logmel, "lengths": lengths}


def tiny_gpa_config(**overrides: object) -> GPAConfig:
    """`GPAConfig` sized for tests (embed_dim 16, K = 3); keyword overrides replace fields."""
    return dataclasses.replace(GPAConfig(embed_dim=16, n_prototypes=3), **overrides)


def tiny_gpa_model(
    cfg: GPAConfig | None = None, text_trainable_layers: int = -1, seed: int = 0
) -> GPAModel:
    """A `GPAModel` from tiny real towers (CNN14 width 2, 2-layer BERT), seeded."""
    audio = tiny_audio_encoder(seed)
    text = tiny_text_encoder(trainable_layers=text_trainable_layers, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GPAModel(cfg or tiny_gpa_config(), audio, text)


def tiny_audio_cnn(
    kind: str = "cnn14", n_mels: int = TINY_AUDIO_MELS, seed: int = 0
) -> PannsEncoder:
    """A PANNs `cnn14` or `resnet38` at width 8 (256-d frames, 1/32 time rate), seeded."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_audio_cnn(kind, n_mels=n_mels, width=8)


def tiny_spectrogram_resnet(
    n_mels: int = TINY_AUDIO_MELS, channels: str = "repeat", seed: int = 0
) -> SpectrogramVision:
    """A 4-stage bottleneck ResNet (widths 8..32, one block each) on spectrograms, seeded."""
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_spectrogram_vision("resnet50", n_mels=n_mels, config=config, channels=channels)


def tiny_spectrogram_vit(
    n_mels: int = TINY_AUDIO_MELS, channels: str = "repeat", seed: int = 0
) -> SpectrogramVision:
    """A 2-layer, 32-wide ViT with 8x8 patches (32x32 position grid) on spectrograms, seeded."""
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


def tiny_audioformer_config(**overrides: object) -> AudioFormerConfig:
    """`AudioFormerConfig` for tests: 2 layers x 32 x 2 heads, 128 positions."""
    base = AudioFormerConfig(
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=128
    )
    return dataclasses.replace(base, **overrides)


def tiny_audioformer_encoder(seed: int = 0) -> AudioFormerEncoder:
    """An `AudioFormerEncoder` (tiny RoFormer over EnCodec token ids), seeded."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AudioFormerEncoder.from_config(tiny_audioformer_config())


def tiny_code_ids(
    batch: int = 3, n_codes: int = 40, seed: int = 0, ragged: bool = True
) -> torch.Tensor:
    """Random AudioFormer id sequences [B, n_codes + 2]: BOA codes EOA, PAD-ragged if asked."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, CODEBOOK_SIZE, (batch, n_codes), generator=gen) + CODE_OFFSET
    ids = torch.full((batch, n_codes + 2), PAD, dtype=torch.long)
    for b in range(batch):
        n = n_codes - (b * n_codes // (2 * batch) if ragged else 0)
        ids[b, 0] = BOA
        ids[b, 1 : n + 1] = codes[b, :n]
        ids[b, n + 1] = EOA
    return ids


def tiny_gpa_run_config(text_model: str, scorer: str = "lass", **sections: object) -> Config:
    """A full `Config` that `build_gpa` turns into a tiny GPA: CNN14 width 2 on 32-bin
    log-mel of 2 s of audio, the tiny BERT at `text_model` (see `save_tiny_text_model`),
    embed_dim 16, K = 3. `sections` replace whole config sections (e.g. `storage=...`)."""
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
    uri: str, cfg: Config, storage_cfg: StorageConfig | None = None, seed: int = 0
) -> GPAModel:
    """Build the GPA of `cfg` with seeded random weights, save it at `uri` with `save_gpa`
    (local or s3://) and return the model (in eval mode)."""
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


def tiny_gpa_run(run: str | Path, seed: int = 0) -> str:
    """A GPA training-run folder as `jobs/train_gpa.py` leaves it, with a tiny model: one
    `checkpoint_000001` (the tiny BERT saved beside the run) and the `summary.json`
    naming it the best. Returns the run folder."""
    from gpa_ray.checkpoints import write_run_summary

    run = Path(run)
    cfg = tiny_gpa_run_config(save_tiny_text_model(run.parent / f"{run.name}-text-model"))
    checkpoint = run / "checkpoint_000001"
    tiny_gpa_checkpoint(str(checkpoint), cfg, seed=seed)
    write_run_summary(str(run), {"best_checkpoint": str(checkpoint)})
    return str(run)

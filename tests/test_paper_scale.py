"""Every paper preset trains two steps at its full model size, on CPU, on real shared clips.

Each preset runs in its own process (`gpa_ray.testing.paper_scale`): the preset's own
training task at the paper's model size, batch cut to fit (`CPU_BATCH`), random weights where the
published ones cannot be had here (said in the run's log). Minutes per preset on two
cores: slow-marked. Times and memory are measured by `benchmarks/paper_scale.py`, not
asserted here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpa_ray.testing.paper_scale import (
    CPU_BATCH,
    GFC_PRESETS,
    PAPER_PRESETS,
    paper_scale_config,
    roberta_stand_in,
    run_in_subprocess,
)

PANNS_RESNET38_WITHOUT_FC = 73_783_247 - 5_276_175
"""PANNs' ResNet38 parameter count minus fc1 and fc_audioset (GPA drops both)."""
BERT_BASE_PARAMETERS = 109_482_240
ROBERTA_BASE_PARAMETERS = 124_645_632
"""roberta-base with its pooler (frozen here: GFC does not train the text tower)."""
BIN_NORM = 2 * 513
"""The spectrogram towers' per-bin input batch norm over 513 linear STFT bins."""
GFC_AUDIO_TOWERS = {
    # torchvision's ResNet-50 (25,557,032) minus its 1000-way fc (2,049,000).
    "clotho_gfc_resnet50": ("SpectrogramResNet", 2048, 23_508_032 + BIN_NORM),
    # ViT-B/16 without pooler or head (its 14 x 14 + 1 position table, interpolated per input).
    "clotho_gfc_vit_b16": ("SpectrogramViT", 768, 85_798_656 + BIN_NORM),
    # PANNs' Cnn14 (80,753,615) minus fc1 and fc_audioset.
    "clotho_gfc_cnn14": ("Cnn14", 2048, 80_753_615 - 4_196_352 - 1_079_823),
}
GFC_FRAMES = {"clotho_gfc_resnet50": 1251, "clotho_gfc_vit_b16": 1251, "clotho_gfc_cnn14": 4001}
"""Frames of 40 s at 32 kHz: hop 1024 (the linear-spectrogram presets), hop 320 (CNN14)."""


@pytest.mark.slow
@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_preset_trains_two_steps_at_full_size(
    preset: str, shared_data: Path, tmp_path: Path
) -> None:
    batch = CPU_BATCH[preset]
    result = run_in_subprocess(preset, tmp_path / "result.json", batch_size=batch, threads=2)
    print(json.dumps(result))  # step times and peak RSS, for the record (-s)
    assert result["finite"] and len(result["step_seconds"]) == 2
    assert all(result["first_last_params_changed"])
    model = result["model"]
    if preset.startswith("audioset"):
        assert any("EnCodec random:0" in line for line in result["log"])
        # One RoFormer per codebook, 12 x 768 x 12 heads (AudioFormer section 4).
        assert model["codebook_models"] == 4
        # All train but each RoFormer's fixed sinusoidal position table [1024, 768 / 12].
        assert result["parameters"] == 4 * model["per_codebook_parameters"]
        assert result["parameters"] - result["trainable_parameters"] == 4 * 1024 * 64
        assert model["per_codebook_parameters"] > 85_000_000
    elif preset.startswith("fsd50k"):
        assert any("EnCodec random:0" in line for line in result["log"])
        assert any("RANDOMLY initialised backbones" in line for line in result["log"])
        # FT1: one RoFormer 12 x 768 (the codebook-1 anchor) and a linear classifier; the
        # stand-in 5 s clips are padded to the preset's 10 s (AudioFormer 4.2, FSD50K).
        assert model["class"] == "AudioFormerClassifier"
        assert model["encoder_parameters"] > 85_000_000
        assert result["parameters"] == model["encoder_parameters"] + 769 * model["classes"]
        assert result["parameters"] - result["trainable_parameters"] == 1024 * 64
        assert set(result["clip_seconds"]) == {10.0}
    elif preset in GFC_PRESETS:
        assert any("RANDOM weights" in line for line in result["log"])
        assert any("STAND-IN tokenizer" in line for line in result["log"])
        tower, dim, audio_parameters = GFC_AUDIO_TOWERS[preset]
        assert model["audio_tower"] == tower and model["audio_dim"] == dim
        assert model["audio_parameters"] == audio_parameters
        assert model["text_parameters"] == ROBERTA_BASE_PARAMETERS
        # The text tower is frozen (GFC s3): none of its parameters train.
        assert result["parameters"] - result["trainable_parameters"] >= ROBERTA_BASE_PARAMETERS
        # Clotho clips (< 40 s) centred in the preset's 40 s: every input has 40 s of frames.
        assert max(result["clip_seconds"]) < 40
        assert result["input_shapes"]["audio.logmel"][:2] == [2, GFC_FRAMES[preset]]
        assert result["input_shapes"]["text.input_ids"][1] <= 30  # GFC s3: 30 tokens
    else:
        assert any("RANDOM weights" in line for line in result["log"])
        assert model["audio_tower"] == "ResNet38" and model["audio_dim"] == 2048
        assert model["audio_parameters"] == PANNS_RESNET38_WITHOUT_FC
        assert model["text_parameters"] == BERT_BASE_PARAMETERS
        # Everything trains but BERT's pooler head, which cls pooling never uses.
        assert result["parameters"] - result["trainable_parameters"] == 768 * 768 + 768
    if preset == "clotho_gpa":
        assert max(result["clip_seconds"]) > 20  # Clotho's long clips, at their length


def test_roberta_stand_in_follows_roberta_base(shared_data: Path, tmp_path: Path) -> None:
    """The stand-in tokenizer speaks roberta-base's conventions, so the random tower built
    from the saved config accepts its ids: specials at RoBERTa's ids, `<s> ... </s>`
    around every caption, padding with id 1, ids inside the 50,265-row embedding."""
    from transformers import AutoConfig, AutoTokenizer

    folder = roberta_stand_in(tmp_path / "roberta-base")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    assert config.model_type == "roberta" and config.vocab_size == 50265
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (
        config.bos_token_id,
        config.pad_token_id,
        config.eos_token_id,
    )
    long_caption = "a dog barks loudly while rain falls on a metal roof " * 5
    batch = tokenizer(
        ["a dog barks", long_caption], padding="longest", truncation=True, max_length=30
    )
    short, long_ids = batch["input_ids"]
    assert len(long_ids) == 30 and long_ids[0] == 0 and long_ids[-1] == 2
    n_short = sum(batch["attention_mask"][0])
    assert short[0] == 0 and short[n_short - 1] == 2 and set(short[n_short:]) == {1}
    assert max(long_ids) < len(tokenizer) < config.vocab_size
    assert tokenizer.decode(short[1 : n_short - 1]) == "a dog barks"


def test_paper_scale_config_names_an_unknown_text_tower(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="debug.*no paper-scale build of text tower"):
        paper_scale_config("debug", tmp_path, 2, 1)

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

from gpa_ray.testing.paper_scale import CPU_BATCH, PAPER_PRESETS, run_in_subprocess

PANNS_RESNET38_WITHOUT_FC = 73_783_247 - 5_276_175
"""PANNs' ResNet38 parameter count minus fc1 and fc_audioset (GPA drops both)."""
BERT_BASE_PARAMETERS = 109_482_240


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
    else:
        assert any("RANDOM weights" in line for line in result["log"])
        assert model["audio_tower"] == "ResNet38" and model["audio_dim"] == 2048
        assert model["audio_parameters"] == PANNS_RESNET38_WITHOUT_FC
        assert model["text_parameters"] == BERT_BASE_PARAMETERS
        # Everything trains but BERT's pooler head, which cls pooling never uses.
        assert result["parameters"] - result["trainable_parameters"] == 768 * 768 + 768
    if preset == "clotho_gpa":
        assert max(result["clip_seconds"]) > 20  # Clotho's long clips, at their length

"""Config loading: presets, typed dotted overrides, helpful errors, round trips."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from gpa_ray.config import ActorPoolConfig, Config, resolve_stage_uris
from gpa_ray.config_loading import (
    ConfigError,
    config_from_dict,
    config_to_yaml,
    load_config,
    preset_names,
)
from gpa_ray.storage import dump_config

GFC_TOWERS = ("cnn14", "resnet50", "vit_b16")


def test_defaults_without_preset() -> None:
    assert load_config() == Config()


def test_shipped_presets_load() -> None:
    names = preset_names()
    assert {"quickstart", "debug"} <= set(names)
    for name in names:
        assert isinstance(load_config(name), Config)


def test_unknown_key_suggests_closest() -> None:
    with pytest.raises(ConfigError, match=r"'train\.lrr'.*did you mean 'train\.lr'"):
        load_config(overrides=["train.lrr=1"])


def test_unknown_section_is_named() -> None:
    with pytest.raises(ConfigError, match="'trian.lr'.*'train.lr'"):
        load_config(overrides=["trian.lr=1"])


def test_overrides_convert_to_field_types() -> None:
    cfg = load_config(
        "debug",
        [
            "train.epochs=3",
            "train.lr=5e-5",
            "train.use_gpu=true",
            "ray.num_cpus=none",
            "audioformer.codebooks=[0, 2]",
            "corpus.caption_templates=a {category},the {category}",
            "ingest.encode_pool.cpus_per_actor=1",
        ],
    )
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.train.lr == pytest.approx(5e-5)
    assert cfg.train.use_gpu is True
    assert cfg.ray.num_cpus is None
    assert cfg.audioformer.codebooks == [0, 2]
    assert cfg.corpus.caption_templates == ["a {category}", "the {category}"]
    assert cfg.ingest.encode_pool.cpus_per_actor == 1.0 and isinstance(
        cfg.ingest.encode_pool.cpus_per_actor, float
    )


def test_override_wins_over_preset() -> None:
    assert load_config("debug").train.epochs == 1
    assert load_config("debug", ["train.epochs=7"]).train.epochs == 7


def test_bad_values_name_the_key() -> None:
    with pytest.raises(ConfigError, match="'train.epochs' expects int, got 'many'"):
        load_config(overrides=["train.epochs=many"])
    with pytest.raises(ConfigError, match="'train.epochs' expects int"):
        load_config(overrides=["train.epochs=1.5"])
    with pytest.raises(ConfigError, match="'train.use_gpu' expects bool"):
        load_config(overrides=["train.use_gpu=maybe"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(overrides=["train.epochs"])
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(overrides=["train=3"])


def test_missing_preset_lists_shipped_ones() -> None:
    with pytest.raises(ConfigError, match="quickstart"):
        load_config("no_such_preset")


def test_bad_preset_key(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("gpa:\n  embed_dimm: 3\n")
    with pytest.raises(ConfigError, match="'gpa.embed_dimm'.*'gpa.embed_dim'"):
        load_config(str(path))


def test_configs_are_frozen() -> None:
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_asdict_round_trip_and_dump(tmp_path) -> None:
    cfg = load_config("quickstart", ["train.seed=5"])
    assert config_from_dict(dataclasses.asdict(cfg)) == cfg
    target = tmp_path / "out" / "config.yaml"
    dump_config(cfg, str(target))
    assert load_config(str(target)) == cfg
    assert yaml.safe_load(config_to_yaml(cfg))["train"]["seed"] == 5


def test_actor_pools_share_one_nested_shape() -> None:
    cfg = load_config("debug", ["ingest.encode_pool.actors=3", "eval.embed_pool.batch_size=4"])
    assert cfg.ingest.encode_pool == ActorPoolConfig(actors=3, cpus_per_actor=0.5, batch_size=4)
    assert cfg.eval.embed_pool == ActorPoolConfig(batch_size=4)
    assert cfg.index.embed_pool.actors == 2 and cfg.sinkhorn.embed_pool == ActorPoolConfig()
    with pytest.raises(ConfigError, match="'index.embed_pool.workers'"):
        load_config(overrides=["index.embed_pool.workers=2"])


def test_stage_uris_fall_back_to_the_previous_stage_once() -> None:
    cfg = load_config(
        overrides=[
            "ingest.output=s3://b/ingest",
            "sinkhorn.checkpoint=s3://b/runs/gpa",
            "sinkhorn.output=s3://b/bias",
            "index.output=s3://b/index",
        ]
    )
    resolved = resolve_stage_uris(cfg)
    assert resolved.train.data == "s3://b/ingest" and resolved.index.input == "s3://b/ingest"
    assert (resolved.sinkhorn.queries, resolved.sinkhorn.texts) == ("s3://b/ingest",) * 2
    assert (resolved.eval.checkpoint, resolved.eval.data, resolved.eval.bias) == (
        "s3://b/runs/gpa",
        "s3://b/ingest",
        "s3://b/bias",
    )
    assert resolved.serve.index_uri == "s3://b/index"
    assert resolve_stage_uris(resolved) == resolved
    explicit = resolve_stage_uris(
        load_config(overrides=["train.data=t", "sinkhorn.texts=x", "eval.data=e"])
    )
    assert (explicit.sinkhorn.queries, explicit.sinkhorn.texts, explicit.eval.data) == (
        "t",
        "x",
        "e",
    )


def test_a_partly_given_section_keeps_its_fields_defaults() -> None:
    # IngestConfig's pool defaults to 2 actors and 8 clips per GPU call, not the class's 1 / 16.
    cfg = load_config(overrides=["ingest.encode_pool.cpus_per_actor=1"])
    assert cfg.ingest.encode_pool == ActorPoolConfig(actors=2, cpus_per_actor=1.0, batch_size=8)
    assert config_from_dict(dataclasses.asdict(cfg)) == cfg


def test_gpa_paper_presets_train_on_every_caption_pair() -> None:
    # GPA trains "following [9]" (sec. 3.1), whose loader has one sample per (clip,
    # caption): the paper presets say so, the other presets keep one pair per clip.
    assert Config().train.pairs_per_epoch == "clip"
    # "Good, Fast, Cheap" counts one training item per caption too (its s5, Table 3).
    for name in ("clotho_gpa", "audiocaps_gpa", *(f"clotho_gfc_{t}" for t in GFC_TOWERS)):
        assert load_config(name).train.pairs_per_epoch == "caption", name
    assert load_config("esc50_gpa").train.pairs_per_epoch == "clip"


def test_audioformer_preset_is_the_papers_schedule() -> None:
    """AudioFormer 4.1/4.2: MLM 10 epochs at 1e-4 on balanced + unbalanced, no LR decay
    named; every override in the preset's phase commands (FT1 on AS-2M in two phases) is
    a valid key and value, so the commands cannot drift from the schema."""
    import re
    from importlib.resources import files

    cfg = load_config("audioset_audioformer")
    assert cfg.train.train_split == "balanced_train+unbalanced_train"
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.lr_gamma) == (10, 1e-4, 1.0)
    assert (cfg.audioformer.mask_prob, cfg.audioformer.codebooks) == (0.25, [0, 1, 2, 3])
    assert (cfg.audioformer.ft2_alpha, cfg.audioformer.ft2_temperature) == (0.95, 0.05)
    text = (files("gpa_ray") / "configs" / "audioset_audioformer.yaml").read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    overrides = re.findall(r"\b((?:train|audioformer)\.[a-z_]+=\S+)", header)
    assert "train.sampler=label_frequency" in overrides
    assert "train.early_stopping_patience=3" in overrides
    for override in overrides:
        load_config("audioset_audioformer", [override.replace("s3://BUCKET", "s3://b")])
    assert {"train.lr=1e-5", "train.epochs=10", "train.train_split=balanced_train"} <= set(
        overrides
    )
    assert {"train.epochs=1", "train.train_split=unbalanced_train"} <= set(overrides)


def test_fsd50k_preset_is_the_papers_protocol() -> None:
    """AudioFormer 4.2, FSD50K: every clip padded or truncated to 10 s (so 4 x 750 codes),
    FT1 10 epochs at 1e-4 with early stopping; the backbone is the AudioSet preset's MLM
    run, so the two presets' architectures must agree; its command's overrides are valid."""
    import io
    import re
    from importlib.resources import files

    import numpy as np
    import soundfile as sf

    from gpa_ray.checkpoints import check_architecture
    from gpa_ray.data.ingest import ClipEncoder

    cfg = load_config("fsd50k_audioformer")
    assert (cfg.corpus.kind, cfg.ingest.max_seconds, cfg.ingest.pad_to_max_seconds) == (
        "fsd50k",
        10.0,
        True,
    )
    assert (cfg.train.finetune_stage, cfg.train.lr, cfg.train.epochs) == ("ft1", 1e-4, 10)
    assert cfg.train.early_stopping_patience > 0 and cfg.train.lr_gamma == 1.0
    assert cfg.audioformer.classification_loss == "lsep"
    check_architecture(load_config("audioset_audioformer").audioformer, cfg.audioformer, "mlm")
    text = (files("gpa_ray") / "configs" / "fsd50k_audioformer.yaml").read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for override in re.findall(r"\b((?:train|corpus|ingest)\.[a-z_]+=\S+)", header):
        load_config("fsd50k_audioformer", [override.replace("s3://BUCKET", "s3://b")])
    # A 1 s clip becomes 10 s of audio: 750 codes per codebook (24 kHz, 75 frames/s).
    # codec.weights: the published EnCodec cannot be downloaded here (seeded architecture).
    encoder = ClipEncoder(load_config("fsd50k_audioformer", ["codec.weights=random:0"]))
    wave = (0.3 * np.sin(np.arange(16000) / 16000 * 2 * np.pi * 440)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, wave, 16000, format="WAV")
    row = {"clip_id": "fsd50k/1", "corpus": "fsd50k", "split": "train", "start_s": 0.0}
    out = encoder.process({**row, "source_uri": "short.wav", "duration_s": None}, buf.getvalue())
    assert out["duration_s"] == 10.0 and out["codes"].shape == (4, 750)

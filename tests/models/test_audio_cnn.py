"""PANNs CNN14 / ResNet38 encoders: shapes, frame masks, pooling, checkpoint loading."""

from __future__ import annotations

import argparse
import copy
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.serialization import get_unsafe_globals_in_checkpoint

from gpa_ray import storage
from gpa_ray.models.audio_cnn import (
    Cnn14,
    ResNet38,
    StripeMasks,
    build_audio_cnn,
    draw_stripe,
    frame_mask,
)
from gpa_ray.models.panns_checkpoint import load_panns_weights
from gpa_ray.pretrained import WeightsUnavailableError
from gpa_ray.testing.models import tiny_audio_cnn

KINDS = ["cnn14", "resnet38"]
PANNS_ONLY_TENSORS = {
    "spectrogram_extractor.stft.conv_real.weight": torch.zeros(513, 1, 1024),
    "spectrogram_extractor.stft.conv_imag.weight": torch.zeros(513, 1, 1024),
    "logmel_extractor.melW": torch.zeros(513, 64),
    "fc1.weight": torch.zeros(256, 256),
    "fc1.bias": torch.zeros(256),
    "fc_audioset.weight": torch.zeros(527, 256),
    "fc_audioset.bias": torch.zeros(527),
}
"""What a published PANNs state dict holds beyond the tower (shapes at width 8)."""


def published_checkpoint(state: dict) -> dict:
    """The structure of the published PANNs files (`audioset_tagging_cnn/pytorch/main.py`):
    the state dict under `model`, the iteration, and the balanced sampler's state."""
    rng = np.random.default_rng(0)
    return {
        "iteration": 540000,
        "model": state,
        "sampler": {
            "indexes_per_class": [rng.permutation(20).astype(np.int64) for _ in range(3)],
            "queue": [2, 0, 1],
            "pointers_of_classes": [4, 0, 7],
        },
    }


def _rename_pickled_module(path: Path, old: bytes, new: bytes) -> None:
    """Rewrite a torch zip checkpoint with a module name changed in its pickle."""
    with zipfile.ZipFile(path) as source:
        entries = [(info.filename, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for name, data in entries:
            target.writestr(name, data.replace(old + b"\n", new + b"\n"))


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_with_tiny_width(kind: str) -> None:
    model = tiny_audio_cnn(kind, n_mels=64).eval()
    out = model(torch.randn(2, 100, 64))
    # width 8 -> 32 * 8 = 256 channels; 100 frames // 32 = 3 output frames.
    assert model.out_dim == 256
    assert out.frames.shape == (2, 3, 256)
    assert out.mask.shape == (2, 3) and out.mask.dtype == torch.bool and out.mask.all()
    assert out.global_.shape == (2, 256)


@pytest.mark.parametrize("kind", KINDS)
def test_backward_in_train_mode(kind: str) -> None:
    model = tiny_audio_cnn(kind).train()
    out = model(torch.randn(3, 64, 32))
    (out.frames.sum() + out.global_.sum()).backward()
    assert model.bn0.weight.grad is not None
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_frame_mask_from_lengths_hand_values() -> None:
    # Five ceil-halvings, clipped to T' = 100 // 32 = 3 (worked by hand):
    # 100 -> 50, 25, 13, 7, 4 -> 3 ; 40 -> 20, 10, 5, 3, 2 ; 1 -> 1, 1, 1, 1, 1.
    mask = frame_mask(torch.tensor([100, 40, 1]), n_in=100, n_out=3, batch=3)
    expected = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    assert torch.equal(mask, expected)
    assert frame_mask(None, 100, 3, 2).all()


@pytest.mark.parametrize("kind", KINDS)
def test_model_mask_and_masked_pooling(kind: str) -> None:
    model = tiny_audio_cnn(kind, n_mels=64).eval()
    lengths = torch.tensor([128, 70])
    out = model(torch.randn(2, 128, 64), lengths)
    # 128 -> T' = 4; 70 -> 35, 18, 9, 5, 3 valid frames.
    assert out.mask.tolist() == [[True] * 4, [True, True, True, False]]
    # global = mean_t + max_t over the valid frames only, computed with a plain loop.
    for b, n in enumerate([4, 3]):
        rows = [out.frames[b, t] for t in range(n)]
        mean = sum(rows) / n
        maxed = torch.stack(rows).max(dim=0).values
        torch.testing.assert_close(out.global_[b], mean + maxed)


def test_global_without_lengths_is_panns_pooling() -> None:
    """PANNs Cnn14.forward, transcribed: conv blocks, freq mean, max_t + mean_t."""
    torch.manual_seed(0)
    model = Cnn14(n_mels=64, width=8).eval()
    logmel = torch.randn(2, 96, 64)
    x = logmel.unsqueeze(1).transpose(1, 3)
    x = model.bn0(x).transpose(1, 3)
    for i in range(1, 7):
        x = getattr(model, f"conv_block{i}")(x, pool_size=(2, 2) if i < 6 else (1, 1))
    x = torch.mean(x, dim=3)
    (x1, _) = torch.max(x, dim=2)
    x2 = torch.mean(x, dim=2)
    out = model(logmel)
    torch.testing.assert_close(out.global_, x1 + x2)
    torch.testing.assert_close(out.frames, x.transpose(1, 2))


def test_paper_scale_parameter_counts_and_names() -> None:
    with torch.device("meta"):
        cnn14, resnet38 = Cnn14(), ResNet38()
    # PANNs reports 80,753,615 parameters for Cnn14 (527 classes) and 73,783,247 for ResNet38;
    # minus fc1 (2048*2048 + 2048) and fc_audioset (2048*527 + 527) = 5,276,175 here.
    assert sum(p.numel() for p in cnn14.parameters()) == 80_753_615 - 5_276_175
    assert sum(p.numel() for p in resnet38.parameters()) == 73_783_247 - 5_276_175
    assert {"bn0.running_mean", "conv_block1.conv1.weight", "conv_block6.bn2.bias"} <= set(
        cnn14.state_dict()
    )
    assert {
        "resnet.layer1.0.conv1.weight",
        "resnet.layer2.0.downsample.1.weight",
        "resnet.layer2.0.downsample.2.running_var",
        "resnet.layer4.2.bn2.weight",
        "conv_block_after1.conv2.weight",
    } <= set(resnet38.state_dict())


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_strict(kind: str, tmp_path) -> None:
    source = tiny_audio_cnn(kind, seed=1).eval()
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    target = tiny_audio_cnn(kind, seed=2).eval()
    assert load_panns_weights(target, str(path)) == []
    logmel = torch.randn(2, 64, 32)
    torch.testing.assert_close(target(logmel).global_, source(logmel).global_)


@pytest.mark.parametrize("kind", KINDS)
def test_published_checkpoint_structure_loads_with_weights_only(kind: str, tmp_path) -> None:
    """The published files: {"model": PANNs state dict (front end and fc1 / fc_audioset
    included), "iteration": int, "sampler": the balanced sampler's state (int64 arrays)}."""
    source = tiny_audio_cnn(kind, n_mels=64, seed=3)
    state = dict(source.state_dict())
    path = tmp_path / f"{kind}_mAP=0.43.pth"
    torch.save(published_checkpoint({**state, **PANNS_ONLY_TENSORS}), path)
    with pytest.raises(pickle.UnpicklingError):  # the sampler state needs numpy's globals
        torch.load(path, weights_only=True)
    model = build_audio_cnn(kind, n_mels=64, width=8, weights=str(path))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name])
    assert load_panns_weights(build_audio_cnn(kind, n_mels=64, width=8), str(path)) == sorted(
        PANNS_ONLY_TENSORS
    )


def test_checkpoint_written_by_numpy_1_loads(tmp_path) -> None:
    """The published files were pickled under numpy 1 (`numpy.core.multiarray`)."""
    state = tiny_audio_cnn("resnet38", n_mels=64, seed=5).state_dict()
    path = tmp_path / "ResNet38_mAP=0.434.pth"
    torch.save(published_checkpoint(dict(state)), path)
    _rename_pickled_module(path, b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert "numpy.core.multiarray._reconstruct" in get_unsafe_globals_in_checkpoint(path)
    model = build_audio_cnn("resnet38", n_mels=64, width=8, weights=str(path))
    torch.testing.assert_close(model.state_dict()["bn0.weight"], state["bn0.weight"])


def test_wrong_key_set_fails_naming_missing_and_unexpected_keys(tmp_path) -> None:
    path = tmp_path / "Cnn14_mAP=0.431.pth"
    torch.save(published_checkpoint(dict(tiny_audio_cnn("cnn14", n_mels=64).state_dict())), path)
    with pytest.raises(WeightsUnavailableError) as info:
        build_audio_cnn("resnet38", n_mels=64, width=8, weights=str(path))
    message = str(info.value)
    assert str(path) in message and "does not fit ResNet38" in message
    assert "missing keys [" in message and "resnet.layer1.0.conv1.weight" in message
    assert "unexpected keys [" in message and "conv_block2.conv1.weight" in message


def test_one_renamed_key_is_named(tmp_path) -> None:
    state = dict(tiny_audio_cnn("resnet38", n_mels=64).state_dict())
    state["resnet.layer1.0.conv1.weights"] = state.pop("resnet.layer1.0.conv1.weight")
    path = tmp_path / "renamed.pth"
    torch.save(published_checkpoint(state), path)
    with pytest.raises(WeightsUnavailableError) as info:
        build_audio_cnn("resnet38", n_mels=64, width=8, weights=str(path))
    assert "1 missing keys [resnet.layer1.0.conv1.weight]" in str(info.value)
    assert "1 unexpected keys [resnet.layer1.0.conv1.weights]" in str(info.value)


def test_width_mismatch_fails_loudly(tmp_path) -> None:
    path = tmp_path / "w8.pt"
    torch.save(tiny_audio_cnn("cnn14").state_dict(), path)
    with pytest.raises(
        WeightsUnavailableError,
        match=r"w8.pt' does not fit Cnn14: \d+ size mismatches \[conv_block1.conv1.weight: "
        r"file \(8, 1, 3, 3\) vs model \(16, 1, 3, 3\)",
    ):
        build_audio_cnn("cnn14", n_mels=32, width=16, weights=str(path))


def test_unloadable_files_raise_the_weights_error_naming_the_file(tmp_path) -> None:
    state = dict(tiny_audio_cnn("cnn14").state_dict())
    code = tmp_path / "with_code.pth"  # a global outside the allowed numpy ones
    torch.save({"model": state, "args": argparse.Namespace(lr=1e-3)}, code)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    bare = tmp_path / "list.pth"
    torch.save([1, 2], bare)
    cases = [
        (code, "weights_only=True"),
        (garbage, "weights_only=True"),
        (bare, "does not hold a state dict"),
        (tmp_path / "absent.pth", "cannot be read"),
    ]
    for path, reason in cases:
        with pytest.raises(WeightsUnavailableError, match=reason) as info:
            build_audio_cnn("cnn14", weights=str(path))
        assert str(path) in str(info.value)


@pytest.mark.parametrize("kind", KINDS)
def test_spec_augment_masks_are_zero_after_bn0(kind: str) -> None:
    """In training the first conv block sees bn0's output with stripes of exact zeros,
    which is each mel bin's batch mean after bn0; elsewhere exactly bn0's output. In
    eval mode nothing is masked."""
    torch.manual_seed(0)
    model = build_audio_cnn(kind, n_mels=64, width=8, masks=StripeMasks(2, 24, 2, 8)).train()
    seen: list[torch.Tensor] = []
    model.conv_block1.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    logmel = 20.0 * torch.randn(4, 96, 64) - 40.0  # dB-like: no value near 0
    reference_bn0 = copy.deepcopy(model.bn0)
    model(logmel)
    after_bn0 = reference_bn0(logmel.unsqueeze(1).transpose(1, 3)).transpose(1, 3)
    # 0 after bn0 is the per-bin mean (batch statistics, identity affine at init).
    torch.testing.assert_close(after_bn0.mean(dim=(0, 1, 2)), torch.zeros(64), atol=1e-5, rtol=0)
    masked = seen[0] == 0
    assert masked.any() and (after_bn0[masked] != 0).all()
    assert torch.equal(seen[0][~masked], after_bn0[~masked])
    for b in range(4):  # whole stripes: masked cells fill full frames or full bins
        cells = masked[b, 0]
        rows, cols = cells.all(dim=1), cells.all(dim=0)
        assert torch.equal(cells, rows[:, None] | cols[None, :])
    model.eval()
    model(logmel)
    eval_bn0 = model.bn0(logmel.unsqueeze(1).transpose(1, 3)).transpose(1, 3)
    assert torch.equal(seen[1], eval_bn0)


def test_stripes_follow_torchlibrosa_and_stay_inside_the_clip() -> None:
    """Width uniform in [0, max) and start in [0, total - width) as torchlibrosa draws
    them; time stripes of a shorter clip in a padded batch stay in its own frames."""
    torch.manual_seed(1)
    draws = [draw_stripe(100, 64) for _ in range(3000)]
    assert {w for _, w in draws} == set(range(64))
    assert all(s >= 0 and s + w < 100 for s, w in draws)
    masks = StripeMasks(2, 64, 2, 8)
    for _ in range(200):
        keep = masks.keep_mask(torch.Size([2, 1, 96, 64]), torch.tensor([96, 40]))
        full_frames = (keep[1, 0] == 0).all(dim=1)
        assert not full_frames[40:].any()
    assert StripeMasks(0, 64, 0, 8).train()(logmel := torch.randn(1, 1, 40, 64)) is logmel


@pytest.mark.s3
def test_weights_from_s3_uri(s3_server) -> None:
    source = tiny_audio_cnn("resnet38", seed=4).eval()
    uri = s3_server.uri("weights", "resnet38.pt")
    storage.write_bytes(uri, _state_bytes(source.state_dict()), storage_cfg=s3_server.storage)
    model = build_audio_cnn(
        "resnet38", n_mels=32, width=8, weights=uri, storage_cfg=s3_server.storage
    ).eval()
    logmel = torch.randn(1, 64, 32)
    torch.testing.assert_close(model(logmel).frames, source(logmel).frames)


def test_rejects_bad_inputs() -> None:
    model = tiny_audio_cnn("cnn14")
    with pytest.raises(ValueError, match="at least 32 frames"):
        model(torch.randn(1, 20, 32))
    with pytest.raises(ValueError, match="log-mel"):
        model(torch.randn(1, 64, 40))
    with pytest.raises(ValueError, match="unknown audio CNN"):
        build_audio_cnn("cnn10")


def _state_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()

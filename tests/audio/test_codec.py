"""EnCodec tokenizer on real ESC-50 clips: shapes, spread, batching, seeds, checkpoints, ids.

EnCodec encodes ~7-12 audio-seconds per second on one CPU thread, so the default tests
encode about a minute of audio in total.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from gpa_ray.audio import codec
from gpa_ray.audio.codec import (
    BOA,
    CODE_OFFSET,
    EOA,
    MASK,
    PAD,
    VOCAB_SIZE,
    CodecWeightsError,
    EncodecTokenizer,
    from_token_ids,
    n_frames,
    to_token_ids,
)
from gpa_ray.audio.io import decode_audio, resample
from gpa_ray.config import CodecConfig
from gpa_ray.testing.data import esc50_records

pytestmark = pytest.mark.filterwarnings("ignore:EnCodec weights 'random:")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer() -> EncodecTokenizer:
    return EncodecTokenizer("random:0")


def _esc50_paths(shared_data: Path, n: int, stride: int) -> list[Path]:
    return sorted((shared_data / "esc50" / "audio").glob("*.wav"))[::stride][:n]


def _load_24k(path: Path) -> np.ndarray:
    wave, sr = decode_audio(path.read_bytes(), str(path))
    return resample(wave, sr, codec.CODEC_SAMPLE_RATE)


@pytest.fixture(scope="module")
def clips(shared_data: Path) -> list[np.ndarray]:
    """Six 5.0 s ESC-50 clips from different classes, at 24 kHz."""
    return [_load_24k(p) for p in _esc50_paths(shared_data, 6, 69)]


@pytest.fixture(scope="module")
def clip_codes(tokenizer: EncodecTokenizer, clips: list[np.ndarray]) -> list[np.ndarray]:
    return [tokenizer.encode_one(w) for w in clips]


def test_five_second_clip_codes(clips: list[np.ndarray], clip_codes: list[np.ndarray]) -> None:
    # 5.0 s at 44.1 kHz -> 120000 samples at 24 kHz -> 75 frames/s * 5 s = 375 frames;
    # 3 kbps = 4 codebooks of 10 bits at 75 Hz.
    assert clips[0].shape == (120000,)
    codes = clip_codes[0]
    assert codes.shape == (4, 375) and codes.dtype == np.int16
    assert codes.min() >= 0 and codes.max() <= 1023


def test_random_weights_give_spread_codes(clip_codes: list[np.ndarray]) -> None:
    all_codes = np.concatenate(clip_codes, axis=1)
    distinct = [len(np.unique(all_codes[q])) for q in range(4)]
    assert distinct[0] >= 32, distinct
    assert min(distinct) >= 32, distinct


def test_n_frames_by_hand(tokenizer: EncodecTokenizer) -> None:
    # ceil(n * 75 / 24000) = ceil(n / 320).
    assert [n_frames(n) for n in (1, 320, 321, 24000, 120000)] == [1, 1, 2, 75, 375]
    for n in (1, 319, 641, 7999):
        assert tokenizer.encode_one(np.zeros(n, np.float32)).shape == (4, n_frames(n))


def test_batch_equals_one_at_a_time(tokenizer: EncodecTokenizer, shared_data: Path) -> None:
    # Eight clips cropped to 0.5, 1.0, ..., 4.0 s plus an odd number of samples, so most
    # end inside a frame.
    paths = _esc50_paths(shared_data, 8, 51)
    waves = [_load_24k(p)[: 12000 * (i + 1) + 37 * i] for i, p in enumerate(paths)]
    batched = tokenizer.encode(waves)
    single = [tokenizer.encode_one(w) for w in waves]
    for w, b, s in zip(waves, batched, single, strict=True):
        assert b.shape == s.shape == (4, n_frames(len(w)))
    equal = sum(int((b == s).sum()) for b, s in zip(batched, single, strict=True))
    total = sum(b.size for b in batched)
    assert equal / total >= 0.999, (equal, total)


def test_random_weights_warn() -> None:
    with pytest.warns(UserWarning, match="NOT the published EnCodec"):
        EncodecTokenizer("random:1")


def _weights_digest(tok: EncodecTokenizer) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(tok.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.cpu().numpy().tobytes())
    return digest.hexdigest()


def test_same_seed_same_codes_in_another_process(
    tokenizer: EncodecTokenizer, clips: list[np.ndarray], tmp_path: Path
) -> None:
    # The other process builds the model with 2 threads (this one used 1): the seeded
    # weights must be bit-identical anyway; it then encodes with 1 thread, like here.
    wave = clips[1][:48000]
    np.save(tmp_path / "wave.npy", wave)
    script = textwrap.dedent(
        f"""
        import warnings
        import numpy as np
        import torch
        warnings.simplefilter("ignore")
        from gpa_ray.audio.codec import EncodecTokenizer
        from tests.audio.test_codec import _weights_digest
        torch.set_num_threads(2)
        tok = EncodecTokenizer("random:0")
        print(_weights_digest(tok))
        torch.set_num_threads(1)
        wave = np.load({str(tmp_path / "wave.npy")!r})
        np.save({str(tmp_path / "codes.npy")!r}, tok.encode_one(wave))
        """
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", script],
        check=True,
        timeout=120,
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == _weights_digest(tokenizer)
    other = np.load(tmp_path / "codes.npy")
    np.testing.assert_array_equal(other, tokenizer.encode_one(wave))
    assert not np.array_equal(other, EncodecTokenizer("random:1").encode_one(wave))


def test_checkpoint_round_trip_local(
    tokenizer: EncodecTokenizer, clips: list[np.ndarray], tmp_path: Path
) -> None:
    path = tmp_path / "ckpt" / "encodec.pt"
    tokenizer.save_checkpoint(str(path))
    loaded = EncodecTokenizer(str(path))
    wave = clips[2][:24000]
    np.testing.assert_array_equal(loaded.encode_one(wave), tokenizer.encode_one(wave))
    assert loaded.n_q == 4


@pytest.mark.s3
def test_checkpoint_round_trip_s3(
    tokenizer: EncodecTokenizer, clips: list[np.ndarray], s3_server
) -> None:
    uri = s3_server.uri("codec", "encodec_random0.pt")
    EncodecTokenizer("random:0", storage_cfg=s3_server.storage).save_checkpoint(uri)
    loaded = EncodecTokenizer.from_config(CodecConfig(weights=uri), s3_server.storage)
    wave = clips[3][:24000]
    np.testing.assert_array_equal(loaded.encode_one(wave), tokenizer.encode_one(wave))


def test_bad_weights_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CodecWeightsError, match="random:<integer seed>"):
        EncodecTokenizer("random:abc")
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(CodecWeightsError, match="nope.pt"):
        EncodecTokenizer(missing)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(CodecWeightsError, match="not an EnCodec 24 kHz state dict"):
        EncodecTokenizer(str(junk))
    wrong = tmp_path / "wrong.pt"
    torch.save({"weight": torch.zeros(3)}, wrong)
    with pytest.raises(CodecWeightsError, match="not an EnCodec 24 kHz state dict"):
        EncodecTokenizer(str(wrong))


def _checkpoint_host_resolves() -> bool:
    try:
        socket.getaddrinfo("dl.fbaipublicfiles.com", 443)
    except OSError:
        return False
    return True


def test_pretrained_unobtainable_names_the_alternatives(tmp_path: Path) -> None:
    if _checkpoint_host_resolves():
        pytest.skip("the checkpoint host is reachable here; this test covers offline machines")
    env = {**os.environ, "TORCH_HOME": str(tmp_path)}
    script = (
        "from gpa_ray.audio.codec import EncodecTokenizer, CodecWeightsError\n"
        "try:\n"
        "    EncodecTokenizer('pretrained')\n"
        "except CodecWeightsError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert "not obtainable" in out.stdout and "random:<seed>" in out.stdout, out


def test_token_id_constants() -> None:
    # AudioFormer vocabulary: 3 specials, 1024 codes at c + 3, then MASK.
    assert (BOA, PAD, EOA, CODE_OFFSET, MASK, VOCAB_SIZE) == (0, 1, 2, 3, 1027, 1028)
    assert codec.CODEC_SAMPLE_RATE == 24000 and codec.FRAME_RATE == 75


def test_token_ids_by_hand() -> None:
    ids = to_token_ids(np.array([0, 5, 1023], dtype=np.int16))
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, [0, 3, 8, 1026, 2])
    padded = np.array([0, 3, 8, 1026, 2, 1, 1])
    codes = from_token_ids(padded)
    assert codes.dtype == np.int16
    np.testing.assert_array_equal(codes, [0, 5, 1023])


def test_token_ids_round_trip_real_codes(clip_codes: list[np.ndarray]) -> None:
    for row in clip_codes[0]:
        ids = to_token_ids(row)
        assert ids.shape == (row.size + 2,) and ids[0] == BOA and ids[-1] == EOA
        np.testing.assert_array_equal(from_token_ids(ids), row)


def test_token_ids_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="MASK"):
        from_token_ids(np.array([0, 3, MASK, 2]))
    for bad in (-1, VOCAB_SIZE):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            from_token_ids(np.array([0, bad, 2]))
    with pytest.raises(ValueError, match=r"\[0, 1023\]"):
        to_token_ids(np.array([1024]))


@pytest.mark.slow
def test_random_weights_spread_over_all_classes(
    tokenizer: EncodecTokenizer, shared_data: Path
) -> None:
    # One clip per class (50 clips, 250 s of audio: about 30 s of encoding).
    rows = esc50_records(shared_data / "esc50")
    first = {}
    for row in rows:
        first.setdefault(row["category"], row["filename"])
    paths = [shared_data / "esc50" / "audio" / name for name in sorted(first.values())]
    assert len(paths) == 50
    codes = np.concatenate([tokenizer.encode_one(_load_24k(p)) for p in paths], axis=1)
    distinct = [len(np.unique(codes[q])) for q in range(4)]
    assert min(distinct) >= 256, distinct


@pytest.fixture(scope="module")
def long_wave(clips: list[np.ndarray]) -> np.ndarray:
    """15 s of three real clips back to back, ending inside a frame."""
    return np.concatenate([*clips[:3], clips[3][:37]])


@pytest.fixture(scope="module")
def long_codes(tokenizer: EncodecTokenizer, long_wave: np.ndarray) -> np.ndarray:
    """The whole-file encode, the reference every chunked encode is held to."""
    return tokenizer.encode_one(long_wave)


def test_chunked_encode_equals_whole_file(long_wave: np.ndarray, long_codes: np.ndarray) -> None:
    # Chunks of 5 s (375 frames) with 1 s of audio before each: every code equals the
    # whole-file encode's.
    chunked = EncodecTokenizer("random:0", chunk_s=5.0, chunk_overlap_s=1.0)
    codes = chunked.encode_one(long_wave)
    assert codes.shape == long_codes.shape == (4, n_frames(len(long_wave)))
    assert np.array_equal(codes, long_codes)
    # Through a batch too: the long clip is encoded alone in chunks, the short ones batched.
    short = long_wave[:24000]
    batch = chunked.encode([short, long_wave])
    assert np.array_equal(batch[1], long_codes)
    assert np.array_equal(batch[0], long_codes[:, :75])


def test_chunk_edges_without_overlap_differ_only_at_the_edges(
    long_wave: np.ndarray, long_codes: np.ndarray
) -> None:
    # Without context each chunk starts from silence: its first frames differ from the
    # whole-file codes (so the overlap is what makes them equal), and from 1 s after an
    # edge on the codes are the whole-file codes again.
    bare = EncodecTokenizer("random:0", chunk_s=5.0, chunk_overlap_s=0.0)
    codes = bare.encode_one(long_wave)
    differs = (codes != long_codes).any(axis=0)
    frame = np.arange(codes.shape[1])
    since_edge = frame % 375
    assert not differs[frame < 375].any()
    assert differs[(frame >= 375) & (since_edge < 75)].any()
    assert not differs[since_edge >= 75].any()


def test_chunk_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="chunk_s"):
        EncodecTokenizer("random:0", chunk_s=-1.0)

"""The Python API (`gpa_ray.api`) on a tiny GPA and real ESC-50 clips: the README's example
as written, bit-identical embeddings alone or in any batch, the checkpoint's own
preprocessing, R = S_g + S'_p and zero-shot probabilities against plain loops, errors that
name the input, S3 checkpoints and clips, and no Ray."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpa_ray import GPA, storage
from gpa_ray.api import InputError, fixed_size_batches
from gpa_ray.audio.io import decode_audio, resample
from gpa_ray.models.gpa import Embeddings
from gpa_ray.testing.data import esc50_records
from gpa_ray.testing.models import tiny_gpa_run

README = Path(__file__).resolve().parents[1] / "README.md"
TEXTS = ["a dog barks", "rain falls on the roof while a man talks", "a bell rings", "birds"]


def readme_api_example() -> str:
    """The first Python code block of the README's "Python API" section."""
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README's Python API section has no ```python block"
    return match.group(1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_gpa_run(tmp_path_factory.mktemp("api") / "runs" / "gpa")


@pytest.fixture(scope="module")
def model(tiny_run: str) -> GPA:
    return GPA.load(tiny_run, device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def clips(shared_data: Path) -> list[Path]:
    audio = shared_data / "esc50" / "audio"
    return [audio / rec["filename"] for rec in esc50_records(shared_data / "esc50")[:6]]


def test_readme_example_runs_as_written(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # The README runs from the repository root: outputs/ below it, ../shared/data beside it.
    repo = tmp_path / "repo"
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(shared_data)
    tiny_gpa_run(repo / "outputs" / "quickstart" / "runs" / "gpa")
    monkeypatch.chdir(repo)
    namespace: dict[str, object] = {}
    exec(compile(readme_api_example(), "README.md", "exec"), namespace)
    audio, scores, probs = namespace["audio"], namespace["scores"], namespace["probs"]
    assert isinstance(audio, Embeddings) and audio.global_.shape == (2, 16)
    assert isinstance(scores, np.ndarray) and scores.shape == (2, 2)
    assert isinstance(probs, np.ndarray) and probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert "torch.Size([2, 16])" in capsys.readouterr().out


def test_a_clip_gets_the_same_bits_alone_or_in_any_batch(model: GPA, clips: list[Path]) -> None:
    wave, sr = decode_audio(clips[0].read_bytes(), str(clips[0]))
    # Mixed lengths, so a plain padded batch would change what the tower sees.
    batch = [*clips, (wave[: sr // 2], sr), clips[0].read_bytes(), (wave[:sr], sr)]
    together = model.embed_audio(batch)
    backwards = model.embed_audio(batch[::-1])
    for i, item in enumerate(batch):
        alone = model.embed_audio(item)
        assert torch.equal(alone.global_[0], together.global_[i]), i
        assert torch.equal(alone.prototypes[0], together.prototypes[i]), i
        assert torch.equal(alone.global_[0], backwards.global_[len(batch) - 1 - i]), i
    # A path, its bytes and its waveform are one clip.
    assert torch.equal(together.global_[0], together.global_[len(clips) + 1])
    assert torch.equal(model.embed_audio((wave, sr)).global_, together.global_[:1])
    # The scenario is one where batching matters: the model on one padded batch differs.
    inputs = model.audio_inputs(batch)
    with torch.inference_mode():
        padded = model.model.embed_audio(model.inputs.collate(inputs))
    assert not torch.equal(padded.global_[len(clips)], together.global_[len(clips)])


def test_a_text_gets_the_same_bits_alone_or_in_any_batch(model: GPA) -> None:
    texts = TEXTS * 2 + ["a dog barks loud"]
    together = model.embed_text(texts)
    for i, text in enumerate(texts):
        alone = model.embed_text(text)
        assert torch.equal(alone.global_[0], together.global_[i]), text
        assert torch.equal(alone.prototypes[0], together.prototypes[i]), text


def test_fixed_size_batches_calls_the_model_with_full_batches_of_one_shape() -> None:
    items = [{"x": torch.full((n,), float(i))} for i, n in enumerate([2, 3, 2, 2, 3])]
    calls: list[tuple[int, ...]] = []

    def run(batch: dict[str, torch.Tensor]) -> Embeddings:
        calls.append(tuple(batch["x"].shape))
        return Embeddings(batch["x"].sum(1, keepdim=True))

    def stack(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {"x": torch.stack([r["x"] for r in rows])}

    emb = fixed_size_batches(items, 2, stack, run)
    assert sorted(calls) == [(2, 2), (2, 2), (2, 3)]
    assert emb.global_[:, 0].tolist() == [0.0, 3.0, 4.0, 6.0, 12.0]


def test_embeddings_follow_the_checkpoints_own_preprocessing(model: GPA, clips: list[Path]) -> None:
    wave, sr = decode_audio(clips[1].read_bytes(), str(clips[1]))
    wave_16k = resample(wave, sr, 16000)
    with torch.inference_mode():
        inputs = model.inputs
        reference = model.model.embed_audio(
            inputs.collate([inputs.from_waveform(wave, sr), inputs.from_waveform(wave_16k, 16000)])
        )
        text_reference = model.model.embed_text(TEXTS[:1])
    got = model.embed_audio([clips[1], (wave_16k, 16000)])
    torch.testing.assert_close(got.global_, reference.global_, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.prototypes, reference.prototypes, rtol=0, atol=1e-5)
    text = model.embed_text(TEXTS[0])
    torch.testing.assert_close(text.global_, text_reference.global_, rtol=0, atol=1e-5)
    assert model.sample_rate == model.config.features.sample_rate


def test_score_is_global_plus_prototype_score_by_a_plain_loop(
    model: GPA, clips: list[Path]
) -> None:
    audio, texts = model.embed_audio(clips[:3]), model.embed_text(TEXTS)
    scores = model.score(clips[:3], TEXTS)
    assert scores.shape == (3, len(TEXTS)) and scores.dtype == np.float32
    scorer = model.model.scorer
    for i in range(3):
        for j in range(len(TEXTS)):
            s_g = float(sum(a * t for a, t in zip(audio.global_[i], texts.global_[j], strict=True)))
            with torch.no_grad():
                s_p = float(
                    scorer.score_pairs(audio.prototypes[i : i + 1], texts.prototypes[j : j + 1])
                )
            assert scores[i, j] == pytest.approx(s_g + s_p, abs=1e-5)
    np.testing.assert_array_equal(model.score(audio, texts), scores)


def test_zero_shot_is_a_softmax_of_the_mean_prompt_score_by_a_plain_loop(
    model: GPA, clips: list[Path]
) -> None:
    labels = ["dog", "church_bells", "rain"]
    templates = ["the sound of a {label}", "{label} can be heard"]
    probs = model.zero_shot(clips[:2], labels, templates, temperature=0.5)
    for i, clip in enumerate(clips[:2]):
        logits = []
        for label in labels:
            prompts = [t.format(label=label.replace("_", " ")) for t in templates]
            logits.append(float(np.mean(model.score(clip, prompts))) / 0.5)
        top = max(logits)
        weights = [math.exp(x - top) for x in logits]
        expected = [w / sum(weights) for w in weights]
        np.testing.assert_allclose(probs[i], expected, rtol=1e-5)
    default = model.zero_shot(clips[:2], labels)
    np.testing.assert_allclose(default.sum(axis=1), 1.0, rtol=1e-6)
    assert model.classify(clips[:2], labels) == [labels[int(k)] for k in default.argmax(axis=1)]


def test_errors_name_the_input(model: GPA, clips: list[Path], tmp_path: Path) -> None:
    missing = tmp_path / "no-such-clip.wav"
    with pytest.raises(InputError, match="no-such-clip.wav"):
        model.embed_audio([clips[0], missing])
    with pytest.raises(InputError, match=r"audio #1 \(bytes\)"):
        model.embed_audio([clips[0], b"not audio at all"])
    with pytest.raises(InputError, match=r"audio #0: expected a path.*ndarray"):
        model.embed_audio([np.zeros(16000, np.float32)])
    with pytest.raises(InputError, match=r"audio #0 \(waveform\).*shape \(2, 100\)"):
        model.embed_audio((np.zeros((2, 100), np.float32), 16000))
    with pytest.raises(InputError, match="text #1"):
        model.embed_text(["a dog", "  "])
    with pytest.raises(InputError, match="no {label} placeholder"):
        model.zero_shot(clips[0], ["dog"], template="a dog")


@pytest.mark.s3
def test_loads_an_s3_checkpoint_and_reads_s3_clips(
    lass_checkpoint: str, s3_server, clips: list[Path], tmp_path: Path
) -> None:
    remote = GPA.load(lass_checkpoint, device="cpu", storage_cfg=s3_server.storage)
    uri = s3_server.uri("api-clips", clips[0].name)
    storage.write_bytes(uri, clips[0].read_bytes(), s3_server.storage)
    from_s3 = remote.embed_audio(uri)
    assert torch.equal(from_s3.global_, remote.embed_audio(clips[0]).global_)
    assert remote.checkpoint == lass_checkpoint and len(remote.digest) == 64


def test_the_api_runs_without_ray(tiny_run: str, clips: list[Path]) -> None:
    script = (
        "import sys\n"
        "sys.modules['ray'] = None  # any `import ray` now raises ImportError\n"
        "from gpa_ray import GPA\n"
        f"model = GPA.load({tiny_run!r}, device='cpu')\n"
        f"print(model.score({str(clips[0])!r}, 'a dog barks').shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("(1, 1)")


def test_a_waveform_needs_a_positive_sample_rate(model: GPA) -> None:
    with pytest.raises(InputError, match="sample rate must be positive, got 0"):
        model.embed_audio((np.zeros(100, np.float32), 0))

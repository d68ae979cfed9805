"""The `gpa-ray` command: the console script pyproject.toml declares, every job behind it
with its own flags, and `embed` / `zero-shot` on real ESC-50 clips, whose output equals
the Python API's (in this process or on Ray Data)."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from gpa_ray import GPA
from gpa_ray.cli import main
from gpa_ray.embedding_table import embeddings_from_table
from gpa_ray.testing.data import esc50_records
from gpa_ray.testing.models import tiny_gpa_run

REPO = Path(__file__).resolve().parents[1]
JOB_FILES = sorted(p.stem for p in (REPO / "jobs").glob("*.py"))


def console_script(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the `gpa-ray` entry point pyproject.toml declares, as its installed script
    would (`module:function`, `sys.argv[0]` = "gpa-ray")."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["gpa-ray"].split(":")
    code = (
        "import sys\n"
        "sys.argv[0] = 'gpa-ray'\n"
        f"from {module} import {function}\n"
        f"sys.exit({function}())\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO
    )


def test_help_lists_every_job_and_tool() -> None:
    result = console_script("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: gpa-ray")
    assert len(JOB_FILES) >= 9
    for name in [*JOB_FILES, "embed", "search", "zero-shot"]:
        assert f"    {name}" in result.stdout, name


@pytest.mark.parametrize("job", JOB_FILES)
def test_each_job_takes_its_own_flags(job: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([job.replace("_", "-"), "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: gpa-ray {job} [-h] [--config CONFIG] [--set KEY=VALUE]")
    assert "config keys (KEY=VALUE" in out
    with pytest.raises(SystemExit) as exc:
        main([job, "--config", "debug", "train.lrr=1"])
    assert exc.value.code == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err


@pytest.mark.parametrize("tool", ["embed", "search", "zero-shot"])
def test_each_tool_has_help(tool: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([tool, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: gpa-ray {tool}") and "--config" in out and "--set" in out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_gpa_run(tmp_path_factory.mktemp("cli") / "runs" / "gpa")


@pytest.fixture(scope="module")
def clip_folder(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 real ESC-50 clips linked into a folder (two in a subfolder), plus a file that
    is not audio."""
    folder = tmp_path_factory.mktemp("clips")
    (folder / "more").mkdir()
    for i, rec in enumerate(esc50_records(shared_data / "esc50")[:12]):
        where = folder / "more" if i >= 10 else folder
        (where / rec["filename"]).symlink_to(shared_data / "esc50" / "audio" / rec["filename"])
    (folder / "broken.wav").write_bytes(b"RIFF....WAVEfmt this is not audio")
    return folder


def read_output(path: Path) -> tuple[list[str], object, dict[bytes, bytes]]:
    table = pq.read_table(path)
    return (
        table.column("source_uri").to_pylist(),
        embeddings_from_table(table),
        table.schema.metadata,
    )


def check_equals_api(path: Path, run: str) -> None:
    uris, emb, metadata = read_output(path)
    model = GPA.load(run, device="cpu")
    assert metadata[b"gpa_ray.checkpoint"].decode() == model.checkpoint
    assert metadata[b"gpa_ray.weights_sha256"].decode() == model.digest
    assert not any(u.endswith("broken.wav") for u in uris) and len(uris) == 12
    batched = model.embed_audio(uris)
    assert torch.equal(emb.global_, batched.global_)
    assert torch.equal(emb.prototypes, batched.prototypes)
    for i in (0, 7, 11):
        alone = model.embed_audio(uris[i])
        assert torch.equal(emb.global_[i], alone.global_[0])
        assert torch.equal(emb.prototypes[i], alone.prototypes[0])


def test_embed_in_process_equals_the_api(
    tiny_run: str, clip_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "emb" / "clips.parquet"
    code = main(["embed", str(clip_folder), "--model", tiny_run, "-o", str(out), "--ray", "never"])
    assert code == 1  # the broken file
    printed = capsys.readouterr()
    assert "embedded: 13/13" in printed.err
    assert "broken.wav: cannot decode audio" in printed.err
    summary = json.loads(printed.out)
    assert summary["ray"] is False and summary["embedded"] == 12 and summary["failed"] == 1
    check_equals_api(out, tiny_run)


def test_embed_on_ray_data_equals_the_api(
    ray_session: None,
    tiny_run: str,
    clip_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "clips.parquet"
    args = ["--cpus-per-actor", "0.5", "--rows-per-task", "4", "--local-max", "4"]
    code = main(["embed", str(clip_folder), "--model", tiny_run, "-o", str(out), *args])
    assert code == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["ray"] is True and summary["embedded"] == 12
    check_equals_api(out, tiny_run)


def test_embed_refuses_inputs_without_audio(
    tiny_run: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("no audio here")
    for given, message in [
        (tmp_path, "no audio files"),
        (tmp_path / "nothing", "no such file or folder"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["embed", str(given), "--model", tiny_run, "-o", str(tmp_path / "x.parquet")])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"gpa-ray: error: {given}: {message}" in err


def test_zero_shot_prints_the_apis_probabilities(
    tiny_run: str, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = esc50_records(shared_data / "esc50")[:3]
    clips = [str(shared_data / "esc50" / "audio" / r["filename"]) for r in records]
    labels = ["dog", "rain", "church_bells", "crying_baby"]
    templates = ["the sound of a {label}", "{label}"]
    args = ["zero-shot", *clips, "--model", tiny_run, "--labels", *labels, "--json", "--top", "2"]
    assert main([*args, "--template", templates[0], "--template", templates[1]]) == 0
    rows = json.loads(capsys.readouterr().out)
    probs = GPA.load(tiny_run, device="cpu").zero_shot(clips, labels, templates)
    assert [r["source_uri"] for r in rows] == clips
    for row, p in zip(rows, probs, strict=True):
        best = sorted(range(len(labels)), key=lambda j: -p[j])[:2]
        assert list(row["labels"]) == [labels[j] for j in best]
        assert list(row["labels"].values()) == pytest.approx([float(p[j]) for j in best])


@pytest.mark.slow
def test_embed_of_the_shared_esc50_folder_equals_the_api(
    ray_session: None, tiny_run: str, shared_data: Path, tmp_path: Path, capsys
) -> None:
    folder = shared_data / "esc50" / "audio"
    out = tmp_path / "esc50.parquet"
    args = ["--cpus-per-actor", "0.5", "--actors", "2"]
    assert main(["embed", str(folder), "--model", tiny_run, "-o", str(out), *args]) == 0
    summary = json.loads(capsys.readouterr().out)
    uris, emb, _ = read_output(out)
    assert summary["ray"] is True and len(uris) == len(list(folder.glob("*.wav"))) == 414
    model = GPA.load(tiny_run, device="cpu")
    batched = model.embed_audio(uris)
    assert torch.equal(emb.global_, batched.global_)
    assert torch.equal(emb.prototypes, batched.prototypes)
    assert torch.equal(emb.global_[100], model.embed_audio(uris[100]).global_[0])

"""Ingest: work units and encoding without Ray, then real runs of `jobs/ingest.py` on Ray
(real clips, bad files, S3 output, a SIGKILL of the driver followed by a resume)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from gpa_ray import storage
from gpa_ray.config import Config, StorageConfig
from gpa_ray.config_loading import load_config
from gpa_ray.data import schema
from gpa_ray.data.corpora import iter_manifest
from gpa_ray.data.ingest import ClipEncoder, ClipFailure, _prefetch, clip_shard_table
from gpa_ray.data.loaders import LoaderError, codes_from_arrow
from gpa_ray.data.work_units import (
    IngestError,
    Layout,
    build_manifest,
    load_or_build_manifest,
    output_settings,
    read_unit_rows,
    rows_per_unit,
)
from gpa_ray.testing.cluster import descendant_pids
from gpa_ray.testing.jobs import job_main

REPO = Path(__file__).resolve().parents[2]


def _clips(output: str, storage_cfg: StorageConfig | None = None) -> pa.Table:
    return storage.read_parquet(storage.join(output, "clips"), storage_cfg)


def _errors(output: str, storage_cfg: StorageConfig | None = None) -> list[dict[str, Any]]:
    if not storage.list_files(storage.join(output, "errors"), ".parquet", storage_cfg):
        return []
    return storage.read_parquet(storage.join(output, "errors"), storage_cfg).to_pylist()


def _summary(output: str, storage_cfg: StorageConfig | None = None) -> dict[str, Any]:
    return json.loads(storage.read_bytes(storage.join(output, "summary.json"), storage_cfg))


def _wav(seconds: float, sr: int = 16000, freq: float = 440.0) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, format="WAV")
    return buf.getvalue()


@pytest.fixture
def one_torch_thread():
    """EnCodec on one thread, as in the actors (and kinder to a shared 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- without Ray


def _tiny_folder(root: Path, splits: list[str]) -> None:
    lines = ["file_name,caption,split"]
    lines += [f"c{i:02d}.wav,caption {i},{s}" for i, s in enumerate(splits)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "captions.csv").write_text("\n".join(lines) + "\n")


def test_rows_per_unit_is_capped_by_target_shard_size() -> None:
    cfg = load_config(overrides=["ingest.rows_per_commit=1000", "ingest.target_shard_mb=1"])
    # A nominal 10 s clip: 750 x 4 int16 codes (6,000 B) + FLAC at 32 kHz, 16 bit, ~0.6 of
    # 640,000 B (384,000 B) = 390,000 B; 1 MiB / 390,000 B -> 2 clips per unit.
    assert rows_per_unit(cfg) == 2
    no_audio = load_config(overrides=["ingest.target_shard_mb=1", "ingest.store_audio=false"])
    assert rows_per_unit(no_audio) == 64  # 1 MiB / 6,000 B = 174 > rows_per_commit


def test_units_are_deterministic_and_never_mix_splits(tmp_path: Path) -> None:
    splits = ["train", "test", "train", "train", "val", "test", "train", "train"]
    _tiny_folder(tmp_path / "corpus", splits)
    overrides = [
        f"corpus.root={tmp_path / 'corpus'}",
        "ingest.rows_per_commit=2",
        "ingest.units_per_manifest_file=2",
    ]
    tables = []
    for run in ("a", "b"):
        cfg = load_config(overrides=[*overrides, f"ingest.output={tmp_path / run}"])
        layout = Layout(cfg.ingest.output, "folder")
        plan = build_manifest(cfg, layout)
        rows = [read_unit_rows(cfg, layout, u["unit"], u["file"]) for u in plan["units"]]
        tables.append((plan["units"], rows))
    assert tables[0] == tables[1]
    units, rows = tables[0]
    # A unit is numbered when its split's buffer fills (train at c02, test at c05, train
    # at c06), then the remainders follow in first-seen split order (train c07, val c04).
    assert [[r["clip_id"] for r in unit] for unit in rows] == [
        ["folder/c00.wav", "folder/c02.wav"],
        ["folder/c01.wav", "folder/c05.wav"],
        ["folder/c03.wav", "folder/c06.wav"],
        ["folder/c07.wav"],
        ["folder/c04.wav"],
    ]
    assert [u["split"] for u in units] == ["train", "test", "train", "train", "val"]
    assert [u["file"] for u in units] == [0, 0, 1, 1, 2]
    assert all(
        {r["split"] for r in unit} == {u["split"]} for u, unit in zip(units, rows, strict=True)
    )


def test_resume_refuses_a_different_corpus(tmp_path: Path) -> None:
    _tiny_folder(tmp_path / "corpus", ["train"] * 3)
    base = [f"corpus.root={tmp_path / 'corpus'}", f"ingest.output={tmp_path / 'out'}"]
    cfg = load_config(overrides=base)
    layout = Layout(cfg.ingest.output, "folder")
    first = load_or_build_manifest(cfg, layout)
    # Changing the unit size keeps the stored units (so committed work stays valid).
    again = load_or_build_manifest(
        load_config(overrides=[*base, "ingest.rows_per_commit=1"]), layout
    )
    assert again["units"] == first["units"]
    with pytest.raises(IngestError, match="corpus, store_audio differ"):
        load_or_build_manifest(
            load_config(overrides=[*base, "corpus.limit=2", "ingest.store_audio=false"]), layout
        )
    # An output of the older layout (one clips file per unit, no compaction) is refused.
    stored = json.loads(Path(layout.unit_plan_file).read_text())
    del stored["layout"]
    Path(layout.unit_plan_file).write_text(json.dumps(stored))
    with pytest.raises(IngestError, match="older ingest .* re-ingest into a new ingest.output"):
        load_or_build_manifest(cfg, layout)


def test_codes_column_round_trips_int16() -> None:
    rng = np.random.default_rng(0)
    codes = [rng.integers(0, 1024, size=(4, t)).astype(np.int16) for t in (3, 0, 5)]
    array = schema.codes_array(codes)
    assert array.type == schema.CODES
    assert [np.array(c, dtype=np.int16).reshape(4, -1).tolist() for c in array.to_pylist()] == [
        c.tolist() for c in codes
    ]


def test_prefetch_keeps_order_and_window() -> None:
    from concurrent.futures import ThreadPoolExecutor

    started: list[int] = []

    def fetch(row: dict) -> bytes:
        started.append(row["i"])
        time.sleep(0.01 * (5 - row["i"] % 5))
        return bytes([row["i"]])

    rows = [{"i": i} for i in range(12)]
    with ThreadPoolExecutor(4) as pool:
        seen = []
        for row, future in _prefetch(fetch, rows, pool, window=3):
            seen.append((row["i"], future.result()))
            # Never more than `window` fetches submitted beyond what was consumed.
            assert len(started) <= len(seen) + 3
    assert seen == [(i, bytes([i])) for i in range(12)]


def _tone_row(path: Path, start_s: float) -> dict[str, Any]:
    """A manifest row for one local file."""
    return {
        "clip_id": "t/tone",
        "corpus": "t",
        "split": "train",
        "source_uri": str(path),
        "start_s": start_s,
        "duration_s": None,
        "captions": ["a tone"],
        "labels": [],
    }


def test_clip_encoder_stages_and_segments(tmp_path: Path, one_torch_thread) -> None:
    cfg = load_config(overrides=["ingest.audio_sample_rate=16000", "ingest.max_seconds=1.5"])
    encoder = ClipEncoder(cfg)
    (tmp_path / "tone.wav").write_bytes(_wav(2.0))
    row = _tone_row(tmp_path / "tone.wav", start_s=0.25)
    out = encoder.process(row, encoder.fetch(row))
    # Segment from 0.25 s, cropped to max_seconds = 1.5 s: 24,000 samples at 16 kHz;
    # codes T = ceil(1.5 s * 24000 * 75 / 24000) = 113 (112.5 rounded up).
    assert out["n_samples"] == 24000 and out["duration_s"] == 1.5
    assert out["codes"].shape == (4, 113) and out["codes"].dtype == np.int16
    assert sf.info(io.BytesIO(out["audio"])).frames == 24000
    with pytest.raises(ClipFailure) as missing:
        encoder.fetch({**row, "source_uri": str(tmp_path / "nope.wav")})
    assert missing.value.stage == "locate" and "no such file" in missing.value.error
    with pytest.raises(ClipFailure) as beyond:
        encoder.process({**row, "start_s": 3.0}, encoder.fetch(row))
    assert beyond.value.stage == "decode" and "EmptySegment" in beyond.value.error


def test_pad_to_max_seconds_stores_every_clip_at_that_length(
    tmp_path: Path, one_torch_thread
) -> None:
    """AudioFormer's FSD50K protocol: shorter clips zero-padded, longer ones truncated, to
    10 s (here 1.5 s), so every clip has the same codes length; off, a clip keeps its own."""
    overrides = ["ingest.audio_sample_rate=16000", "ingest.max_seconds=1.5"]
    padded = ClipEncoder(load_config(overrides=[*overrides, "ingest.pad_to_max_seconds=true"]))
    plain = ClipEncoder(load_config(overrides=overrides))
    for seconds in (0.5, 2.0):
        path = tmp_path / f"tone{seconds}.wav"
        path.write_bytes(_wav(seconds))
        row = _tone_row(path, start_s=0.0)
        out = padded.process(row, padded.fetch(row))
        assert out["n_samples"] == 24000 and out["duration_s"] == 1.5
        assert out["codes"].shape == (4, 113)
        audio, _ = sf.read(io.BytesIO(out["audio"]), dtype="float32")
        tone = 8000 if seconds == 0.5 else 24000
        assert np.abs(audio[:tone]).max() > 0.1 and not np.any(audio[tone:])
        own = plain.process(row, plain.fetch(row))
        assert own["n_samples"] == min(tone, 24000)
    assert "pad_to_max_seconds" not in output_settings(plain.cfg)
    assert output_settings(padded.cfg)["pad_to_max_seconds"] is True
    with pytest.raises(ValueError, match="ingest.max_seconds"):
        ClipEncoder(load_config(overrides=["ingest.pad_to_max_seconds=true"]))


def test_without_codes_there_is_no_encodec_and_readers_say_why(
    tmp_path: Path, one_torch_thread
) -> None:
    encoder = ClipEncoder(load_config(overrides=["ingest.codes=false", "ingest.max_seconds=1"]))
    assert encoder.tokenizer is None
    (tmp_path / "tone.wav").write_bytes(_wav(2.0))
    row = _tone_row(tmp_path / "tone.wav", start_s=0.0)
    out = encoder.process(row, encoder.fetch(row))
    assert out["codes"] is None and sf.info(io.BytesIO(out["audio"])).frames == 32000
    table = clip_shard_table([out, out])
    assert table.schema == schema.CLIP_SCHEMA and table.column("codes").null_count == 2
    with pytest.raises(LoaderError, match="ingest.codes=true"):
        codes_from_arrow(table.column("codes"))


def test_batched_encoding_matches_single_and_isolates_failures(one_torch_thread) -> None:
    encoder = ClipEncoder(load_config(overrides=["ingest.store_audio=false"]))
    rng = np.random.default_rng(1)
    row = {"clip_id": "x", "corpus": "x", "split": "train", "source_uri": "", "start_s": 0.0}
    items = [
        ({**row, "clip_id": f"c{i}"}, (0.1 * rng.standard_normal(n)).astype(np.float32), 16000)
        for i, n in enumerate([8000, 20000, 12345])
    ]
    batched = encoder.encode(items)
    singles = [encoder.encode([item])[0] for item in items]
    for b, s in zip(batched, singles, strict=True):
        np.testing.assert_array_equal(b["codes"], s["codes"])
    # A clip EnCodec rejects (2-D here) fails alone, at stage encode; the others still pass.
    broken = (items[1][0], np.zeros((2, 100), np.float32), 16000)
    outs = encoder.encode([items[0], broken, items[2]])
    assert isinstance(outs[1], ClipFailure) and outs[1].stage == "encode"
    np.testing.assert_array_equal(outs[2]["codes"], singles[2]["codes"])
    assert encoder.encode([]) == []


# ---------------------------------------------------------------- on Ray


def _bad_folder_corpus(root: Path, shared_data: Path) -> dict[str, str]:
    """Three real ESC-50 clips plus an empty file, a truncated WAV, a text file named
    `.mp3`, and an index row whose file does not exist. Returns file -> expected stage."""
    esc = shared_data / "esc50" / "audio"
    good = sorted(p.name for p in esc.iterdir())[:3]
    audio = root / "audio"
    audio.mkdir(parents=True)
    for name in good:
        (audio / name).write_bytes((esc / name).read_bytes())
    (audio / "empty.wav").write_bytes(b"")
    whole = (esc / good[0]).read_bytes()
    (audio / "truncated.wav").write_bytes(whole[: len(whole) // 2])
    (audio / "notes.mp3").write_text("These are meeting notes, not audio.\n" * 20)
    expected = {name: "ok" for name in good}
    expected.update(
        {
            "empty.wav": "decode",
            "truncated.wav": "decode",
            "notes.mp3": "decode",
            "gone.wav": "locate",
        }
    )
    lines = ["file_name,caption,split,labels"]
    for i, name in enumerate(expected):
        lines += [f"{name},caption {i} a,train,l{i}", f"{name},caption {i} b,train,l{i}"]
    (root / "captions.csv").write_text("\n".join(lines) + "\n")
    return expected


def test_bad_files_become_error_rows_and_rerun_skips(
    ray_session, shared_data: Path, tmp_path: Path
) -> None:
    expected = _bad_folder_corpus(tmp_path / "corpus", shared_data)
    out = str(tmp_path / "out")
    args = [
        "corpus.kind=folder",
        f"corpus.root={tmp_path / 'corpus'}",
        f"ingest.output={out}",
        "ingest.rows_per_commit=2",
        "ingest.encode_pool.actors=1",
    ]
    main = job_main("ingest")
    assert main(args) == 0
    clips = _clips(out)
    good = sorted(f"folder/{n}" for n, s in expected.items() if s == "ok")
    assert sorted(clips.column("clip_id").to_pylist()) == good
    for row in clips.to_pylist():
        i = list(expected).index(row["clip_id"].split("/", 1)[1])
        assert row["captions"] == [f"caption {i} a", f"caption {i} b"]
        assert row["labels"] == [f"l{i}"]
        assert np.array(row["codes"]).shape == (4, 375)  # 5.0 s at 75 frames/s
        assert row["sample_rate"] == 44100 and row["n_samples"] == 220500
        assert sf.info(io.BytesIO(row["audio"])).samplerate == 32000
    assert clips.schema.field("codes").type == schema.CODES
    errors = {Path(e["source_uri"]).name: e for e in _errors(out)}
    assert {n: e["stage"] for n, e in errors.items()} == {
        n: s for n, s in expected.items() if s != "ok"
    }
    assert "empty file" in errors["empty.wav"]["error"]
    assert "truncated WAV" in errors["truncated.wav"]["error"]
    assert errors["notes.mp3"]["error"].startswith("AudioDecodeError: cannot decode audio")
    assert "no such file" in errors["gone.wav"]["error"]
    summary = _summary(out)
    assert summary["clips_ok"] == 3 and summary["clips_failed"] == 4
    assert summary["failed_by_stage"] == {"locate": 1, "read": 0, "decode": 3, "encode": 0}
    assert summary["audio_hours"] == pytest.approx(15.0 / 3600)
    assert storage.exists(storage.join(out, "config.yaml"))
    # A rerun on the same output commits nothing new and changes nothing.
    assert main(args) == 0
    again = _summary(out)
    assert again["this_run"]["units_committed"] == 0
    assert again["this_run"]["units_skipped"] == summary["units"] == 4
    assert again["clips_ok"] == 3 and again["failed_by_stage"] == summary["failed_by_stage"]
    assert sorted(_clips(out).column("clip_id").to_pylist()) == good
    assert again["failure"] is None  # 4 of 7 failed: under the default share (1.0)
    assert {(e["stage"], e["count"]) for e in again["commonest_errors"]} == {
        ("decode", 3),
        ("locate", 1),
    }
    # The same output judged with a stricter share: the job exits non-zero, naming why.
    assert main([*args, "ingest.max_failed_share=0.5"]) == 1
    assert "4 of 7 clips failed (57%)" in _summary(out)["failure"]


def test_an_ingest_where_every_clip_fails_exits_non_zero(
    ray_session, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _bad_folder_corpus(tmp_path / "corpus", shared_data)
    out = str(tmp_path / "out")
    args = [
        "corpus.kind=folder",
        f"corpus.root={tmp_path / 'corpus'}",
        "corpus.audio_dir=no-such-folder",  # the classic: every file fails at locate
        f"ingest.output={out}",
        "ingest.encode_pool.actors=1",
        "ingest.store_audio=false",
    ]
    assert job_main("ingest")(args) == 1
    err = capsys.readouterr().err
    assert "ingest failed: every one of the 7 clips failed" in err
    assert "7 x locate: FileNotFoundError" in err and "no-such-folder" in err
    summary = _summary(out)
    assert summary["clips_ok"] == 0 and summary["failed_by_stage"]["locate"] == 7
    (top,) = summary["commonest_errors"]
    assert (top["stage"], top["type"], top["count"]) == ("locate", "FileNotFoundError", 7)


@pytest.mark.parametrize(
    ("kind", "folder", "extra", "limit"),
    [
        ("clotho", "clotho_demo", ["corpus.caption_files=[captions_for_clips.csv]"], 1),
        ("audiocaps", "audiocaps_demo", [], 3),
    ],
)
def test_demo_corpora_subset(
    ray_session, shared_data: Path, tmp_path: Path, kind: str, folder: str, extra: list, limit: int
) -> None:
    out = str(tmp_path / "out")
    args = [f"corpus.kind={kind}", f"corpus.root={shared_data / folder}", f"ingest.output={out}"]
    args += [
        *extra,
        f"corpus.limit={limit}",
        "ingest.encode_pool.actors=1",
        "ingest.store_audio=false",
    ]
    assert job_main("ingest")(args) == 0
    _check_demo(out, args, limit)


def _check_demo(out: str, args: list[str], n_clips: int) -> None:
    """Every clip present with its 5 captions as the corpus index lists them."""
    rows = _clips(out).to_pylist()
    assert len(rows) == n_clips and _errors(out) == []
    index = {r["clip_id"]: r for r in iter_manifest(load_config(overrides=args).corpus)}
    for row in rows:
        assert len(row["captions"]) == 5
        assert row["captions"] == index[row["clip_id"]]["captions"]
        # T = ceil(n_24k * 75 / 24000), n_24k = ceil(n * 24000 / sr) (torchaudio's length).
        n24 = -(-row["n_samples"] * 24000 // row["sample_rate"])
        assert np.array(row["codes"]).shape == (4, -(-n24 * 75 // 24000))


@pytest.mark.s3
def test_esc50_subset_to_s3(ray_session, shared_data: Path, s3_server) -> None:
    out = s3_server.uri("ingest-subset")
    args = [
        "corpus.kind=esc50",
        f"corpus.root={shared_data / 'esc50'}",
        "corpus.limit=4",
        f"ingest.output={out}",
        *s3_server.overrides(),
        "ingest.encode_pool.actors=1",
    ]
    assert job_main("ingest")(args) == 0
    _check_esc50(out, 4, s3_server.storage)


def _check_esc50(out: str, n: int, storage_cfg: StorageConfig | None = None) -> None:
    clips = _clips(out, storage_cfg).to_pylist()
    assert len(clips) == n
    assert len({c["clip_id"] for c in clips}) == n
    assert _errors(out, storage_cfg) == []
    assert all(np.array(c["codes"], dtype=np.int16).shape == (4, 375) for c in clips)
    assert all(
        len(c["labels"]) == 1 and c["labels"][0] in c["captions"][0].replace(" ", "_")
        for c in clips
    )
    assert _summary(out, storage_cfg)["clips_ok"] == n


@pytest.mark.slow
@pytest.mark.parametrize("target", ["local", "s3"])
def test_esc50_all_414_clips(
    ray_session, shared_data: Path, tmp_path: Path, target: str, request
) -> None:
    args = [
        "corpus.kind=esc50",
        f"corpus.root={shared_data / 'esc50'}",
        "ingest.rows_per_commit=32",
    ]
    storage_cfg = None
    if target == "s3":
        server = request.getfixturevalue("s3_server")
        storage_cfg = server.storage
        out = server.uri("ingest-esc50")
        args += server.overrides()
    else:
        out = str(tmp_path / "out")
    assert job_main("ingest")([*args, f"ingest.output={out}"]) == 0
    _check_esc50(out, 414, storage_cfg)
    labels = {c["clip_id"]: c["labels"] for c in _clips(out, storage_cfg).to_pylist()}
    for row in iter_manifest(load_config(overrides=args[:2]).corpus):
        assert labels[row["clip_id"]] == row["labels"]


@pytest.mark.slow
def test_demo_corpora_full(ray_session, shared_data: Path, tmp_path: Path) -> None:
    for kind, folder, extra, n_clips in [
        ("clotho", "clotho_demo", ["corpus.caption_files=[captions_for_clips.csv]"], 7),
        ("audiocaps", "audiocaps_demo", [], 14),
    ]:
        out = str(tmp_path / kind)
        args = [f"corpus.kind={kind}", f"corpus.root={shared_data / folder}", *extra]
        assert job_main("ingest")([*args, f"ingest.output={out}"]) == 0
        _check_demo(out, args, n_clips)


# ---------------------------------------------------------------- kill and resume


def _kill_after_first_commit(command: list[str], env: dict, commits: Path, log: Path) -> None:
    """Run the job as its own process (own embedded Ray) and SIGKILL the driver as soon as
    the first unit is committed; then make sure every process it started is gone."""
    seen: set[int] = set()
    with open(log, "wb") as sink:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not (commits.is_dir() and any(commits.iterdir())):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no unit committed within 240 s"
                seen.update(descendant_pids(proc.pid))
                time.sleep(0.05)
            seen.update(descendant_pids(proc.pid))
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            # The killed driver's embedded Ray shuts itself down; make sure, by PID.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in seen):
                time.sleep(0.5)
            for pid in seen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _reference(cfg: Config) -> dict[str, dict[str, Any]]:
    """A clean result computed by the plain single-process loop (no Ray)."""
    encoder = ClipEncoder(cfg)
    rows = iter_manifest(cfg.corpus, cfg.storage)
    return {row["clip_id"]: encoder.process(row, encoder.fetch(row)) for row in rows}


def test_sigkill_mid_run_then_resume_matches_clean_run(
    ray_session, shared_data: Path, tmp_path: Path, one_torch_thread
) -> None:
    out = tmp_path / "out"
    args = [
        "corpus.kind=esc50",
        f"corpus.root={shared_data / 'esc50'}",
        "corpus.limit=8",
        f"ingest.output={out}",
        "ingest.rows_per_commit=1",
        "ingest.audio_sample_rate=16000",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    commits = out / "_commits" / "esc50"
    command = [sys.executable, str(REPO / "jobs" / "ingest.py"), *args, "ray.address=local"]
    _kill_after_first_commit([*command, "ray.num_cpus=2"], env, commits, tmp_path / "killed.log")
    n_committed = len(list(commits.iterdir()))
    assert 1 <= n_committed < 8, f"the kill should land mid-run ({n_committed}/8 units)"
    # No partial file is visible: every staged unit file is a whole parquet file, and
    # readers see nothing before compaction.
    parts = storage.list_files(str(out / "units"), ".parquet")
    assert 1 <= len(parts) <= n_committed + 2  # committed, or whole and being redone
    for part in parts:
        pq.read_table(part)
    assert storage.list_files(str(out / "clips"), ".parquet") == []

    assert job_main("ingest")(args) == 0
    summary = _summary(str(out))
    assert summary["this_run"]["units_skipped"] == n_committed
    assert summary["clips_ok"] == 8 and summary["clips_failed"] == 0
    clips = _clips(str(out)).to_pylist()
    ids = [c["clip_id"] for c in clips]
    assert len(ids) == len(set(ids)) == 8
    reference = _reference(load_config(overrides=args))
    assert set(ids) == set(reference)
    for clip in clips:
        ref = reference[clip["clip_id"]]
        np.testing.assert_array_equal(np.array(clip["codes"], dtype=np.int16), ref["codes"])
        assert clip["audio"] == ref["audio"]
        assert Counter(clip["captions"]) == Counter(ref["captions"])

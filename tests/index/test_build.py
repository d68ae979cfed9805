"""Index build: the per-unit embedder against a plain loop, failures, resume, the bias join,
and `jobs/build_index.py` on Ray Data over real ESC-50 clip shards."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gpa_ray import storage
from gpa_ray.audio.inputs import AudioInputs
from gpa_ray.checkpoints import read_config, weights_digest, write_run_summary
from gpa_ray.config import Config
from gpa_ray.config_loading import load_config
from gpa_ray.data.schema import text_id
from gpa_ray.embedding_table import embeddings_from_table
from gpa_ray.index import mapped, store
from gpa_ray.index.build import (
    IndexBuildError,
    IndexEmbedder,
    commit_version,
    plan_build,
    run_build_index,
)
from gpa_ray.models.factory import load_gpa
from gpa_ray.models.gpa import Embeddings
from gpa_ray.serve.retriever import IndexMismatchError, SearchService, load_model
from gpa_ray.testing.data import write_esc50_clip_shards
from gpa_ray.testing.jobs import job_main
from gpa_ray.testing.models import tiny_gpa_checkpoint


def _args(clips: str, checkpoint: str, output: Path, *extra: str) -> list[str]:
    return [
        f"index.input={clips}",
        f"index.checkpoint={checkpoint}",
        f"index.output={output}",
        "index.dtype=float32",
        "index.embed_pool.actors=1",
        "index.embed_pool.batch_size=3",
        *extra,
    ]


def _cfg(*args: str) -> Config:
    return load_config(overrides=list(args))


def _rows(clips: str) -> list[dict]:
    return [
        row
        for uri in storage.list_files(clips, ".parquet")
        for row in storage.read_parquet(uri).to_pylist()
    ]


@torch.no_grad()
def _plain_loop(checkpoint: str, rows: list[dict]) -> tuple[Embeddings, Embeddings]:
    """The reference: every clip and every caption embedded on its own."""
    model, model_cfg = load_gpa(checkpoint)
    inputs = AudioInputs.from_config(model_cfg)
    audio = Embeddings.cat(
        [model.embed_audio(inputs.collate([inputs.from_row(row)])) for row in rows]
    )
    texts = Embeddings.cat(
        [model.embed_text([caption]) for row in rows for caption in row["captions"]]
    )
    return audio, texts


def _text_ids(rows: list[dict]) -> list[str]:
    return [text_id(r["clip_id"], i) for r in rows for i in range(len(r["captions"]))]


def _close(a: Embeddings, b: Embeddings) -> None:
    torch.testing.assert_close(a.global_, b.global_, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.prototypes, b.prototypes, atol=1e-5, rtol=0)


def test_unit_embedder_matches_plain_loop_and_records_failures(
    esc50_clips: str, gpa_checkpoint: str, tmp_path: Path
) -> None:
    shard = storage.read_parquet(storage.list_files(esc50_clips, ".parquet")[0])
    rows = shard.to_pylist()
    rows[1]["audio"] = None  # a clip ingested without audio cannot be embedded by a CNN
    storage.write_parquet(
        str(tmp_path / "in" / "part-0.parquet"), pa.Table.from_pylist(rows, shard.schema)
    )
    cfg = _cfg(*_args(str(tmp_path / "in"), gpa_checkpoint, tmp_path / "index"))
    plan = plan_build(cfg)
    stats = IndexEmbedder(dataclasses.asdict(cfg), plan.layout.version, plan.files).run_unit(0)
    kept = [r for i, r in enumerate(rows) if i != 1]
    assert stats == {
        "unit": 0,
        "clips": len(kept),
        "segments": len(kept),
        "window": None,
        "texts": sum(len(r["captions"]) for r in kept),
        "failed": 1,
        "reused": 0,
        "deleted": 0,
        "with_audio": len(kept),
        "embed_dim": 16,
        "n_prototypes": 4,
    }
    marker = json.loads(storage.read_bytes(plan.layout.commit_marker(0)))
    assert marker["failed"][0]["clip_id"] == rows[1]["clip_id"]
    assert "no stored audio" in marker["failed"][0]["error"]
    clips = pq.read_table(plan.layout.clips_file(0))
    texts = pq.read_table(plan.layout.texts_file(0))
    assert clips.column("clip_id").to_pylist() == [r["clip_id"] for r in kept]
    assert clips.column("audio").to_pylist() == [r["audio"] for r in kept]
    assert texts.column("text").to_pylist() == [c for r in kept for c in r["captions"]]
    audio_ref, text_ref = _plain_loop(gpa_checkpoint, kept)
    _close(embeddings_from_table(clips), audio_ref)
    _close(embeddings_from_table(texts), text_ref)


def test_build_job_resumes_and_reruns_are_no_ops(
    esc50_clips: str, gpa_checkpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = _args(esc50_clips, gpa_checkpoint, tmp_path / "index", "index.version=v1")
    cfg = _cfg(*args)
    plan = plan_build(cfg)
    assert len(plan.files) == 2
    # Unit 0 committed by an earlier (interrupted) run: only unit 1 is left to do.
    IndexEmbedder(dataclasses.asdict(cfg), "v1", plan.files).run_unit(0)
    assert job_main("build_index")(args) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = _rows(esc50_clips)
    assert summary["version"] == "v1" and summary["units_this_run"] == 1
    assert (summary["clips"], summary["texts"]) == (8, sum(len(r["captions"]) for r in rows))
    assert summary["clips_with_audio"] == 8 and summary["failed_clips"] == 0
    (index,) = mapped.open_version(str(tmp_path / "index"))
    assert index.version == "v1" and index.manifest.checkpoint == gpa_checkpoint
    assert sorted(index.clips.ids.to_pylist()) == sorted(r["clip_id"] for r in rows)
    audio_ref, text_ref = _plain_loop(gpa_checkpoint, rows)
    clip_rows = [index.clips.position(r["clip_id"]) for r in rows]
    text_rows = [index.texts.position(t) for t in _text_ids(rows)]
    _close(index.clips.embeddings(np.array(clip_rows)), audio_ref)
    _close(index.texts.embeddings(np.array(text_rows)), text_ref)
    data, rate = index.clip_audio(rows[5]["clip_id"])
    assert data == rows[5]["audio"] and rate == 32000
    # A complete version is left alone; other settings under its name are refused.
    assert run_build_index(cfg)["units_this_run"] == 0
    with pytest.raises(IndexBuildError, match="dtype"):
        run_build_index(_cfg(*args, "index.dtype=float16"))


def test_bias_is_joined_and_must_cover_every_caption(
    esc50_clips: str, gpa_checkpoint: str, tmp_path: Path
) -> None:
    from gpa_ray.bias_file import BIAS_FILE, BIAS_SCHEMA, META_FILE

    rows = _rows(esc50_clips)
    ids = _text_ids(rows)
    bias_dir = tmp_path / "bias"
    table = pa.table(
        {
            "text_id": ids[::-1],
            "clip_id": [i.split("#")[0] for i in ids[::-1]],
            "caption": ["c"] * len(ids),
            "bias": [0.01 * n for n in range(len(ids))][::-1],
            "qb_lse": [0.0] * len(ids),
            "qb_active": [True] * len(ids),
        },
        schema=BIAS_SCHEMA,
    )
    storage.write_parquet(str(bias_dir / BIAS_FILE), table)
    storage.write_bytes(str(bias_dir / META_FILE), json.dumps({"G": 3, "J": len(ids)}).encode())
    cfg = _cfg(*_args(esc50_clips, gpa_checkpoint, tmp_path / "index", f"index.bias={bias_dir}"))
    plan = plan_build(cfg)
    embedder = IndexEmbedder(dataclasses.asdict(cfg), plan.layout.version, plan.files)
    for unit in range(len(plan.files)):
        embedder.run_unit(unit)
    manifest = commit_version(cfg, plan, {})
    assert manifest.bias == {"uri": str(bias_dir), "metadata": {"G": 3, "J": len(ids)}}
    (index,) = mapped.open_version(str(tmp_path / "index"))
    stored = index.texts.bias[[index.texts.position(t) for t in ids]]
    torch.testing.assert_close(
        torch.from_numpy(stored), 0.01 * torch.arange(len(ids), dtype=torch.float32)
    )
    # A bias computed over other captions cannot be used with this index.
    storage.write_parquet(str(bias_dir / BIAS_FILE), table.slice(1))
    with pytest.raises(IndexBuildError, match=f"covers {len(ids) - 1} of the {len(ids)}"):
        commit_version(cfg, plan, {})


def test_build_refuses_bad_configs(esc50_clips: str, tmp_path: Path) -> None:
    with pytest.raises(IndexBuildError, match="index.checkpoint is required"):
        plan_build(_cfg(f"index.input={esc50_clips}"))
    with pytest.raises(IndexBuildError, match="no clip shards"):
        plan_build(_cfg(f"index.input={tmp_path}", "index.checkpoint=x"))
    with pytest.raises(IndexBuildError, match="index.dtype"):
        plan_build(_cfg(f"index.input={esc50_clips}", "index.checkpoint=x", "index.dtype=int8"))
    with pytest.raises(IndexBuildError, match="index.checkpoint=x: no checkpoint at x"):
        plan_build(_cfg(f"index.input={esc50_clips}", "index.checkpoint=x"))


def test_input_may_be_the_ingest_output_but_never_its_manifest(
    esc50_clips: str, gpa_checkpoint: str, tmp_path: Path
) -> None:
    """`index.input` may name the ingest output, as `train.data` does: the build reads its
    clips/ (the manifest parquet beside it has no audio and would fail in the actors); a
    folder of non-clip parquet is refused up front, naming the file and what it lacks."""
    ingest_root = str(Path(esc50_clips).parent)
    assert storage.list_files(storage.join(ingest_root, "manifest"), ".parquet")
    where = [f"index.checkpoint={gpa_checkpoint}", f"index.output={tmp_path / 'index'}"]
    from_root = plan_build(_cfg(f"index.input={ingest_root}", *where))
    from_clips = plan_build(_cfg(f"index.input={esc50_clips}", *where))
    assert from_root.source == from_clips.source == esc50_clips
    assert from_root.files == from_clips.files
    manifest_only = tmp_path / "manifest_only"
    manifest_only.mkdir()
    pq.write_table(pa.table({"clip_id": ["a"], "unit": [0]}), manifest_only / "part-0.parquet")
    with pytest.raises(IndexBuildError, match=r"part-0.parquet is not a clip shard \(no column"):
        plan_build(_cfg(f"index.input={manifest_only}", *where))


def test_a_bias_of_one_split_refuses_an_index_of_others_before_embedding(
    esc50_clips: str, gpa_checkpoint: str, tmp_path: Path
) -> None:
    """The bias job covers the captions of `sinkhorn.texts_split`; indexing every split
    (here the shards' only split, train) with a test-split bias is refused by the plan,
    naming the setting that fixes it, and `index.splits` equal to the bias's split plans."""
    from gpa_ray.bias_file import BIAS_FILE, BIAS_SCHEMA, META_FILE

    bias_dir = tmp_path / "bias"
    storage.write_parquet(str(bias_dir / BIAS_FILE), BIAS_SCHEMA.empty_table())
    metadata = {"G": 3, "J": 0, "texts": {"data": "x", "split": "test", "corpus": ""}}
    storage.write_bytes(str(bias_dir / META_FILE), json.dumps(metadata).encode())
    where = [
        f"index.bias={bias_dir}",
        f"index.checkpoint={gpa_checkpoint}",
        f"index.output={tmp_path / 'ix'}",
    ]
    with pytest.raises(
        IndexBuildError, match=r"split 'test' only.*\['train'\].*index.splits=\[test\]"
    ):
        plan_build(_cfg(f"index.input={esc50_clips}", *where))
    with pytest.raises(IndexBuildError, match=r"\['train', 'val'\]"):
        plan_build(_cfg(f"index.input={esc50_clips}", "index.splits=[train,val]", *where))
    plan = plan_build(_cfg(f"index.input={esc50_clips}", "index.splits=[test]", *where))
    assert plan.files


def _next_checkpoint(run: Path, cfg: Config, seed: int, step: int) -> str:
    """One more checkpoint of a GPA run as training leaves it: weights and config, its
    step in `state.json`, and the run's `summary.json` naming it best and latest."""
    checkpoint = str(run / f"checkpoint_{step:06d}")
    tiny_gpa_checkpoint(checkpoint, cfg, seed=seed)
    storage.write_bytes(storage.join(checkpoint, "state.json"), json.dumps({"step": step}).encode())
    write_run_summary(str(run), {"checkpoint": checkpoint, "best_checkpoint": checkpoint})
    return checkpoint


def test_a_run_that_trained_further_gets_a_new_version_that_serve_refuses(
    esc50_clips: str, gpa_checkpoint: str, tmp_path: Path
) -> None:
    run, index = tmp_path / "run", tmp_path / "index"
    model_cfg = read_config(gpa_checkpoint)
    args = [*_args(esc50_clips, str(run), index), f"serve.index_uri={index}"]
    first = _next_checkpoint(run, model_cfg, seed=0, step=4)
    one = run_build_index(_cfg(*args))
    manifest = store.read_manifest(store.resolve_version(str(index)))
    assert one["checkpoint"] == manifest.checkpoint == first  # the run resolved, absolute
    assert manifest.checkpoint_digest == weights_digest(first)
    assert run_build_index(_cfg(*args))["units_this_run"] == 0  # same weights: same version

    serving = SearchService(_cfg(*args), load_model(_cfg(*args), first))
    second = _next_checkpoint(run, model_cfg, seed=1, step=8)  # the run trained further
    two = run_build_index(_cfg(*args))
    assert two["version"] != one["version"] and two["checkpoint"] == second
    with pytest.raises(IndexMismatchError, match="weights sha256"):
        serving.reload()
    assert serving.version == one["version"]  # the old version stays up
    following = SearchService(_cfg(*args), load_model(_cfg(*args), second))
    assert following.version == two["version"]

    tiny_gpa_checkpoint(second, model_cfg, seed=2)  # overwritten in place: same URI
    with pytest.raises(IndexMismatchError, match=f"{second} \\(weights sha256"):
        SearchService(_cfg(*args), load_model(_cfg(*args), second))


def test_incremental_build_embeds_only_new_clips_and_equals_a_full_rebuild(
    ray_session, shared_data: Path, gpa_checkpoint: str, tmp_path: Path
) -> None:
    # 22 real clips in two shard files; the first version leaves 2 out: the second adds
    # 10% new clips to the 20 it can reuse.
    write_esc50_clip_shards(str(tmp_path / "corpus"), shared_data / "esc50", 18, 4)
    clips = str(tmp_path / "corpus" / "clips")
    rows = _rows(clips)
    new = [rows[2]["clip_id"], rows[19]["clip_id"]]
    (tmp_path / "new.txt").write_text("\n".join(new) + "\n")
    index = tmp_path / "index"
    base = _args(clips, gpa_checkpoint, index)
    first = run_build_index(
        _cfg(*base, f"index.delete={tmp_path / 'new.txt'}", "index.version=old")
    )
    assert (first["clips"], first["deleted_clips"], first["embedded_clips"]) == (20, 2, 20)
    grown = run_build_index(_cfg(*base, f"index.reuse={index / 'old'}", "index.version=grown"))
    assert (grown["clips"], grown["reused_clips"], grown["embedded_clips"]) == (22, 20, 2)
    full = run_build_index(_cfg(*base, "index.version=full"))
    assert (full["reused_clips"], full["embedded_clips"]) == (0, 22)
    (a,), (b,) = mapped.open_version(str(index / "grown")), mapped.open_version(str(index / "full"))
    (old,) = mapped.open_version(str(index / "old"))
    for side in ("clips", "texts"):
        one, two, before = getattr(a, side), getattr(b, side), getattr(old, side)
        assert one.ids.to_pylist() == two.ids.to_pylist()
        # Reused rows are the earlier version's stored values exactly; the rebuild's equal
        # them up to the float rounding of other batch compositions.
        reused = [one.position(i) for i in before.ids.to_pylist()]
        assert np.array_equal(one.global_[reused], before.global_)
        assert np.array_equal(one.prototypes[reused], before.prototypes)
        np.testing.assert_allclose(one.global_, two.global_, atol=1e-5, rtol=0)
        np.testing.assert_allclose(one.prototypes, two.prototypes, atol=1e-5, rtol=0)
    # A deletion on top: nothing is embedded, the clip is gone.
    (tmp_path / "gone.txt").write_text(rows[0]["clip_id"])
    smaller = run_build_index(
        _cfg(*base, f"index.reuse={index / 'grown'}", f"index.delete={tmp_path / 'gone.txt'}")
    )
    assert (smaller["clips"], smaller["reused_clips"], smaller["deleted_clips"]) == (21, 21, 1)
    assert smaller["embedded_clips"] == 0
    # Embeddings of other weights are never reused.
    other = tmp_path / "other"
    tiny_gpa_checkpoint(str(other), read_config(gpa_checkpoint), seed=5)
    with pytest.raises(IndexBuildError, match="cannot be reused"):
        plan_build(_cfg(*_args(clips, str(other), index), f"index.reuse={index / 'full'}"))

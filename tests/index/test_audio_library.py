"""A user's own sound library: a folder of audio with no captions file is ingested,
indexed and searched by text (issue 19 item 5)."""

from __future__ import annotations

import shutil
from pathlib import Path

from gpa_ray.config_loading import load_config
from gpa_ray.data.ingest import run_ingest
from gpa_ray.index import mapped
from gpa_ray.index.build import run_build_index
from gpa_ray.serve.retriever import SearchService, TextQueryEncoder, load_model
from gpa_ray.testing.data import esc50_records


def test_a_folder_without_captions_indexes_and_is_searchable(
    ray_session, shared_data: Path, gpa_checkpoint: str, tmp_path: Path
) -> None:
    library = tmp_path / "my sounds"
    records = esc50_records(shared_data / "esc50")[:6]
    for i, record in enumerate(records):
        folder = library / ("outdoor" if i % 2 else "indoor")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_data / "esc50" / "audio" / record["filename"], folder)
    (library / "README.txt").write_text("my recordings")
    ingest = load_config(
        overrides=[
            "corpus.kind=audio_files",
            f"corpus.root={library}",
            "corpus.name=mine",
            "corpus.default_split=library",
            f"ingest.output={tmp_path / 'ingest'}",
            "ingest.max_seconds=1",
            "ingest.encode_pool.actors=1",
        ]
    )
    summary = run_ingest(ingest)
    assert (summary["clips_ok"], summary.get("clips_failed", 0)) == (6, 0)

    index_uri = tmp_path / "index"
    args = [
        f"index.input={tmp_path / 'ingest'}",
        f"index.checkpoint={gpa_checkpoint}",
        f"index.output={index_uri}",
        "index.embed_pool.actors=1",
        f"serve.index_uri={index_uri}",
    ]
    built = run_build_index(load_config(overrides=args))
    assert (built["clips"], built["texts"], built["failed_clips"]) == (6, 0, 0)
    (index,) = mapped.open_version(str(index_uri))
    expected = {
        f"mine/{'outdoor' if i % 2 else 'indoor'}/{r['filename']}" for i, r in enumerate(records)
    }
    assert set(index.clips.ids.to_pylist()) == expected

    cfg = load_config(overrides=args)
    loaded = load_model(cfg, gpa_checkpoint)
    query = TextQueryEncoder(loaded.model).encode(["a dog barking"])[0]
    results = SearchService(cfg, loaded).search_text(query, 6)["results"]
    assert {r["clip_id"] for r in results} == expected
    assert all(r["captions"] == [] and r["has_audio"] for r in results)

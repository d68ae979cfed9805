"""The README's main job end to end on a small synthetic corpus (every stage but Serve,
which tests/serve covers), on the shared local Ray."""

from __future__ import annotations

import json

import pytest

from gpa_ray.checkpoints import weights_digest
from gpa_ray.config_loading import load_config
from gpa_ray.evaluation import markdown_table
from gpa_ray.quickstart import stage_configs
from gpa_ray.testing.jobs import job_main


def test_stage_configs_share_one_output_folder() -> None:
    cfg = load_config("quickstart")
    configs = stage_configs(cfg, "s3://bucket/qs")
    assert configs["base"].corpus.root == "s3://bucket/qs/corpus"
    assert configs["base"].ingest.output == "s3://bucket/qs/ingest"
    for name in ("pretrain", "gpa"):
        assert configs[name].train.data == "s3://bucket/qs/ingest"
        assert configs[name].train.storage_path == "s3://bucket/qs/runs"
    assert configs["pretrain"].train.name != configs["gpa"].train.name
    assert configs["pretrain"].train.epochs == cfg.quickstart.pretrain_epochs


@pytest.mark.slow
def test_quickstart_main_runs_every_stage(ray_session, tmp_path, capsys) -> None:
    main = job_main("quickstart")
    output = tmp_path / "qs"
    assert (
        main(
            [
                "--no-serve",
                f"quickstart.output={output}",
                "quickstart.pretrain_epochs=1",
                "synthetic.n_clips=40",
                "synthetic.min_seconds=1.0",
                "synthetic.max_seconds=2.0",
                "train.epochs=2",
                "train.batch_size=8",
            ]
        )
        == 0
    )
    summary = json.loads((output / "quickstart.json").read_text())
    assert summary["ingest"]["clips_ok"] == 40 and summary["ingest"]["clips_failed"] == 0
    assert set(summary["timings_s"]) >= {"ingest", "gpa training", "sinkhorn bias", "index build"}
    directions = {(row["direction"], row["method"]) for row in summary["eval"]["rows"]}
    assert ("A2T", "sinkhorn") in directions and ("A2T", "none") in directions
    assert (output / "index" / "LATEST").exists()
    assert "R@1" in capsys.readouterr().out


@pytest.mark.slow
def test_two_quickstart_runs_give_bitwise_equal_checkpoints_bias_and_table(
    ray_session: None, tmp_path, capsys
) -> None:
    """Same settings, two output folders: the same GPA weights (SHA-256 of model.pt), the
    same text bias and the same printed table; a rerun into the first folder resumes
    every stage and evaluation reuses its embeddings."""
    main = job_main("quickstart")
    settings = [
        "--no-serve",
        "quickstart.pretrain_epochs=1",
        "synthetic.n_clips=40",
        "synthetic.min_seconds=1.0",
        "synthetic.max_seconds=2.0",
        "train.epochs=2",
        "train.batch_size=8",
    ]
    outputs = [tmp_path / "first", tmp_path / "second", tmp_path / "first"]
    tables, weights, biases = [], [], []
    for output in outputs:
        assert main([*settings, f"quickstart.output={output}"]) == 0
        summary = json.loads((output / "quickstart.json").read_text())
        tables.append(markdown_table(summary["eval"]["rows"]))
        weights.append(weights_digest(summary["gpa"]["best_checkpoint"]))
        biases.append((output / "bias" / "bias.parquet").read_bytes())
        assert tables[-1] in capsys.readouterr().out
    assert tables[0] == tables[1] == tables[2]
    assert weights[0] == weights[1] == weights[2]
    assert biases[0] == biases[1]
    assert summary["eval"]["pool"]["embeddings_reused"]

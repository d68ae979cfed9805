"""Real clip shards (ESC-50 through the ingest job) and a tiny GPA checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpa_ray.testing.data import tiny_esc50_ingest
from gpa_ray.testing.models import save_tiny_text_model, tiny_gpa_checkpoint, tiny_gpa_run_config


@pytest.fixture(scope="session")
def esc50_clips(ray_session, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Ingest output of 8 ESC-50 clips (1 s each), 2 shards; its `clips` folder. The
    folder is shared with the serve tests of the session (a second call finds it done)."""
    output = tmp_path_factory.getbasetemp() / "esc50-ingest-8"
    summary = tiny_esc50_ingest(str(output), n_clips=8)
    assert summary["clips_ok"] == 8
    return str(output / "clips")


@pytest.fixture(scope="session")
def gpa_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny GPA (CNN14 width 2, 2-layer BERT) saved with `save_gpa`."""
    root = tmp_path_factory.mktemp("gpa-checkpoint")
    cfg = tiny_gpa_run_config(save_tiny_text_model(root / "text"))
    tiny_gpa_checkpoint(str(root / "checkpoint"), cfg)
    return str(root / "checkpoint")

"""Per-epoch metrics of a run as `metrics.jsonl` and `metrics.png` beside its checkpoints.

The history travels inside every checkpoint (`TrainState.history`) and both files are
rewritten whole from it after each epoch, rather than appended to: object stores have no
append, and after a worker failure the run rolls back to its last checkpoint, so the
files roll back with it instead of keeping lines of epochs that were redone.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Sequence
from typing import Any

from gpa_ray import storage
from gpa_ray.config import StorageConfig

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
_SKIP = {
    "epoch",
    "step",
    "lr",
    "epoch_seconds",
    "train_seconds",
    "train_cpu_seconds",
    "steps_per_epoch",
}


def to_jsonl(history: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(record, sort_keys=True) + "\n" for record in history)


def curves(history: Sequence[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """(epoch, value) series of every numeric metric, grouped by name."""
    out: dict[str, list[tuple[int, float]]] = {}
    for record in history:
        for key, value in record.items():
            if key in _SKIP or not isinstance(value, int | float) or math.isnan(value):
                continue
            out.setdefault(key, []).append((int(record["epoch"]), float(value)))
    return out


def panel_of(metric: str) -> str:
    """The panel a metric is drawn in: its name without the train_/val_ prefix and without a
    per-codebook `_c<q>` suffix, so train and val curves of one quantity share axes."""
    name = re.sub(r"_c\d+$", "", metric)
    return re.sub(r"^(train|val)_", "", name)


def plot_png(history: Sequence[dict[str, Any]], title: str = "") -> bytes:
    """A PNG with one panel per quantity (loss, accuracy, mAP, ...) against epochs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for name, points in curves(history).items():
        panels.setdefault(panel_of(name), {})[name] = points
    order = sorted(panels, key=lambda p: (p != "loss", p)) or [""]
    cols = min(3, len(order))
    rows = math.ceil(len(order) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    FigureCanvasAgg(fig)
    for i, panel in enumerate(order):
        ax = fig.add_subplot(rows, cols, i + 1)
        for name, points in sorted(panels.get(panel, {}).items()):
            ax.plot([e for e, _ in points], [v for _, v in points], marker="o", label=name)
        ax.set_title(panel, fontsize="medium")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if panel:
            ax.legend(fontsize="x-small")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def write(
    run_uri: str,
    history: Sequence[dict[str, Any]],
    title: str = "",
    storage_cfg: StorageConfig | None = None,
) -> None:
    """(Re)write `metrics.jsonl` and `metrics.png` under the run directory."""
    storage.write_bytes(
        storage.join(run_uri, METRICS_FILE), to_jsonl(history).encode(), storage_cfg
    )
    storage.write_bytes(storage.join(run_uri, PLOT_FILE), plot_png(history, title), storage_cfg)


def read(run_uri: str, storage_cfg: StorageConfig | None = None) -> list[dict[str, Any]]:
    """The records of `metrics.jsonl` (empty if the run has not finished an epoch)."""
    uri = storage.join(run_uri, METRICS_FILE)
    if not storage.exists(uri, storage_cfg):
        return []
    text = storage.read_bytes(uri, storage_cfg).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]

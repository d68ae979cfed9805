"""Early stopping on the checkpoint metric (AudioFormer's FT1/FT2 schedules "employed
early stopping" on validation mAP; the paper gives no patience, so it is a setting).

The rule reads only the run's epoch records, which every rank holds identically (the
validation metrics are global), so every rank stops after the same epoch, and a resumed
run (whose records come back with its checkpoint) stops where the uninterrupted one did.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def epochs_since_best(records: Sequence[dict[str, Any]], metric: str, mode: str) -> int:
    """Epochs after the one with the best `metric` ("max" or "min"; the first of ties).

    An epoch without the metric, or with NaN, never counts as an improvement.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    best: float | None = None
    since = 0
    for record in records:
        value = record.get(metric)
        usable = isinstance(value, int | float) and not math.isnan(value)
        better = usable and (best is None or (value > best if mode == "max" else value < best))
        if better:
            best, since = float(value), 0
        else:
            since += 1
    return since


def should_stop(records: Sequence[dict[str, Any]], metric: str, mode: str, patience: int) -> bool:
    """True once `patience` epochs in a row have not improved `metric` (never if 0)."""
    return patience > 0 and bool(records) and epochs_since_best(records, metric, mode) >= patience

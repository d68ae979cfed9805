"""The search space of a GPA sweep and the config of each trial (no Ray here).

A swept setting is a `sweep.*` value list naming the values of one config key
(`SWEPT`); a trial's parameters are {config key: value} and `trial_config` applies them
to the sweep's config, with the trial's own run folder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from gpa_ray.config import Config
from gpa_ray.models.scoring import SCORER_KINDS

SWEPT: dict[str, str] = {
    "lr": "train.lr",
    "temperature": "gpa.temperature",
    "n_prototypes": "gpa.n_prototypes",
    "scorer": "gpa.scorer",
    "sinkhorn_epsilon": "sinkhorn.epsilon",
}
"""`sweep.<setting>` -> the config key its values replace."""
SEARCHES = ("grid", "random")
EPSILON_KEY = SWEPT["sinkhorn_epsilon"]


class SweepError(ValueError):
    """The sweep section cannot be run as given (the message names the setting)."""


def swept_values(cfg: Config) -> dict[str, list[Any]]:
    """{config key: its values} of every non-empty `sweep.*` list, checked."""
    out: dict[str, list[Any]] = {}
    for setting, key in SWEPT.items():
        values = list(getattr(cfg.sweep, setting))
        if not values:
            continue
        if len(set(values)) != len(values):
            raise SweepError(f"sweep.{setting} lists a value twice: {values}")
        if setting == "scorer" and (bad := [v for v in values if v not in SCORER_KINDS]):
            raise SweepError(f"sweep.scorer: unknown {bad}; choose from {SCORER_KINDS}")
        if setting != "scorer" and any(v <= 0 for v in values):
            raise SweepError(f"sweep.{setting} values must be positive, got {values}")
        out[key] = values
    if not out:
        names = ", ".join(f"sweep.{s}" for s in SWEPT)
        raise SweepError(f"nothing to sweep: give values to at least one of {names}")
    if cfg.sweep.search not in SEARCHES:
        raise SweepError(f"sweep.search {cfg.sweep.search!r}: choose one of {SEARCHES}")
    if cfg.sweep.num_samples < 1:
        raise SweepError(f"sweep.num_samples must be >= 1, got {cfg.sweep.num_samples}")
    return out


def trial_count(cfg: Config) -> int:
    """How many trials the sweep runs: the grid's size x `num_samples`, or `num_samples`."""
    if cfg.sweep.search == "random":
        return cfg.sweep.num_samples
    size = 1
    for values in swept_values(cfg).values():
        size *= len(values)
    return size * cfg.sweep.num_samples


def sweep_metric(cfg: Config, default: str) -> tuple[str, str]:
    """(metric, "max"|"min") that ranks trials: `sweep.metric`, else the run's checkpoint
    metric (`train.checkpoint_metric`, else `default`, the task's)."""
    metric = cfg.sweep.metric or cfg.train.checkpoint_metric or default
    mode = cfg.sweep.mode or ("min" if metric.endswith("loss") else "max")
    if mode not in ("min", "max"):
        raise SweepError(f"sweep.mode {mode!r}: choose 'min' or 'max'")
    if metric.startswith("val_a2t_sinkhorn_") and EPSILON_KEY not in swept_values(cfg):
        raise SweepError(f"sweep.metric {metric!r} needs sweep.sinkhorn_epsilon values")
    return metric, mode


def trial_config(cfg: Config, params: Mapping[str, Any], storage_path: str, name: str) -> Config:
    """`cfg` with a trial's {config key: value} applied, training into `<storage_path>/<name>`."""
    sections: dict[str, dict[str, Any]] = {"train": {"storage_path": storage_path, "name": name}}
    for key, value in params.items():
        section, field = key.split(".", 1)
        current = getattr(getattr(cfg, section), field)
        sections.setdefault(section, {})[field] = type(current)(value)
    return dataclasses.replace(
        cfg,
        **{
            section: dataclasses.replace(getattr(cfg, section), **fields)
            for section, fields in sections.items()
        },
    )

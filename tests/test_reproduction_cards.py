"""The reproduction cards (docs/reproduction.md) against the presets they describe.

Every settings row of a card names presets, a dotted key and a value; each is checked here
against the preset as loaded (defaults included), so a card and its preset cannot drift.
Every key a paper preset's YAML sets must be on its card, and every shipped preset that is
not a local/test one must have a card. Row conventions are the card's own intro.
"""

from __future__ import annotations

import fnmatch
import importlib
import re
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpa_ray.config import Config
from gpa_ray.config_loading import ConfigError, load_config, preset_names

CARDS = Path(__file__).resolve().parents[1] / "docs" / "reproduction.md"
SETTINGS_HEADER = "| setting | paper | preset | key | value | source |"
RESULTS_HEADER = "| result |"
LOCAL_PRESETS = {"quickstart", "debug", "esc50_gpa"}
"""Shipped presets that claim no paper (the embedded default, tests, the ESC-50 demo)."""
SOURCES = {"paper", "ours", "differs", "missing"}
PAPERS = ("GPA", "AudioFormer", "CWCL", '"Good, Fast, Cheap')
COMMAND = " (command)"


@dataclass(frozen=True)
class Row:
    paper: str
    setting: str
    presets: str
    key: str
    value: str
    source: str


def _cells(line: str) -> list[str]:
    return [cell.strip().strip("`").strip() for cell in line.strip().strip("|").split("|")]


def _tables(text: str, header: str) -> list[tuple[str, list[list[str]]]]:
    """(paper section, rows) of every markdown table whose header starts with `header`."""
    out: list[tuple[str, list[list[str]]]] = []
    paper, lines = "", text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("## "):
            paper = line[3:].strip()
        if line.startswith(header):
            rows = []
            for body in lines[i + 2 :]:
                if not body.startswith("|"):
                    break
                rows.append(_cells(body))
            out.append((paper, rows))
    return out


@cache
def card_rows() -> tuple[Row, ...]:
    rows = []
    for paper, table in _tables(CARDS.read_text(), SETTINGS_HEADER):
        for cells in table:
            assert len(cells) == 6, f"{paper}: a settings row needs 6 cells: {cells}"
            setting, _, presets, key, value, source = cells
            rows.append(Row(paper, setting, presets, key, value, source))
    return tuple(rows)


@cache
def preset(name: str) -> Config:
    return load_config(name)


def _yaml_text(name: str) -> str:
    return (files("gpa_ray") / "configs" / f"{name}.yaml").read_text()


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _same(actual: Any, expected: Any) -> bool:
    """The card's YAML value against the config's typed one (1e-4 is a string in YAML 1.1)."""
    if isinstance(actual, bool) or isinstance(expected, bool):
        return actual is expected
    if isinstance(actual, (int, float)):
        try:
            return float(expected) == float(actual)
        except (TypeError, ValueError):
            return False
    if isinstance(actual, str):
        return str(expected) == actual
    return actual == expected


def _presets(cell: str) -> list[str]:
    """Preset names a row names (globs allowed); each pattern must match a shipped one."""
    names = preset_names()
    out = []
    for pattern in (p.strip().strip("`") for p in cell.split(",")):
        found = fnmatch.filter(names, pattern)
        assert found, f"card names preset {pattern!r}, which is not shipped ({names})"
        out.extend(found)
    return out


def _leaves(d: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        keys.extend(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"])
    return keys


def _command_overrides(name: str) -> set[str]:
    header = "\n".join(line for line in _yaml_text(name).splitlines() if line.startswith("#"))
    return set(re.findall(r"\b((?:train|audioformer|corpus|ingest)\.[a-z_]+=\S+)", header))


def _ids(rows: tuple[Row, ...]) -> list[str]:
    return [f"{r.paper[:12]}:{r.setting}:{r.key}" for r in rows]


def test_every_paper_has_a_card_with_settings_and_numbers() -> None:
    text = CARDS.read_text()
    settings = {paper for paper, _ in _tables(text, SETTINGS_HEADER)}
    results = {paper: rows for paper, rows in _tables(text, RESULTS_HEADER)}
    for paper in PAPERS:
        assert any(s.startswith(paper) for s in settings), f"no settings table for {paper}"
        numbers = [rows for name, rows in results.items() if name.startswith(paper)]
        assert numbers and numbers[0], f"no reported-numbers table for {paper}"
        assert all(len(r) == 3 and r[1] and r[2] for r in numbers[0]), paper
    assert {r.source for r in card_rows()} <= SOURCES


@pytest.mark.parametrize("row", card_rows(), ids=_ids(card_rows()))
def test_card_row_holds(row: Row) -> None:
    assert row.source in SOURCES, row
    if row.key == "-":
        assert row.presets == "-", f"a row without a key names no preset: {row}"
        return
    value = yaml.safe_load(row.value)
    if row.presets == "code":
        module, _, name = row.key.rpartition(".")
        assert _same(getattr(importlib.import_module(module), name), value), row
    elif row.presets == "none":
        override = f"{row.key}={row.value}"
        if row.source == "missing":
            with pytest.raises(ConfigError):
                load_config(overrides=[override])
        else:
            assert _same(_get(load_config(overrides=[override]), row.key), value), row
    elif row.presets.endswith(COMMAND):
        (name,) = _presets(row.presets.removesuffix(COMMAND))
        override = f"{row.key}={row.value}"
        assert override in _command_overrides(name), f"{name}'s commands lack {override}"
        load_config(name, [override])
    else:
        assert row.source != "missing", f"a missing setting cannot be in a preset: {row}"
        for name in _presets(row.presets):
            actual = _get(preset(name), row.key)
            assert _same(actual, value), f"{name}: {row.key} is {actual!r}, card says {value!r}"


@pytest.mark.parametrize("name", sorted(set(preset_names()) - LOCAL_PRESETS))
def test_every_key_a_paper_preset_sets_is_on_its_card(name: str) -> None:
    carded = {
        r.key
        for r in card_rows()
        if r.presets not in ("-", "none", "code")
        and not r.presets.endswith(COMMAND)
        and name in _presets(r.presets)
    }
    assert carded, f"preset {name} is on no reproduction card (docs/reproduction.md)"
    missing = sorted(set(_leaves(yaml.safe_load(_yaml_text(name)))) - carded)
    assert not missing, f"{name} sets {missing}, which its card does not list"


def test_the_checks_catch_drift() -> None:
    """The comparison the rows rely on tells a changed value, and a key that is not set
    apart from one that is."""
    assert _same(1e-4, "1.0e-4") and _same(1e-4, "1e-4") and not _same(5e-5, "1e-4")
    assert _same(True, True) and not _same(1, True) and not _same("caption", "clip")
    assert _same([0, 1, 2, 3], [0, 1, 2, 3]) and not _same([0, 1], [0, 1, 2])
    drifted = load_config("clotho_gpa", ["train.lr=1e-4"])
    assert not _same(_get(drifted, "train.lr"), "5.0e-5")
    with pytest.raises(AssertionError, match="not shipped"):
        _presets("clotho_gfc_nonexistent")

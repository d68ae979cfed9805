"""Label-frequency weighted sampling: weights against a plain loop, determinism per seed
whatever the batching, the balancing it is for, and the sample through Ray Data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from gpa_ray import storage
from gpa_ray.config_loading import load_config
from gpa_ray.data.loaders import LabelSpace, label_frequencies, read_clips
from gpa_ray.data.weighted_sampling import LabelFrequencies, LabelFrequencySampler, draw_counts
from tests.data.test_loaders import clip_table, codes_of

# 90 clips of a common label, 10 of a rare one (5 of them also common), 2 unlabelled.
LABELS = [["common"]] * 85 + [["common", "rare"]] * 5 + [["rare"]] * 5 + [[]] * 2
CLIP_IDS = [f"clip-{i}" for i in range(len(LABELS))]
FREQUENCIES = LabelFrequencies(counts={"common": 90, "rare": 10}, n_clips=len(LABELS))


def table() -> pa.Table:
    return pa.table({"clip_id": CLIP_IDS, "labels": LABELS, "row": list(range(len(LABELS)))})


def loop_expected_draws(labels: list[list[str]], draws: int) -> list[float]:
    """lambda_i = N w_i / sum_j w_j, w_i = sum over distinct labels of 1 / (clips with it)."""
    counts: dict[str, int] = {}
    for clip in labels:
        for label in set(clip):
            counts[label] = counts.get(label, 0) + 1
    weights = [sum(1.0 / counts[label] for label in set(clip)) for clip in labels]
    return [draws * w / sum(weights) for w in weights]


def test_expected_draws_equal_the_plain_loop() -> None:
    expected = loop_expected_draws(LABELS, 102)
    got = [FREQUENCIES.expected_draws(labels, 102) for labels in LABELS]
    assert got == pytest.approx(expected, rel=1e-12)
    assert FREQUENCIES.total_weight == 2.0  # one per label
    assert sum(got) == pytest.approx(102.0)
    # A repeated label counts once; an unknown label adds nothing.
    assert FREQUENCIES.weight(["rare", "rare", "unknown"]) == pytest.approx(0.1)


def test_sample_is_fixed_by_the_seed_whatever_the_batching() -> None:
    sampler = LabelFrequencySampler(FREQUENCIES, seed=3)
    whole = sampler(table())
    halves = [sampler(table().slice(0, 40)), sampler(table().slice(40))]
    assert whole.column("row").to_pylist() == [r for h in halves for r in h["row"].to_pylist()]
    assert whole.equals(LabelFrequencySampler(FREQUENCIES, seed=3)(table()))
    other = LabelFrequencySampler(FREQUENCIES, seed=4)(table())
    assert other.column("row").to_pylist() != whole.column("row").to_pylist()
    # Unlabelled clips are never drawn; the columns are kept.
    assert not {100, 101} & set(whole.column("row").to_pylist())
    assert whole.column_names == ["clip_id", "labels", "row"]
    with pytest.raises(ValueError, match="'labels' column"):
        sampler(table().drop(["labels"]))


def test_sampling_balances_the_labels() -> None:
    # Read once, the common label is in 90 of 102 clips and the rare one in 10; in the
    # sample each label's expected share of draws is N / 2 (what the weights are for).
    # Over 200 seeds the mean counts per clip match lambda_i within 4 standard errors.
    expected = np.array(loop_expected_draws(LABELS, len(LABELS)))
    runs = np.stack(
        [draw_counts(CLIP_IDS, LABELS, FREQUENCIES, seed, len(LABELS)) for seed in range(200)]
    )
    mean = runs.mean(axis=0)
    error = np.sqrt(np.maximum(expected, 1e-12) / len(runs))
    assert np.all(np.abs(mean - expected) <= 4 * error + 1e-12)
    rare = np.array(["rare" in labels for labels in LABELS])
    rare_share = runs[:, rare].sum() / runs.sum()
    # Rare-labelled clips carry all of "rare"'s half plus 5/90 of "common"'s half, against
    # 10 / 102 of the clips when each is read once.
    assert expected[rare].sum() / expected.sum() == pytest.approx(0.5 * (1 + 5 / 90))
    assert rare_share == pytest.approx(0.5 * (1 + 5 / 90), abs=0.02)
    assert runs.sum(axis=1).mean() == pytest.approx(len(LABELS), rel=0.03)


def test_weighted_training_clips_through_ray_data(ray_session: None, tmp_path: Path) -> None:
    """`train.sampler=label_frequency`: the training dataset is the sampler applied to the
    split's rows in file order (whatever Ray Data's blocks), the same for a seed, with the
    loop's columns only; an unknown sampler is named."""
    from gpa_ray.train.audioformer_loops import FT1Loop
    from gpa_ray.train.trainer import training_clips

    data = str(tmp_path)
    labels = [["dog"]] * 6 + [["cat"]] * 2
    for part in range(4):
        rows = slice(2 * part, 2 * part + 2)
        codes = [codes_of(4, 3, 10 * i) for i in range(rows.start, rows.stop)]
        uri = f"{data}/clips/t/train/part-{part:06d}.parquet"
        storage.write_parquet(uri, clip_table(codes, labels[rows]))
    space = LabelSpace(labels=("cat", "dog"), multi_label=False)
    overrides = [f"train.data={data}", "train.sampler=label_frequency", "train.seed=5"]
    loop = FT1Loop(load_config("debug", overrides), space)
    rows = training_clips(loop).take_all()
    assert set(rows[0]) == set(loop.columns)
    source = pa.Table.from_pylist(read_clips(data, "train").take_all())
    expected = LabelFrequencySampler(label_frequencies(data, "train"), 5)(source)
    got = pa.Table.from_pylist(rows)
    for column in ("labels", "codes"):
        assert got.column(column).to_pylist() == expected.column(column).to_pylist()
    assert expected.num_rows != source.num_rows or not expected.equals(source)
    assert training_clips(loop).take_all() == rows
    unknown = load_config("debug", [f"train.data={data}", "train.sampler=uniform"])
    with pytest.raises(ValueError, match="train.sampler 'uniform'"):
        training_clips(FT1Loop(unknown, space))

"""Label-frequency weighted sampling of a clip stream (AudioSet's unbalanced FT1 phase).

AudioFormer's AS-2M protocol (section 4.2, FT1) first "performed weighted sampling on
the unbalanced data", following prior work (PSLA's balanced sampler): clip i is drawn
with probability proportional to w_i = sum over its distinct labels l of 1 / n_l, where
n_l is the number of clips carrying l, so rare classes are seen about as often as common
ones. N draws with replacement are multinomial(N, w / W). On a stream each clip is
instead emitted k_i ~ Poisson(N w_i / W) times, independently of the others: the
multinomial is exactly these Poissons conditioned on their total, so every clip's
expected count is the same and the sample size is N +- sqrt(N). W = sum_i w_i is the
number of distinct labels (label l contributes n_l x 1 / n_l = 1), so the weights need
only the label counts, one streaming pass over the `labels` column. A clip without a
known label has weight 0 and is never drawn.

k_i comes from a generator seeded by (seed, clip id) alone: the sample is the same for a
seed whatever the block layout, worker count or read order, and a resumed run reads the
same sample. It is drawn once per run and read in every epoch, as the paper fine-tunes
"for 1 epoch on the sampled data".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from gpa_ray.data.captions import clip_key

SAMPLERS = ("", "label_frequency")
"""`train.sampler` values: "" reads every clip once; "label_frequency" as above."""


@dataclasses.dataclass(frozen=True)
class LabelFrequencies:
    """Clips per label (`counts`, each clip counted once per distinct label) and clips."""

    counts: Mapping[str, int]
    n_clips: int

    @property
    def total_weight(self) -> float:
        """W = sum_i w_i: one per label that occurs."""
        return float(sum(1 for n in self.counts.values() if n > 0))

    def weight(self, labels: Sequence[str]) -> float:
        """w_i = sum over the clip's distinct known labels of 1 / n_l."""
        return sum(1.0 / self.counts[label] for label in set(labels) if self.counts.get(label))

    def expected_draws(self, labels: Sequence[str], draws: int) -> float:
        """lambda_i = N w_i / W: the clip's expected count in a sample of N draws."""
        total = self.total_weight
        return draws * self.weight(labels) / total if total > 0 else 0.0


def draw_counts(
    clip_ids: Sequence[str],
    labels: Sequence[Sequence[str] | None],
    frequencies: LabelFrequencies,
    seed: int,
    draws: int,
) -> np.ndarray:
    """k_i ~ Poisson(lambda_i) per clip, each from a generator of (seed, clip id)."""
    counts = np.zeros(len(clip_ids), dtype=np.int64)
    for i, (clip_id, clip_labels) in enumerate(zip(clip_ids, labels, strict=True)):
        lam = frequencies.expected_draws(clip_labels or [], draws)
        if lam > 0:
            rng = np.random.default_rng([seed % 2**32, clip_key(str(clip_id))])
            counts[i] = rng.poisson(lam)
    return counts


class LabelFrequencySampler:
    """Ray Data `map_batches` function (pyarrow batches): each row repeated k_i times.

    Needs the `clip_id` and `labels` columns; keeps every column. `draws` (N) is the
    sample's expected size, the number of clips of the split unless set otherwise.
    """

    def __init__(self, frequencies: LabelFrequencies, seed: int, draws: int | None = None) -> None:
        self.frequencies = frequencies
        self.seed = seed
        self.draws = frequencies.n_clips if draws is None else draws

    def __call__(self, table: pa.Table) -> pa.Table:
        for column in ("clip_id", "labels"):
            if column not in table.column_names:
                raise ValueError(f"label-frequency sampling needs the {column!r} column")
        counts = draw_counts(
            table.column("clip_id").to_pylist(),
            table.column("labels").to_pylist(),
            self.frequencies,
            self.seed,
            self.draws,
        )
        return table.take(pa.array(np.repeat(np.arange(len(counts)), counts)))

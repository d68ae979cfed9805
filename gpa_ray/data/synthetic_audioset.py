"""AudioSet-style corpus indexes of any size, for scale tests and benchmarks of the manifest.

Writes the published layout under a folder: `class_labels_indices.csv` (`index,mid,
display_name`, 527 classes) and `balanced_train_segments.csv`, `unbalanced_train_segments.
csv`, `eval_segments.csv`, each with the 3 `#` header lines and rows `YTID, start_seconds,
end_seconds, "mid,mid"` exactly as Google publishes them. No audio is written: whether a
clip's file exists is checked at ingest's `locate` stage, per unit, never while planning.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

N_CLASSES = 527
YTID_ALPHABET = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))
SPLIT_SHARES = {"balanced_train": 0.011, "eval": 0.010, "unbalanced_train": 0.979}
"""Shares of the published AudioSet-2M index (22,160 / 20,371 / 2,041,789 segments)."""


def _mids() -> list[str]:
    return [f"/m/0{i:05x}" for i in range(N_CLASSES)]


def write_audioset_index(
    root: str | Path, n_rows: int, seed: int = 0, duplicates: int = 0, chunk: int = 100_000
) -> dict[str, int]:
    """Write an `n_rows`-segment AudioSet index under `root`; return rows per split.

    `duplicates` rows of the unbalanced file repeat an earlier segment (same YTID and
    start), as a corpus index sometimes does, so readers' duplicate handling is exercised.
    Rows are generated `chunk` at a time, so memory does not grow with `n_rows`.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    mids = _mids()
    with open(root / "class_labels_indices.csv", "w") as f:
        f.write("index,mid,display_name\n")
        f.writelines(f'{i},{m},"Class {i}, kind {i % 7}"\n' for i, m in enumerate(mids))
    rng = np.random.default_rng(seed)
    counts = {s: int(round(n_rows * share)) for s, share in SPLIT_SHARES.items()}
    counts["unbalanced_train"] = n_rows - counts["balanced_train"] - counts["eval"]
    for split, count in counts.items():
        with open(root / f"{split}_segments.csv", "w") as f:
            f.write("# Segments csv created Sun Mar  5 10:54:31 2017\n")
            f.write(f"# num_ytids={count}, num_segs={count}, num_unique_labels={N_CLASSES}, ")
            f.write(f"num_positive_labels={2 * count}\n")
            f.write("# YTID, start_seconds, end_seconds, positive_labels\n")
            repeat = duplicates if split == "unbalanced_train" else 0
            first = ""
            for begin in range(0, count, chunk):
                lines = _segment_lines(rng, min(chunk, count - begin), mids)
                first = first or lines[0]
                if repeat and begin + chunk >= count:
                    lines[-repeat:] = [first] * min(repeat, len(lines))
                f.write("\n".join(lines) + "\n")
    return counts


def _segment_lines(rng: np.random.Generator, n: int, mids: list[str]) -> list[str]:
    """`n` published-format segment lines: 11-char YTIDs, starts on a 0.5 s grid (some
    fractional, as in the real index), 10 s segments, 1-3 positive labels."""
    chars = YTID_ALPHABET[rng.integers(0, len(YTID_ALPHABET), size=(n, 11))]
    ytids = ["".join(row) for row in chars]
    starts = rng.integers(0, 1200, size=n) / 2.0
    n_labels = rng.integers(1, 4, size=n)
    labels = rng.integers(0, len(mids), size=(n, 3))
    return [
        f'{y}, {s:.3f}, {s + 10:.3f}, "{",".join(mids[c] for c in labels[i, : n_labels[i]])}"'
        for i, (y, s) in enumerate(zip(ytids, starts, strict=True))
    ]

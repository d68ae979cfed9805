"""Made-up index contents for index, search, serve and bias tests and benchmarks: clip
rows without audio and random unit GPA embeddings, each from a seed."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from gpa_ray.models.gpa import Embeddings


def synthetic_index_clips(
    n: int, captions: int = 2, corpus: str = "toy", start: int = 0
) -> list[dict[str, Any]]:
    """Clip-shard-like rows (no audio) for index tests and benchmarks: ids `<corpus>/NNNNNN`
    numbered from `start`, `captions` captions each and one of three labels."""
    return [
        {
            "clip_id": f"{corpus}/{i:06d}",
            "corpus": corpus,
            "split": "test",
            "source_uri": f"{corpus}/{i:06d}.wav",
            "start_s": 0.0,
            "duration_s": 1.0,
            "captions": [f"caption {c} of clip {i}" for c in range(captions)],
            "labels": [f"label{i % 3}"],
            "audio": None,
            "audio_sample_rate": None,
        }
        for i in range(start, start + n)
    ]


def random_unit_embeddings(
    n: int, dim: int = 16, n_prototypes: int = 4, seed: int = 0
) -> Embeddings:
    """GPA `Embeddings` of n items: random unit global vectors [n, dim] and, unless
    n_prototypes is 0, random unit prototypes [n, n_prototypes, dim] (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    global_ = F.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    if not n_prototypes:
        return Embeddings(global_)
    return Embeddings(
        global_, F.normalize(torch.randn(n, n_prototypes, dim, generator=gen), dim=-1)
    )

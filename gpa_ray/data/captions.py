"""Caption choice and caption augmentation for retrieval training (pure Python).

Each training step pairs a clip with ONE of its captions, drawn anew every epoch, so all
captions of a clip are seen over the epochs while a batch never holds the same clip twice.
Caption augmentation ("Good, Fast, Cheap") perturbs the text of a share of the batch:
word dropout (each word dropped with probability p, at least one word kept) or one swap
of two adjacent words, chosen with equal probability. Both keep the caption's content
words mostly intact, so the pair stays a positive.

Randomness comes from a `numpy.random.Generator` the caller seeds, so a clip's draws are
reproducible.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def clip_key(clip_id: str) -> int:
    """A stable non-negative int63 for a clip id (identical on every worker and run), used
    to recognise two batch items of the same clip in the losses."""
    return int.from_bytes(hashlib.blake2b(clip_id.encode(), digest_size=8).digest(), "big") >> 1


def draw_seed(*parts: object) -> int:
    """A seed in [0, 2**31) from any values (run seed, epoch, clip id ...), stable across
    processes (unlike Python's `hash` of a string)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") % 2**31


def choose_caption(captions: Sequence[str], rng: np.random.Generator) -> str:
    """One caption drawn uniformly."""
    if not captions:
        raise ValueError("a clip without captions cannot be paired with text")
    return captions[int(rng.integers(len(captions)))]


def word_dropout(caption: str, p: float, rng: np.random.Generator) -> str:
    """Drop each word with probability p; if every word would go, keep one at random."""
    words = caption.split()
    if not words:
        return caption
    kept = [w for w, u in zip(words, rng.random(len(words)), strict=True) if u >= p]
    return " ".join(kept) if kept else words[int(rng.integers(len(words)))]


def swap_adjacent(caption: str, rng: np.random.Generator) -> str:
    """Swap one randomly chosen pair of neighbouring words (unchanged below two words)."""
    words = caption.split()
    if len(words) < 2:
        return caption
    i = int(rng.integers(len(words) - 1))
    words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def augment_caption(caption: str, p_drop: float, rng: np.random.Generator) -> str:
    """Word dropout or an adjacent swap, with equal probability."""
    if rng.random() < 0.5:
        return word_dropout(caption, p_drop, rng)
    return swap_adjacent(caption, rng)

"""Caption choice and augmentation: uniform choice, word dropout, adjacent swap, seeds."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from gpa_ray.data.captions import (
    augment_caption,
    choose_caption,
    clip_key,
    draw_seed,
    swap_adjacent,
    word_dropout,
)


def test_choice_is_uniform_over_the_captions() -> None:
    rng = np.random.default_rng(0)
    counts = collections.Counter(choose_caption(["a", "b", "c"], rng) for _ in range(3000))
    assert set(counts) == {"a", "b", "c"} and min(counts.values()) > 900
    with pytest.raises(ValueError, match="without captions"):
        choose_caption([], rng)


def test_word_dropout_keeps_order_and_at_least_one_word() -> None:
    rng = np.random.default_rng(1)
    words = ["a", "dog", "barks", "at", "the", "mailman"]
    for _ in range(200):
        out = word_dropout(" ".join(words), 0.5, rng).split()
        assert 1 <= len(out) <= len(words)
        positions = [words.index(w) for w in out]
        assert positions == sorted(positions)
    assert word_dropout("rain", 1.0, rng) == "rain"  # everything dropped -> one word kept
    assert word_dropout("a dog barks", 0.0, rng) == "a dog barks"
    # p = 0.5 drops half of the words on average (6 words x 2000 draws).
    kept = sum(len(word_dropout(" ".join(words), 0.5, rng).split()) for _ in range(2000))
    assert kept / (2000 * 6) == pytest.approx(0.5, abs=0.03)


def test_swap_exchanges_exactly_one_adjacent_pair() -> None:
    rng = np.random.default_rng(2)
    words = ["one", "two", "three", "four"]
    for _ in range(100):
        out = swap_adjacent(" ".join(words), rng).split()
        changed = [i for i, (a, b) in enumerate(zip(words, out, strict=True)) if a != b]
        assert len(changed) == 2 and changed[1] == changed[0] + 1
        assert out[changed[0]] == words[changed[1]] and out[changed[1]] == words[changed[0]]
    assert swap_adjacent("rain", rng) == "rain"


def test_augmentation_is_reproducible_per_seed() -> None:
    text = "a man speaks while a dog barks"
    a = augment_caption(text, 0.3, np.random.default_rng(draw_seed(0, "clip/1")))
    b = augment_caption(text, 0.3, np.random.default_rng(draw_seed(0, "clip/1")))
    assert a == b
    outcomes = {augment_caption(text, 0.3, np.random.default_rng(s)) for s in range(50)}
    assert len(outcomes) > 10


def test_clip_keys_and_seeds_are_stable_across_processes() -> None:
    # blake2b digests, not Python's salted str hash: the same on every worker and run.
    assert clip_key("esc50/1-100032-A-0") == clip_key("esc50/1-100032-A-0")
    assert clip_key("a") != clip_key("b") and 0 <= clip_key("a") < 2**63
    assert draw_seed(7, "train", 0, "x") != draw_seed(7, "train", 1, "x")
    assert 0 <= draw_seed("anything") < 2**31

"""Caption choice and caption augmentation for retrieval training (pure Python).

Each training step pairs a clip with ONE of its captions, drawn anew every epoch, so all
captions of a clip are seen over the epochs while a batch never holds the same clip twice.
Caption augmentation perturbs the text of a share of the batch (`gpa.caption_aug_share`),
by `gpa.caption_aug`:

- "lexical" ("Good, Fast, Cheap" section 3): one content word is swapped for a common
  misspelling of it, a WordNet synonym or a WordNet hypernym (`gpa_ray.data.lexicon`);
  the kind is drawn uniformly, then the word among those that have one (our choices: the
  paper names the three kinds only). Function words and words under 3 letters are kept.
- "dropout_swap": word dropout (each word dropped with probability p, at least one word
  kept) or one swap of two adjacent words, chosen with equal probability.

Both keep the caption's meaning, so the pair stays a positive.

Randomness comes from a `numpy.random.Generator` the caller seeds, so a clip's draws are
reproducible.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence

import numpy as np

from gpa_ray.config import GPAConfig
from gpa_ray.data.lexicon import Lexicon, load_lexicon

CAPTION_AUGMENTATIONS = ("dropout_swap", "lexical")
LEXICAL_KINDS = ("misspelling", "synonym", "hypernym")
# fmt: off
FUNCTION_WORDS = frozenset((
    "the", "and", "are", "was", "were", "for", "with", "from", "that", "this", "than", "then",
    "there", "their", "its", "into", "onto", "while", "when", "where", "who", "whom", "which",
    "what", "has", "have", "had", "but", "not", "nor", "yet", "our", "out", "off", "over",
    "very", "some", "any", "all", "each", "few", "more", "most", "other", "such", "only",
    "own", "same", "too", "can", "will", "just",
))
# fmt: on
_WORD = re.compile(r"([A-Za-z]+)")


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


def _alternatives(kind: str, word: str, lexicon: Lexicon) -> list[str]:
    lookups: dict[str, Callable[[str], list[str]]] = {
        "misspelling": lambda w: lexicon.misspellings.get(w, []),
        "synonym": lexicon.wordnet.synonyms,
        "hypernym": lexicon.wordnet.hypernyms,
    }
    return [alt for alt in lookups[kind](word) if alt.lower() != word]


def lexical_augment(caption: str, lexicon: Lexicon, rng: np.random.Generator) -> str:
    """One content word replaced by a misspelling, synonym or hypernym (see the module
    docstring); a caption with no replaceable word is returned unchanged."""
    parts = _WORD.split(caption)  # words at the odd indices, the text between them around
    content = [
        i for i in range(1, len(parts), 2)
        if len(parts[i]) >= 3 and parts[i].lower() not in FUNCTION_WORDS
    ]  # fmt: skip
    for kind in rng.permutation(LEXICAL_KINDS):
        options = [
            (i, alts) for i in content if (alts := _alternatives(kind, parts[i].lower(), lexicon))
        ]
        if options:
            index, alts = options[int(rng.integers(len(options)))]
            new = alts[int(rng.integers(len(alts)))]
            parts[index] = new[:1].upper() + new[1:] if parts[index][:1].isupper() else new
            return "".join(parts)
    return caption


def augment_text(gpa: GPAConfig, caption: str, rng: np.random.Generator) -> str:
    """The caption augmentation `gpa.caption_aug` applied to one chosen caption."""
    if gpa.caption_aug == "lexical":
        lexicon = load_lexicon(gpa.lexicon_wordnet, gpa.lexicon_misspellings)
        return lexical_augment(caption, lexicon, rng)
    if gpa.caption_aug == "dropout_swap":
        return augment_caption(caption, gpa.caption_word_dropout, rng)
    raise ValueError(
        f"unknown gpa.caption_aug {gpa.caption_aug!r}; choose one of {CAPTION_AUGMENTATIONS}"
    )

"""A lexical database for caption augmentation: WordNet synonyms and hypernyms, and common
misspellings ("Good, Fast, Cheap" section 3: "swapping words for common misspellings and
using synonyms and hypernyms").

Both sources install from the package registries as plain data files, read here without
any further library:

- WordNet 3.0 in its Princeton database format (`index.<pos>`, `data.<pos>`, `<pos>.exc`),
  as Debian's `wordnet-base` installs it in /usr/share/wordnet (`gpa.lexicon_wordnet`).
- The list of common English misspellings of codespell (`wrong->right` lines), shipped in
  its PyPI wheel and in Debian's `codespell` package as `codespell_lib/data/dictionary.txt`
  (`gpa.lexicon_misspellings`; empty: the installed `codespell_lib`, else Debian's path).

A word's sense is its first WordNet sense (the most frequent one, as the index orders
them); its synonyms are the other lemmas of that synset, its hypernyms the lemmas of the
synset's first hypernym. Inflected forms are reduced with the exception lists and
WordNet's detachment rules (morphy), so "dogs" finds "dog"; the replacement is the base
form. Memory: the lemma -> first-sense offset maps and the misspelling map (about 30 MB
per process for the full WordNet), read once per process and shared by every caption.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
DEBIAN_WORDNET = "/usr/share/wordnet"
DEBIAN_CODESPELL = "/usr/lib/python3/dist-packages/codespell_lib/data/dictionary.txt"
HYPERNYM_POINTERS = ("@", "@i")
DETACHMENT = {
    "n": [("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
          ("men", "man"), ("ies", "y"), ("s", "")],
    "v": [("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"),
          ("ing", ""), ("s", "")],
    "a": [("er", ""), ("est", ""), ("er", "e"), ("est", "e")],
    "r": [],
}  # fmt: skip


class LexiconError(RuntimeError):
    """The lexical database is missing or unreadable (names the file and the package)."""


@dataclass(frozen=True)
class _Synset:
    lemmas: tuple[str, ...]
    hypernym: tuple[str, str] | None  # (pos, offset) of the first hypernym


class WordNet:
    """First-sense synonyms and hypernyms from a WordNet 3.0 database folder."""

    def __init__(self, folder: str) -> None:
        root = Path(folder)
        if not (root / "index.noun").is_file():
            raise LexiconError(
                f"no WordNet database in {folder!r} (index.noun missing): install Debian's "
                "`wordnet-base` package (apt-get install wordnet-base), or set "
                "gpa.lexicon_wordnet to a folder holding WordNet 3.0's dict files"
            )
        self.root = root
        self.first_sense: dict[str, dict[str, str]] = {}
        self.exceptions: dict[str, dict[str, str]] = {}
        for pos, name in POS_FILES.items():
            self.first_sense[pos] = _read_index(root / f"index.{name}")
            self.exceptions[pos] = _read_exceptions(root / f"{name}.exc")

    def base_forms(self, word: str, pos: str) -> list[str]:
        """Lemmas of `pos` that `word` may inflect (itself first if it is one)."""
        word = word.lower()
        found = [word] if word in self.first_sense[pos] else []
        exception = self.exceptions[pos].get(word)
        if exception and exception in self.first_sense[pos]:
            found.append(exception)
        for suffix, ending in DETACHMENT[pos]:
            if word.endswith(suffix) and len(word) > len(suffix) + 1:
                base = word[: len(word) - len(suffix)] + ending
                if base in self.first_sense[pos]:
                    found.append(base)
        return list(dict.fromkeys(found))

    def _synset(self, pos: str, offset: str) -> _Synset:
        return _read_synset(self.root / f"data.{POS_FILES[pos]}", offset)

    def synonyms(self, word: str) -> list[str]:
        """Other lemmas of the first sense of the word's first part of speech (noun, verb,
        adjective, adverb: the first it is a form of)."""
        for pos in POS_FILES:
            bases = self.base_forms(word, pos)
            if bases:
                lemmas = self._synset(pos, self.first_sense[pos][bases[0]]).lemmas
                return [lemma for lemma in lemmas if lemma.lower() != bases[0]]
        return []

    def hypernyms(self, word: str) -> list[str]:
        """Lemmas of the first hypernym of the word's first noun (else verb) sense."""
        for pos in ("n", "v"):
            for base in self.base_forms(word, pos):
                pointer = self._synset(pos, self.first_sense[pos][base]).hypernym
                if pointer is not None:
                    return list(self._synset(*pointer).lemmas)
        return []


def _read_index(path: Path) -> dict[str, str]:
    """lemma -> offset of its first (most frequent) sense, from an `index.<pos>` file."""
    out: dict[str, str] = {}
    with _open(path) as lines:
        for line in lines:
            if line.startswith(" "):
                continue  # the license header
            fields = line.split()
            n_synsets, n_pointers = int(fields[2]), int(fields[3])
            offsets = fields[6 + n_pointers :]
            if n_synsets and offsets:
                out[fields[0]] = offsets[0]
    return out


def _read_exceptions(path: Path) -> dict[str, str]:
    """Irregular form -> its first base form, from a `<pos>.exc` file (may be absent)."""
    if not path.is_file():
        return {}
    with _open(path) as lines:
        return {f[0]: f[1] for f in (line.split() for line in lines) if len(f) >= 2}


def _read_synset(path: Path, offset: str) -> _Synset:
    """One `data.<pos>` record; its byte offset is the synset id."""
    try:
        with path.open("rb") as handle:
            handle.seek(int(offset))
            fields = handle.readline().decode("utf-8").split()
    except OSError as exc:
        raise LexiconError(f"cannot read WordNet file {path}: {exc}") from exc
    if not fields or fields[0] != offset:
        raise LexiconError(f"{path} has no synset at byte offset {offset}: not WordNet 3.0 data")
    n_words = int(fields[3], 16)
    lemmas = tuple(_lemma(fields[4 + 2 * i]) for i in range(n_words))
    at = 4 + 2 * n_words
    hypernym = None
    for i in range(int(fields[at])):
        symbol, target, pos = fields[at + 1 + 4 * i : at + 4 + 4 * i]
        if symbol in HYPERNYM_POINTERS:
            hypernym = ("a" if pos == "s" else pos, target)
            break
    return _Synset(lemmas, hypernym)


def _lemma(raw: str) -> str:
    """A data-file word as text: underscores are spaces, adjective markers like (p) go."""
    return raw.split("(", 1)[0].replace("_", " ")


def _open(path: Path):  # noqa: ANN202 - a text file handle
    try:
        return path.open(encoding="utf-8")
    except OSError as exc:
        raise LexiconError(f"cannot read WordNet file {path}: {exc}") from exc


def misspellings_path(configured: str = "") -> str:
    """The codespell misspelling list to use: `configured`, else the installed
    `codespell_lib`'s, else Debian's; a clear error naming the packages if none exists."""
    candidates = [configured] if configured else []
    if not configured:
        spec = importlib.util.find_spec("codespell_lib")
        if spec is not None and spec.submodule_search_locations:
            for folder in spec.submodule_search_locations:
                candidates.append(str(Path(folder) / "data" / "dictionary.txt"))
        candidates.append(DEBIAN_CODESPELL)
    for candidate in candidates:
        if Path(candidate).is_file():
            return candidate
    raise LexiconError(
        f"no list of common misspellings at {candidates}: install codespell (PyPI `codespell` "
        "or Debian's `codespell` package), or set gpa.lexicon_misspellings to its "
        "codespell_lib/data/dictionary.txt"
    )


def read_misspellings(path: str) -> dict[str, list[str]]:
    """correct word -> its common misspellings, from codespell's `wrong->right` lines.

    Only unambiguous entries are kept (one correction, both sides single alphabetic
    words), so a misspelling always stands for the word it replaces."""
    out: dict[str, list[str]] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise LexiconError(f"cannot read the misspelling list {path}: {exc}") from exc
    for line in text.splitlines():
        wrong, sep, right = line.partition("->")
        right = right.strip()
        if sep and wrong.isalpha() and right.isalpha() and wrong.islower() and right.islower():
            out.setdefault(right, []).append(wrong)
    return out


@dataclass(frozen=True)
class Lexicon:
    """WordNet plus the misspelling map: what lexical caption augmentation draws from."""

    wordnet: WordNet
    misspellings: dict[str, list[str]]


@functools.lru_cache(maxsize=4)
def load_lexicon(wordnet_folder: str = DEBIAN_WORDNET, misspellings: str = "") -> Lexicon:
    """The lexicon of these files, read once per process."""
    path = misspellings_path(misspellings)
    return Lexicon(WordNet(wordnet_folder or DEBIAN_WORDNET), read_misspellings(path))

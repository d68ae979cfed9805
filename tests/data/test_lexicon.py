"""Lexical caption augmentation: a WordNet database in the Princeton format, written here
with byte offsets as the real files have them, and codespell's misspelling list format;
the installed WordNet (Debian `wordnet-base`) too where the machine has it."""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from gpa_ray.config import GPAConfig
from gpa_ray.config_loading import load_config
from gpa_ray.data.captions import augment_caption, augment_text, lexical_augment
from gpa_ray.data.lexicon import (
    DEBIAN_WORDNET,
    LexiconError,
    WordNet,
    load_lexicon,
    misspellings_path,
    read_misspellings,
)
from gpa_ray.testing.models import save_tiny_text_model
from gpa_ray.train.gpa_loop import GPACollate

LICENSE = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
# name: (pos, lemmas, hypernym name or None)
SYNSETS = {
    "dog": ("n", ["dog", "domestic_dog", "Canis_familiaris"], "canine"),
    "canine": ("n", ["canine", "canid"], None),
    "goose": ("n", ["goose"], "bird"),
    "bird": ("n", ["bird"], None),
    "bark": ("v", ["bark"], "utter"),
    "utter": ("v", ["utter", "emit", "let_out"], None),
    "loud": ("a", ["loud"], None),
}
MISSPELLINGS = "dgo->dog\nbrak->bark\nabbout->about, abbot,\nDogg->Dog\nloudd->loud\n"


def write_wordnet(folder: Path) -> Path:
    """index.<pos> and data.<pos> files whose synset ids are byte offsets, as in WordNet."""
    names = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
    offsets: dict[str, int] = {}
    for pos in names:
        position = len(LICENSE.encode())
        for key, (p, lemmas, _) in SYNSETS.items():
            if p == pos:
                offsets[key] = position
                dummy = collections.defaultdict(int)  # offsets have a fixed width
                position += len(_record(key, lemmas, SYNSETS[key][2], dummy).encode())
    for pos, name in names.items():
        data, index = [LICENSE], [LICENSE]
        for key, (p, lemmas, hyper) in SYNSETS.items():
            if p != pos:
                continue
            data.append(_record(key, lemmas, hyper, offsets))
            for lemma in lemmas:
                index.append(f"{lemma.lower()} {pos} 1 1 @ 1 0 {offsets[key]:08d}  \n")
        (folder / f"data.{name}").write_text("".join(data))
        (folder / f"index.{name}").write_text("".join(sorted(index)))
    (folder / "noun.exc").write_text("geese goose\n")
    return folder


def _record(key: str, lemmas: list[str], hyper: str | None, offsets: dict[str, int]) -> str:
    pos = SYNSETS[key][0]
    words = " ".join(f"{lemma} 0" for lemma in lemmas)
    pointers = "000" if hyper is None else f"001 @ {offsets[hyper]:08d} {pos} 0000"
    return f"{offsets[key]:08d} 05 {pos} {len(lemmas):02x} {words} {pointers} | a gloss  \n"


@pytest.fixture()
def lexicon(tmp_path: Path):
    folder = write_wordnet(tmp_path)
    spelling = tmp_path / "dictionary.txt"
    spelling.write_text(MISSPELLINGS)
    return load_lexicon(str(folder), str(spelling))


def test_first_sense_synonyms_and_hypernyms(lexicon) -> None:
    wordnet = lexicon.wordnet
    assert wordnet.synonyms("dog") == ["domestic dog", "Canis familiaris"]
    assert wordnet.hypernyms("dog") == ["canine", "canid"]
    # Inflections reach their lemma by the detachment rules and the exception list.
    assert wordnet.hypernyms("dogs") == ["canine", "canid"]
    assert wordnet.hypernyms("geese") == ["bird"]
    assert wordnet.hypernyms("barking") == ["utter", "emit", "let out"]
    assert wordnet.synonyms("goose") == [] and wordnet.hypernyms("bird") == []
    assert wordnet.synonyms("unknownword") == []


def test_misspellings_keep_only_unambiguous_lowercase_entries(lexicon) -> None:
    assert lexicon.misspellings == {"dog": ["dgo"], "bark": ["brak"], "loud": ["loudd"]}


def test_lexical_augment_changes_one_content_word(lexicon) -> None:
    caption = "The dog is barking loudly at the geese."
    allowed = {
        "dog": {"dgo", "domestic dog", "Canis familiaris", "canine", "canid"},
        "barking": {"utter", "emit", "let out"},
        "geese": {"bird"},
    }
    # Every caption one replacement can make ("The", "is", "at" are never touched).
    possible = {
        caption.replace(word, alt, 1): (word, alt) for word, alts in allowed.items() for alt in alts
    }
    seen = collections.Counter()
    for seed in range(200):
        out = lexical_augment(caption, lexicon, np.random.default_rng(seed))
        assert out == lexical_augment(caption, lexicon, np.random.default_rng(seed))
        assert out in possible, out
        seen[possible[out]] += 1
    # Every kind is drawn: a misspelling, a synonym and a hypernym of "dog" all occur.
    assert {("dog", "dgo"), ("dog", "domestic dog"), ("dog", "canine")} <= set(seen)
    assert {word for word, _ in seen} == set(allowed)


def test_caption_without_replaceable_words_is_unchanged(lexicon) -> None:
    assert lexical_augment("it is in the", lexicon, np.random.default_rng(0)) == "it is in the"
    assert lexical_augment("", lexicon, np.random.default_rng(0)) == ""


def test_augment_text_dispatch(tmp_path: Path, lexicon) -> None:
    folder, spelling = str(tmp_path), str(tmp_path / "dictionary.txt")
    gpa = GPAConfig(caption_aug="lexical", lexicon_wordnet=folder, lexicon_misspellings=spelling)
    out = augment_text(gpa, "a dog", np.random.default_rng(1))
    assert out != "a dog" and out.startswith("a ")
    # "dropout_swap" is the earlier augmentation, unchanged.
    old = augment_text(GPAConfig(), "a b c d e f", np.random.default_rng(1))
    assert old == augment_caption("a b c d e f", 0.15, np.random.default_rng(1))
    with pytest.raises(ValueError, match="gpa.caption_aug 'thesaurus'"):
        augment_text(GPAConfig(caption_aug="thesaurus"), "a dog", np.random.default_rng(1))


def test_missing_database_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(LexiconError, match="wordnet-base"):
        WordNet(str(tmp_path / "nowhere"))
    with pytest.raises(LexiconError, match="codespell"):
        misspellings_path(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad"
    bad.mkdir()
    write_wordnet(bad)
    (bad / "data.noun").write_text(LICENSE)  # offsets now point past the file's end
    with pytest.raises(LexiconError, match="no synset at byte offset"):
        WordNet(str(bad)).synonyms("dog")
    with pytest.raises(LexiconError, match="cannot read the misspelling list"):
        read_misspellings(str(bad))


@pytest.mark.skipif(
    not Path(DEBIAN_WORDNET, "index.noun").is_file(), reason="Debian wordnet-base not installed"
)
def test_installed_wordnet() -> None:
    wordnet = WordNet(DEBIAN_WORDNET)
    assert "automobile" in wordnet.synonyms("car")
    assert "canine" in wordnet.hypernyms("dogs")


def test_training_batches_augment_a_fifth_of_the_captions(tmp_path: Path, lexicon) -> None:
    # The collate's own caption path with the clotho_gfc setting (share 0.2, lexical):
    # over 1000 clips about 200 captions change (binomial sd 12.6), each by one word.
    cfg = load_config("clotho_gfc_cnn14")
    gpa = dataclasses.replace(
        cfg.gpa,
        lexicon_wordnet=str(tmp_path),
        lexicon_misspellings=str(tmp_path / "dictionary.txt"),
    )
    text = dataclasses.replace(
        cfg.text, model=save_tiny_text_model(tmp_path / "text"), allow_download=False
    )
    collate = GPACollate(dataclasses.replace(cfg, gpa=gpa, text=text), True, seed=5)
    caption = "a dog barking"
    changed = [
        collate._caption(f"clip{i}", [caption], None, i) != caption for i in range(1000)
    ]  # fmt: skip
    assert 162 <= sum(changed) <= 238

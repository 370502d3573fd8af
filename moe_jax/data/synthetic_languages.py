"""Deterministic artificial languages: the embedded default translation data.

The quickstart must train without any downloaded file, so moe_jax ships a
generator of small parallel corpora in three invented languages. Every
sentence expresses one *meaning*

    (subject noun, subject adjective?, subject plural?, verb,
     object noun,  object adjective?,  object plural?)

and each language renders a meaning with its own seeded lexicon and its own
grammar:

=====  ==========  ==============  ======================  ==============
code   name        word order      adjective               plural
=====  ==========  ==============  ======================  ==============
xa     Alvic       subj verb obj   before the noun         suffix ``-s``
xb     Borran      subj obj verb   after the noun; every   suffix ``-en``
                                   noun phrase starts
                                   with the article ``ka``
xc     Cenji       verb subj obj   after the noun          word ``mi``
                                                           before the noun
=====  ==========  ==============  ======================  ==============

Sentences are 3 to 7 words long, the lexicons hold 23 content words per
language, and translation is a deterministic function of the source sentence
(a tiny model can reach BLEU near 100). Everything is derived from one integer
seed with NumPy's PCG64 generator, so the corpus is bit-identical on every
machine. The train / validation / test splits hold disjoint meanings.

Public API: :data:`LANGUAGES`, :func:`parallel_corpus`,
:func:`corpus_text_for_vocabulary`, :class:`SyntheticWorld`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import numpy as np

# Bump when the generator changes: cached vocabularies are keyed by it.
GENERATOR_VERSION = 2

NUM_NOUNS = 12
NUM_VERBS = 6
NUM_ADJECTIVES = 5
ADJECTIVE_PROBABILITY = 0.4
PLURAL_PROBABILITY = 0.3

SPLIT_SIZES = {"train": 20_000, "validation": 500, "test": 500}


@dataclasses.dataclass(frozen=True)
class LanguageSpec:
  """Grammar and phonology of one artificial language."""
  code: str
  name: str
  order: str            # permutation of "SVO"
  adjective_after: bool
  article: Optional[str]
  plural_suffix: Optional[str]
  plural_word: Optional[str]
  consonants: str
  vowels: str
  syllable: str         # "CV" or "CVC"


LANGUAGES = {
    "xa": LanguageSpec("xa", "Alvic", "SVO", False, None, "s", None,
                       "ptkmnl", "aeiou", "CV"),
    "xb": LanguageSpec("xb", "Borran", "SOV", True, "ka", "en", None,
                       "bdgrvz", "aou", "CVC"),
    "xc": LanguageSpec("xc", "Cenji", "VSO", True, None, None, "mi",
                       "fhjwsy", "eiy", "CV"),
}


@dataclasses.dataclass(frozen=True)
class Meaning:
  """Indices into the shared concept inventory; -1 means "no adjective"."""
  subject: int
  subject_adjective: int
  subject_plural: bool
  verb: int
  obj: int
  object_adjective: int
  object_plural: bool


def _make_words(rng: np.random.Generator, spec: LanguageSpec, count: int,
                syllables: int, taken: set[str]) -> list[str]:
  """``count`` distinct words of ``syllables`` syllables, unseen in ``taken``."""
  words = []
  while len(words) < count:
    parts = []
    for _ in range(syllables):
      c = spec.consonants[rng.integers(len(spec.consonants))]
      v = spec.vowels[rng.integers(len(spec.vowels))]
      if spec.syllable == "CVC":
        parts.append(c + v + spec.consonants[rng.integers(len(spec.consonants))])
      else:
        parts.append(c + v)
    word = "".join(parts)
    if word not in taken:
      taken.add(word)
      words.append(word)
  return words


@dataclasses.dataclass
class _Lexicon:
  nouns: list[str]
  verbs: list[str]
  adjectives: list[str]


class SyntheticWorld:
  """The lexicons of all languages for one seed, and the rendering rules."""

  def __init__(self, seed: int = 0):
    self.seed = seed
    rng = np.random.Generator(np.random.PCG64(seed))
    taken = {spec.article for spec in LANGUAGES.values() if spec.article}
    taken |= {spec.plural_word for spec in LANGUAGES.values() if spec.plural_word}
    self.lexicons: dict[str, _Lexicon] = {}
    for code, spec in LANGUAGES.items():
      self.lexicons[code] = _Lexicon(
          nouns=_make_words(rng, spec, NUM_NOUNS, 2, taken),
          verbs=_make_words(rng, spec, NUM_VERBS, 3 if spec.syllable == "CV" else 2,
                            taken),
          adjectives=_make_words(rng, spec, NUM_ADJECTIVES, 2, taken))

  def _noun_phrase(self, code: str, noun: int, adjective: int,
                   plural: bool) -> list[str]:
    spec, lex = LANGUAGES[code], self.lexicons[code]
    word = lex.nouns[noun]
    if plural and spec.plural_suffix:
      word += spec.plural_suffix
    phrase = [word]
    if plural and spec.plural_word:
      phrase.insert(0, spec.plural_word)
    if adjective >= 0:
      if spec.adjective_after:
        phrase.append(lex.adjectives[adjective])
      else:
        phrase.insert(0, lex.adjectives[adjective])
    if spec.article:
      phrase.insert(0, spec.article)
    return phrase

  def render(self, meaning: Meaning, code: str) -> str:
    """The sentence that expresses ``meaning`` in language ``code``."""
    if code not in LANGUAGES:
      raise ValueError(f"Unknown synthetic language {code!r}; choose one of "
                       f"{sorted(LANGUAGES)}.")
    parts = {
        "S": self._noun_phrase(code, meaning.subject, meaning.subject_adjective,
                               meaning.subject_plural),
        "V": [self.lexicons[code].verbs[meaning.verb]],
        "O": self._noun_phrase(code, meaning.obj, meaning.object_adjective,
                               meaning.object_plural),
    }
    return " ".join(w for role in LANGUAGES[code].order for w in parts[role])


def _draw_meanings(rng: np.random.Generator, n: int) -> np.ndarray:
  """<int>[n, 7] random meaning tuples (vectorised)."""
  def adjective():
    has = rng.random(n) < ADJECTIVE_PROBABILITY
    return np.where(has, rng.integers(0, NUM_ADJECTIVES, n), -1)
  cols = [
      rng.integers(0, NUM_NOUNS, n), adjective(),
      (rng.random(n) < PLURAL_PROBABILITY).astype(np.int64),
      rng.integers(0, NUM_VERBS, n),
      rng.integers(0, NUM_NOUNS, n), adjective(),
      (rng.random(n) < PLURAL_PROBABILITY).astype(np.int64),
  ]
  return np.stack(cols, axis=1)


@functools.lru_cache(maxsize=4)
def split_meanings(seed: int = 0) -> dict[str, tuple[Meaning, ...]]:
  """Disjoint meanings for every split in :data:`SPLIT_SIZES`."""
  rng = np.random.Generator(np.random.PCG64([seed, 1]))
  total = sum(SPLIT_SIZES.values())
  unique: dict[tuple, None] = {}
  while len(unique) < total:
    for row in _draw_meanings(rng, total):
      unique.setdefault(tuple(int(v) for v in row), None)
      if len(unique) == total:
        break
  rows = list(unique)
  out, start = {}, 0
  # validation and test come first so that their contents do not depend on
  # the size of the training split.
  for split in ("validation", "test", "train"):
    size = SPLIT_SIZES[split]
    out[split] = tuple(
        Meaning(r[0], r[1], bool(r[2]), r[3], r[4], r[5], bool(r[6]))
        for r in rows[start:start + size])
    start += size
  return out


@functools.lru_cache(maxsize=4)
def world(seed: int = 0) -> SyntheticWorld:
  return SyntheticWorld(seed)


@functools.lru_cache(maxsize=64)
def parallel_corpus(source: str, target: str, split: str,
                    seed: int = 0) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """Aligned (source sentences, target sentences) for one split.

  Args:
    source, target: language codes from :data:`LANGUAGES`.
    split: ``train``, ``validation`` or ``test``.
    seed: the world seed (lexicons and meanings).
  """
  if split not in SPLIT_SIZES:
    raise ValueError(f"Unknown split {split!r}; the synthetic data has "
                     f"{sorted(SPLIT_SIZES)}.")
  w = world(seed)
  meanings = split_meanings(seed)[split]
  return (tuple(w.render(m, source) for m in meanings),
          tuple(w.render(m, target) for m in meanings))


def translation_prefix(source: str, target: str) -> str:
  """T5-style task prefix, e.g. ``"translate Alvic to Borran: "``."""
  return f"translate {LANGUAGES[source].name} to {LANGUAGES[target].name}: "


def corpus_text_for_vocabulary(seed: int = 0,
                               codes: Sequence[str] = tuple(LANGUAGES)) -> list[str]:
  """Training text for the synthetic SentencePiece model.

  Every training sentence of every language plus all task prefixes (repeated,
  as often as they occur in the tasks, so that BPE merges each prefix word
  into one piece, just like each word of the languages).
  """
  w = world(seed)
  meanings = split_meanings(seed)["train"]
  lines = [w.render(m, code) for code in codes for m in meanings]
  lines += [translation_prefix(s, t) for s in codes for t in codes if s != t
           ] * (len(meanings) // 10)
  return lines

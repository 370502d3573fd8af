"""Tests for moe_jax.data.synthetic_languages (pure Python, no TF)."""

import collections

import numpy as np
import pytest

from moe_jax.data import synthetic_languages as sl


def test_render_follows_each_grammar_by_hand():
  w = sl.SyntheticWorld(seed=0)
  m = sl.Meaning(subject=3, subject_adjective=4, subject_plural=True, verb=2,
                 obj=7, object_adjective=-1, object_plural=False)
  a, b, c = w.lexicons["xa"], w.lexicons["xb"], w.lexicons["xc"]
  # Alvic: SVO, adjective before noun, plural suffix -s.
  assert w.render(m, "xa") == " ".join(
      [a.adjectives[4], a.nouns[3] + "s", a.verbs[2], a.nouns[7]])
  # Borran: SOV, article 'ka' opens each noun phrase, adjective after, -en.
  assert w.render(m, "xb") == " ".join(
      ["ka", b.nouns[3] + "en", b.adjectives[4], "ka", b.nouns[7], b.verbs[2]])
  # Cenji: VSO, plural word 'mi' before the noun, adjective after.
  assert w.render(m, "xc") == " ".join(
      [c.verbs[2], "mi", c.nouns[3], c.adjectives[4], c.nouns[7]])


def test_same_seed_same_corpus_other_seed_differs():
  a = sl.SyntheticWorld(seed=0)
  b = sl.SyntheticWorld(seed=0)
  c = sl.SyntheticWorld(seed=1)
  assert a.lexicons == b.lexicons
  assert a.lexicons["xa"].nouns != c.lexicons["xa"].nouns


def test_words_are_unique_across_languages():
  w = sl.SyntheticWorld(seed=0)
  words = [x for lex in w.lexicons.values()
           for x in lex.nouns + lex.verbs + lex.adjectives]
  assert len(words) == len(set(words))


def test_splits_have_sizes_and_disjoint_meanings():
  splits = sl.split_meanings(0)
  assert {k: len(v) for k, v in splits.items()} == sl.SPLIT_SIZES
  train, val, test = (set(splits[k]) for k in ("train", "validation", "test"))
  assert len(train) == sl.SPLIT_SIZES["train"]  # no duplicates
  assert not train & val and not train & test and not val & test


def test_sentences_short_and_translation_is_a_function():
  src, tgt = sl.parallel_corpus("xb", "xc", "train")
  lengths = collections.Counter(len(s.split()) for s in src + tgt)
  assert min(lengths) >= 3 and max(lengths) <= 8
  mapping = {}
  for s, t in zip(src, tgt):
    assert mapping.setdefault(s, t) == t  # one source -> one target


def test_raw_draws_match_generator_probabilities():
  # (De-duplication in split_meanings favours rarer, longer meanings, so the
  # probabilities are checked on the raw draws.)
  rows = sl._draw_meanings(np.random.default_rng(0), 20_000)
  assert abs((rows[:, 1] >= 0).mean() - sl.ADJECTIVE_PROBABILITY) < 0.015
  assert abs(rows[:, 2].mean() - sl.PLURAL_PROBABILITY) < 0.015
  assert rows[:, 0].max() == sl.NUM_NOUNS - 1 and rows[:, 3].max() == sl.NUM_VERBS - 1


def test_bad_arguments_say_what_is_allowed():
  with pytest.raises(ValueError, match="choose one of"):
    sl.world(0).render(sl.split_meanings(0)["test"][0], "zz")
  with pytest.raises(ValueError, match="Unknown split"):
    sl.parallel_corpus("xa", "xb", "dev")

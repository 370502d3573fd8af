"""Multi30k (task 1) translation and span-corruption Tasks from gzip text.

Data directory: ``$MOE_JAX_DATA_DIR`` or gin ``moe_jax.data.data_dir.path``,
holding ``multi30k/SPLIT.LANG.gz`` (or the files directly); the layout of
``../shared/data/multi30k``. Read only when a dataset is requested; a missing
directory or file raises an error naming the expected path.

Registered here (splits ``train`` 29,000, ``validation`` 1,014 and ``test``
= ``test_2016_flickr`` 1,000):

* ``multi30k_translate_{src}_{tgt}`` for en<->de, en<->fr, en<->cs, with T5
  prefixes (``"translate English to German: ..."``, t5's ``translate``
  preprocessor); metric BLEU.
* ``multi30k_translate_mix`` -- the six directions, rates proportional to
  size (equal here).
* ``multi30k_span_corruption_{lang}`` for en, de, fr, cs -- T5 span
  corruption (noise density 0.15, mean span 3) of the monolingual text, and
  ``multi30k_span_corruption_mix``.

Vocabulary: ``$MOE_JAX_MULTI30K_VOCAB`` (a SentencePiece ``.model``, e.g.
T5's) if set, else an 8,000-piece BPE SentencePiece model trained on first
use from the training text of the four languages (about 2 s) into
``$MOE_JAX_CACHE_DIR`` (default ``~/.cache/moe_jax``); 100 extra ids.
"""

from __future__ import annotations

import functools
import os

import seqio
from t5.data import preprocessors as t5_preprocessors

from moe_jax.data import task_builders
from moe_jax.data import text_files
from moe_jax.data import vocab_trainer
from moe_jax.data import vocabularies

LANGUAGES = ("en", "de", "fr", "cs")
PAIRS = tuple((s, t) for x in ("de", "fr", "cs") for s, t in (("en", x), (x, "en")))
SPLIT_FILES = {"train": "train", "validation": "val", "test": "test_2016_flickr"}
SPLIT_SIZES = {"train": 29_000, "validation": 1_014, "test": 1_000}
VOCAB_ENV = "MOE_JAX_MULTI30K_VOCAB"
VOCAB_SIZE = 8000


def multi30k_dir() -> str:
  return text_files.find_dataset_dir("multi30k", "train.en.gz")


def read_split(split: str, languages=LANGUAGES):
  """``({lang: sentences}, ReadStats)`` for a split (aligned, cleaned)."""
  if split not in SPLIT_FILES:
    raise ValueError(f"Unknown Multi30k split {split!r}; use {sorted(SPLIT_FILES)}.")
  directory = multi30k_dir()
  return text_files.read_aligned(
      text_files.aligned_paths(directory, SPLIT_FILES[split], languages))


def _prefix(source: str, target: str) -> str:
  names = {"en": "English", "de": "German", "fr": "French", "cs": "Czech"}
  return f"translate {names[source]} to {names[target]}: "


def _build_vocab(path: str) -> None:
  columns, _ = read_split("train")
  texts = [s for lang in LANGUAGES for s in columns[lang]]
  # The task prefixes, as often as they occur, so that they get own pieces.
  texts += [_prefix(s, t) for s, t in PAIRS] * (SPLIT_SIZES["train"] // 10)
  vocab_trainer.train_sentencepiece(texts, path, vocab_size=VOCAB_SIZE,
                                    model_type="bpe")


def vocabulary() -> seqio.SentencePieceVocabulary:
  path = os.environ.get(VOCAB_ENV)
  if path:
    return vocabularies.sentencepiece_vocabulary(path)
  return vocabularies.CachedSentencePieceVocabulary(
      os.path.join(vocabularies.default_cache_dir(),
                   f"multi30k_v1_bpe{VOCAB_SIZE}.model"), _build_vocab)


def _pair_fn(split, shuffle_files, seed=None, *, languages):
  columns, _ = read_split(split, languages)
  return task_builders.examples_dataset(
      {lang: columns[lang] for lang in languages}, shuffle_files, seed)


def _text_fn(split, shuffle_files, seed=None, *, language):
  columns, _ = read_split(split, (language,))
  return task_builders.examples_dataset({"text": columns[language]},
                                        shuffle_files, seed)


def _source_stats(split, languages):
  return read_split(split, languages)[1].as_dict()


def translate_task_name(source: str, target: str) -> str:
  return f"multi30k_translate_{source}_{target}"


def span_corruption_task_name(language: str) -> str:
  return f"multi30k_span_corruption_{language}"


def register() -> None:
  vocab = vocabulary()
  for source, target in PAIRS:
    task = task_builders.add_translation_task(
        translate_task_name(source, target),
        functools.partial(_pair_fn, languages=(source, target)),
        splits=tuple(SPLIT_FILES), vocabulary=vocab,
        num_input_examples=SPLIT_SIZES,
        extra_preprocessors=[functools.partial(
            t5_preprocessors.translate, source_language=source,
            target_language=target)])
    task.source_stats = functools.partial(_source_stats,
                                          languages=(source, target))
  task_builders.add_mixture(
      "multi30k_translate_mix",
      [translate_task_name(s, t) for s, t in PAIRS],
      default_rate=seqio.mixing_rate_num_examples)
  for language in LANGUAGES:
    task = task_builders.add_span_corruption_task(
        span_corruption_task_name(language),
        seqio.FunctionDataSource(
            functools.partial(_text_fn, language=language),
            splits=tuple(SPLIT_FILES), num_input_examples=SPLIT_SIZES),
        vocabulary=vocab)
    task.source_stats = functools.partial(_source_stats, languages=(language,))
  task_builders.add_mixture(
      "multi30k_span_corruption_mix",
      [span_corruption_task_name(lang) for lang in LANGUAGES], default_rate=1.0)


register()

"""The embedded default: translation between three artificial languages.

Needs no file and no download (see :mod:`moe_jax.data.synthetic_languages`).

Registered here:

* ``synthetic_translate_{src}_{tgt}`` for the six ordered pairs of ``xa``
  (Alvic), ``xb`` (Borran) and ``xc`` (Cenji); inputs carry a T5-style prefix
  (``"translate Alvic to Borran: ..."``). Splits ``train`` (20,000),
  ``validation`` (500) and ``test`` (500), disjoint meanings. Metric: BLEU.
* ``synthetic_translate_mix`` -- all six directions, equal rates.

Vocabulary: a 400-piece BPE SentencePiece model (+100 T5 extra ids) trained
on first use into ``$MOE_JAX_CACHE_DIR`` (default ``~/.cache/moe_jax``);
about half a second, deterministic.
"""

from __future__ import annotations

import functools
import itertools

from moe_jax.data import synthetic_languages as langs
from moe_jax.data import task_builders
from moe_jax.data import vocabularies

LANGUAGE_CODES = tuple(langs.LANGUAGES)
PAIRS = tuple(itertools.permutations(LANGUAGE_CODES, 2))
MIXTURE_NAME = "synthetic_translate_mix"


def task_name(source: str, target: str) -> str:
  return f"synthetic_translate_{source}_{target}"


def _dataset_fn(split, shuffle_files, seed=None, *, source, target):
  src, tgt = langs.parallel_corpus(source, target, split)
  prefix = langs.translation_prefix(source, target)
  return task_builders.examples_dataset(
      {"inputs": [prefix + s for s in src], "targets": tgt},
      shuffle=shuffle_files, seed=seed)


def register() -> None:
  vocabulary = vocabularies.synthetic_vocabulary()
  for source, target in PAIRS:
    task_builders.add_translation_task(
        task_name(source, target),
        functools.partial(_dataset_fn, source=source, target=target),
        splits=tuple(langs.SPLIT_SIZES),
        vocabulary=vocabulary,
        num_input_examples=dict(langs.SPLIT_SIZES))
  task_builders.add_mixture(MIXTURE_NAME, [task_name(s, t) for s, t in PAIRS],
                            default_rate=1.0)


register()

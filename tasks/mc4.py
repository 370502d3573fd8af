"""mC4 span corruption per language and temperature-sampled mixtures.

TFDS ``c4/multilingual`` (split ``<lang>`` for train, ``<lang>-validation``),
read only when used.

* ``mc4_{lang}_span_corruption`` for every language in :data:`LANGUAGES` --
  T5 span corruption (noise density 0.15, mean span 3).
* ``mc4_span_corruption`` -- mixture over :data:`DEFAULT_MIXTURE_LANGUAGES`
  sampled as in mT5: rate proportional to ``n_lang ** 0.3``.

Other language lists: call :func:`register_mixture` (e.g. from your own task
module named in gin ``MIXTURE_OR_TASK_MODULE``)::

  tasks.mc4.register_mixture("mc4_euro", ["en", "de", "fr", "cs"], exponent=0.3)

Vocabulary: ``$MOE_JAX_VOCAB`` (mT5's ``sentencepiece.model``) if set, else
bytes (as in ByT5).
"""

from __future__ import annotations

from typing import Sequence

import seqio

from moe_jax.data import mixing
from moe_jax.data import task_builders
from moe_jax.data import vocabularies

TFDS_NAME = "c4/multilingual:3.1.0"
MT5_EXPONENT = 0.3
# A representative subset of mC4's 101 languages (add more with register_task).
LANGUAGES = ("ar", "bg", "cs", "de", "el", "en", "es", "fi", "fr", "hi", "id",
             "it", "ja", "ko", "nl", "pl", "pt", "ro", "ru", "sv", "sw", "th",
             "tr", "uk", "vi", "zh")
DEFAULT_MIXTURE_LANGUAGES = LANGUAGES


def task_name(language: str) -> str:
  return f"mc4_{language}_span_corruption"


def register_task(language: str) -> seqio.Task:
  """Registers ``mc4_{language}_span_corruption``."""
  source = seqio.TfdsDataSource(
      tfds_name=TFDS_NAME,
      splits={"train": language, "validation": f"{language}-validation"})
  return task_builders.add_span_corruption_task(
      task_name(language), source, vocabularies.default_vocabulary())


def register_mixture(name: str, languages: Sequence[str],
                     exponent: float = MT5_EXPONENT) -> seqio.Mixture:
  """A mixture of the languages' tasks with rates ``n ** exponent``."""
  if not languages:
    raise ValueError("register_mixture needs at least one language code.")
  for language in languages:
    if task_name(language) not in seqio.TaskRegistry.names():
      register_task(language)
  return task_builders.add_mixture(
      name, [task_name(lang) for lang in languages],
      default_rate=mixing.exponent_rate(exponent))


def register() -> None:
  for language in LANGUAGES:
    register_task(language)
  register_mixture("mc4_span_corruption", DEFAULT_MIXTURE_LANGUAGES)


register()

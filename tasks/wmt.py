"""WMT translation Tasks (TFDS; T5's names and preprocessing), read when used.

* ``wmt_t2t_ende_v003`` -- ``wmt_t2t_translate/de-en``, English to German.
* ``wmt14_enfr_v003``   -- ``wmt14_translate/fr-en``, English to French.
* ``wmt16_enro_v003``   -- ``wmt16_translate/ro-en``, English to Romanian.
* ``wmt19_ende_v003``   -- ``wmt19_translate/de-en``, English to German.
* ``wmt14_ende_v003``, ``wmt14_encs_v003``, ``wmt14_enru_v003``.
* ``wmt_translate_mix`` -- all of the above, temperature-sampled
  (rate ``n ** (1/T)``, ``T = 5`` as common for multilingual NMT).

Inputs use t5's ``translate`` preprocessor (``"translate English to German:
..."``); metric BLEU (sacrebleu). Vocabulary: ``$MOE_JAX_VOCAB`` (T5's
``sentencepiece.model``) if set, else bytes.
"""

from __future__ import annotations

import functools

import seqio
from t5.data import preprocessors as t5_preprocessors

from moe_jax.data import mixing
from moe_jax.data import task_builders
from moe_jax.data import vocabularies

# task name -> (tfds name, source language, target language)
TASKS = {
    "wmt_t2t_ende_v003": ("wmt_t2t_translate/de-en:1.0.0", "en", "de"),
    "wmt14_enfr_v003": ("wmt14_translate/fr-en:1.0.0", "en", "fr"),
    "wmt16_enro_v003": ("wmt16_translate/ro-en:1.0.0", "en", "ro"),
    "wmt19_ende_v003": ("wmt19_translate/de-en:1.0.0", "en", "de"),
    "wmt14_ende_v003": ("wmt14_translate/de-en:1.0.0", "en", "de"),
    "wmt14_encs_v003": ("wmt14_translate/cs-en:1.0.0", "en", "cs"),
    "wmt14_enru_v003": ("wmt14_translate/ru-en:1.0.0", "en", "ru"),
}
MIXTURE_TEMPERATURE = 5.0


def register() -> None:
  vocab = vocabularies.default_vocabulary()
  for name, (tfds_name, source, target) in TASKS.items():
    task_builders.add_task(
        name,
        source=seqio.TfdsDataSource(tfds_name=tfds_name),
        preprocessors=[
            functools.partial(t5_preprocessors.translate,
                              source_language=source, target_language=target),
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=task_builders.text_features(vocab),
        metric_fns=[task_builders.bleu_metric])
  task_builders.add_mixture(
      "wmt_translate_mix", list(TASKS),
      default_rate=mixing.temperature_rate(MIXTURE_TEMPERATURE))


register()

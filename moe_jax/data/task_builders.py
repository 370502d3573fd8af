"""Helpers shared by the Task registrations in ``tasks/``.

Registering never reads data: sources are functions (or TFDS names) that run
only when a dataset is requested.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, Optional, Sequence

import seqio
import tensorflow as tf
from t5.data import preprocessors as t5_preprocessors

# Translation sources are fully shuffled (anew each epoch), so the Task-level
# shuffle only needs to decorrelate a little; small keeps the first batch fast.
DEFAULT_SHUFFLE_BUFFER = 256


def bleu_metric(targets: Sequence[str], predictions: Sequence[str]) -> dict:
  """Corpus BLEU (sacrebleu, ``intl`` tokenizer as in T5) on a 0-100 scale."""
  from t5.evaluation import metrics  # pylint: disable=g-import-not-at-top
  return metrics.bleu(list(targets), list(predictions))


def text_features(vocabulary: seqio.Vocabulary,
                  with_inputs: bool = True) -> dict[str, seqio.Feature]:
  features = {"targets": seqio.Feature(vocabulary, add_eos=True)}
  if with_inputs:
    features["inputs"] = seqio.Feature(vocabulary, add_eos=True)
  return features


def examples_dataset(columns: Mapping[str, Sequence[str]], shuffle: bool,
                     seed: Optional[int]) -> tf.data.Dataset:
  """A dataset of string examples; a full seeded shuffle if ``shuffle``.

  The shuffle is by index: each pass over the examples (a ``repeat`` re-runs
  the source) draws a fresh key from a seeded stream and visits the examples
  in the order ``tf.random.experimental.index_shuffle`` gives under that key.
  So a checkpointed tf.data iterator holds a few integers for this source, not
  a shuffle buffer holding the whole corpus. The shuffle happens *before*
  seqio shards the examples, so every host must use the same seed; ``None``
  falls back to 0 for that reason.
  """
  tensors = {k: tf.constant(list(v), dtype=tf.string) for k, v in columns.items()}
  n = len(next(iter(columns.values())))
  if not shuffle or n < 2:
    return tf.data.Dataset.from_tensor_slices(tensors)
  seed = 0 if seed is None else int(seed)
  pass_keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)

  def one_pass(key):
    seeds = tf.stack([tf.constant(seed, tf.int64), key])

    def example(i):
      j = tf.random.experimental.index_shuffle(i, seeds, tf.constant(n - 1, tf.int64))
      return {k: tf.gather(t, j) for k, t in tensors.items()}
    return tf.data.Dataset.range(n).map(example)

  return pass_keys.flat_map(one_pass)


def add_translation_task(name: str,
                         dataset_fn: Callable[..., tf.data.Dataset],
                         splits: Sequence[str],
                         vocabulary: seqio.Vocabulary,
                         num_input_examples: Optional[Mapping[str, int]] = None,
                         extra_preprocessors: Sequence[Callable] = ()) -> seqio.Task:
  """Registers a text-to-text Task whose source gives ``inputs``/``targets``.

  ``dataset_fn(split, shuffle_files, seed)`` returns a dataset of already
  prefixed string pairs (``extra_preprocessors`` run before tokenization).
  Over-long sequences are truncated by seqio's ``append_eos_after_trim``
  (EOS kept); :func:`moe_jax.data.pipeline.data_report` counts them.
  """
  return add_task(
      name,
      source=seqio.FunctionDataSource(
          dataset_fn, splits=list(splits), num_input_examples=num_input_examples),
      preprocessors=[
          *extra_preprocessors,
          seqio.preprocessors.tokenize,
          seqio.CacheDatasetPlaceholder(),
          seqio.preprocessors.append_eos_after_trim,
      ],
      output_features=text_features(vocabulary),
      metric_fns=[bleu_metric],
      shuffle_buffer_size=DEFAULT_SHUFFLE_BUFFER)


def _rekey_text(text_key: str) -> Callable:
  return functools.partial(t5_preprocessors.rekey,
                           key_map={"inputs": None, "targets": text_key})


def add_task(name: str, **kwargs) -> seqio.Task:
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, **kwargs)


def unsupervised_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  return {"inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
          "targets": seqio.Feature(vocabulary, add_eos=True)}


def _text_objective_task(name: str, source: seqio.DataSource,
                         vocabulary: seqio.Vocabulary, text_key: str, objective,
                         targets_only: bool = False) -> seqio.Task:
  """Raw text -> tokens -> (cache) -> a T5 objective preprocessor."""
  preprocessors = [_rekey_text(text_key), seqio.preprocessors.tokenize,
                   seqio.CacheDatasetPlaceholder(), objective]
  if targets_only:
    features = {"targets": seqio.Feature(vocabulary, add_eos=True)}
  else:
    preprocessors.append(seqio.preprocessors.append_eos_after_trim)
    features = unsupervised_features(vocabulary)
  return add_task(name, source=source, preprocessors=preprocessors,
                  output_features=features, metric_fns=[])


def add_span_corruption_task(name: str, source: seqio.DataSource,
                             vocabulary: seqio.Vocabulary,
                             text_key: str = "text") -> seqio.Task:
  """T5 span corruption (noise density 0.15, mean span length 3) of raw text."""
  return _text_objective_task(name, source, vocabulary, text_key,
                              t5_preprocessors.span_corruption)


def add_prefix_lm_task(name: str, source: seqio.DataSource,
                       vocabulary: seqio.Vocabulary,
                       text_key: str = "text") -> seqio.Task:
  """T5's prefix-LM objective: split each text into (inputs, targets)."""
  return _text_objective_task(name, source, vocabulary, text_key,
                              t5_preprocessors.prefix_lm)


def add_causal_lm_task(name: str, source: seqio.DataSource,
                       vocabulary: seqio.Vocabulary,
                       text_key: str = "text") -> seqio.Task:
  """Plain left-to-right LM on targets only (T5's ``full_lm``), for decoders."""
  return _text_objective_task(name, source, vocabulary, text_key,
                              t5_preprocessors.full_lm, targets_only=True)



def add_mixture(name: str, tasks, default_rate=None) -> seqio.Mixture:
  """Registers (or re-registers) a Mixture."""
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, tasks, default_rate=default_rate)

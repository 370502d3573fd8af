"""Tests for moe_jax.data.mixing: temperature sampling, formula and measured."""

import collections

import numpy as np
import pytest
import seqio
import tensorflow as tf

from moe_jax.data import mixing
from moe_jax.data import task_builders

SIZES = {"mixtest_small": 100, "mixtest_mid": 1_000, "mixtest_big": 10_000}


def test_probabilities_by_hand():
  p = mixing.temperature_probabilities({"a": 100, "b": 10_000}, temperature=2.0)
  assert p["a"] == pytest.approx(10 / 110) and p["b"] == pytest.approx(100 / 110)
  uniform = mixing.temperature_probabilities({"a": 1, "b": 10**6}, temperature=1e9)
  assert uniform["a"] == pytest.approx(0.5, abs=1e-6)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    mixing.temperature_probabilities({"a": 1}, 0)


def _register_tasks():
  vocab = seqio.PassThroughVocabulary(size=10)
  for i, (name, n) in enumerate(SIZES.items()):
    def dataset_fn(split, shuffle_files, seed=None, i=i):
      del split, shuffle_files, seed
      return tf.data.Dataset.from_tensors({"targets": tf.constant([i + 3])}).repeat(50)
    task_builders.add_task(
        name, source=seqio.FunctionDataSource(dataset_fn, splits=["train"],
                                              num_input_examples={"train": n}),
        preprocessors=[], output_features={"targets": seqio.Feature(vocab)},
        metric_fns=[])


def test_measured_frequencies_follow_the_formula(exponent=0.3):
  """mT5's exponent: p_i = n_i^0.3 / sum_j n_j^0.3, measured over 5000 draws."""
  _register_tasks()
  mixture = task_builders.add_mixture(f"mixtest_{exponent}", list(SIZES),
                                      default_rate=mixing.exponent_rate(exponent))
  ds = mixture.get_dataset({"targets": 4}, split="train", shuffle=False,
                           num_epochs=None, seed=0)
  draws = 5000
  counts = collections.Counter(
      int(ex["targets"][0]) for ex in ds.take(draws).as_numpy_iterator())
  expected = mixing.temperature_probabilities(SIZES, 1 / exponent)
  for i, name in enumerate(SIZES):
    measured = counts[i + 3] / draws
    sigma = np.sqrt(expected[name] * (1 - expected[name]) / draws)
    assert abs(measured - expected[name]) < 4 * sigma + 1e-3, (name, measured)

"""Tests for tasks/mc4.py with TFDS mocked (offline)."""

from unittest import mock

import pytest
import seqio
import tensorflow_datasets as tfds

import tasks.mc4 as mc4

# Made-up per-language sizes (split name = language code in c4/multilingual).
SIZES = {"en": 3_000_000, "de": 400_000, "sw": 5_000, "cs": 80_000}


@pytest.fixture(name="sizes")
def _sizes():
  # seqio's rate function asks each Task for its train size.
  with mock.patch.object(seqio.Task, "num_input_examples",
                         lambda self, split: SIZES[self.name.split("_")[1]]):
    yield SIZES


def test_mixture_rates_follow_mt5_exponent(sizes):
  mixture = mc4.register_mixture("mc4_test_mix", list(sizes))
  total = sum(mixture.get_rate(t) for t in mixture.tasks)
  expected_total = sum(n ** 0.3 for n in sizes.values())
  for lang, n in sizes.items():
    task = seqio.get_mixture_or_task(mc4.task_name(lang))
    assert mixture.get_rate(task) / total == pytest.approx(n ** 0.3 / expected_total)
  # Low-resource languages are up-sampled relative to their share of data.
  share = sizes["sw"] / sum(sizes.values())
  assert mixture.get_rate(seqio.get_mixture_or_task("mc4_sw_span_corruption")) / total > 5 * share


def test_default_mixture_and_per_language_tasks_registered():
  names = set(seqio.TaskRegistry.names())
  assert all(mc4.task_name(lang) in names for lang in mc4.LANGUAGES)
  assert len(seqio.get_mixture_or_task("mc4_span_corruption").tasks) == len(mc4.LANGUAGES)
  with pytest.raises(ValueError, match="at least one language"):
    mc4.register_mixture("mc4_empty", [])


def test_language_task_reads_its_split_and_corrupts_spans():
  with tfds.testing.mock_data(num_examples=6), mock.patch.object(
      seqio.TfdsDataSource, "num_input_examples", lambda self, split: 6):
    task = seqio.get_mixture_or_task("mc4_de_span_corruption")
    loader = task.source.tfds_dataset
    assert loader.name == mc4.TFDS_NAME
    assert loader._split_map == {"train": "de", "validation": "de-validation"}  # pylint: disable=protected-access
    vocab = task.output_features["targets"].vocabulary
    ex = next(task.get_dataset({"inputs": 48, "targets": 12}, split="validation",
                               shuffle=False).as_numpy_iterator())
  top = vocab.vocab_size - 1
  assert ex["targets"][0] == top and top in ex["inputs"]
  assert ex["inputs"][-1] == ex["targets"][-1] == vocab.eos_id
  assert len(ex["inputs"]) <= 48 and len(ex["targets"]) <= 12

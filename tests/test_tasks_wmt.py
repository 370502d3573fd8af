"""Tests for tasks/wmt.py with TFDS mocked (offline)."""

from unittest import mock

import pytest
import seqio
import tensorflow_datasets as tfds

import tasks.wmt as wmt


def test_translation_pairs_follow_t5_format_and_stay_aligned():
  with tfds.testing.mock_data(num_examples=5), mock.patch.object(
      seqio.TfdsDataSource, "num_input_examples", lambda self, split: 5):
    task = seqio.get_mixture_or_task("wmt14_enfr_v003")
    got = list(task.get_dataset({"inputs": 256, "targets": 256}, split="validation",
                                shuffle=False).as_numpy_iterator())
    raw = list(tfds.load("wmt14_translate/fr-en:1.0.0", split="validation")
               .as_numpy_iterator())
  assert len(got) == len(raw) == 5
  vocab = task.output_features["targets"].vocabulary
  for ex, ref in zip(got, raw):
    assert ex["inputs_pretokenized"].decode() == (
        "translate English to French: " + ref["en"].decode())
    assert ex["targets_pretokenized"] == ref["fr"]
    assert ex["targets"].tolist() == vocab.encode(ref["fr"].decode()) + [vocab.eos_id]


def test_t5_names_and_temperature_mixture():
  sizes = {name: 1000 * (i + 1) ** 3 for i, name in enumerate(wmt.TASKS)}
  mixture = seqio.get_mixture_or_task("wmt_translate_mix")
  assert {t.name for t in mixture.tasks} == set(wmt.TASKS)
  assert {"wmt_t2t_ende_v003", "wmt14_enfr_v003", "wmt16_enro_v003"} <= set(wmt.TASKS)
  by_task = {}
  for t in mixture.tasks:
    with mock.patch.object(type(t.source), "num_input_examples",
                           lambda self, split, n=sizes[t.name]: n):
      by_task[t.name] = mixture.get_rate(t)
  total = sum(by_task.values())
  norm = sum(n ** (1 / wmt.MIXTURE_TEMPERATURE) for n in sizes.values())
  for name, n in sizes.items():
    assert by_task[name] / total == pytest.approx(n ** (1 / wmt.MIXTURE_TEMPERATURE) / norm)

"""Tests for tasks/c4.py with TFDS mocked (offline)."""

from unittest import mock

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

import tasks.c4  # noqa: F401

NUM_MOCK = 8


@pytest.fixture(name="mocked_tfds")
def _mocked_tfds():
  # mock_data has no split metadata; seqio asks for sizes to decide caching.
  with tfds.testing.mock_data(num_examples=NUM_MOCK), mock.patch.object(
      seqio.TfdsDataSource, "num_input_examples", lambda self, split: NUM_MOCK):
    yield


def _token_stream(vocab, tfds_name):
  """All mock documents tokenized and concatenated (what C4 tasks consume)."""
  docs = tfds.load(tfds_name, split="train")
  return [t for d in docs.as_numpy_iterator() for t in vocab.encode(d["text"].decode())]


def _fill_sentinels(inputs, targets, first_sentinel):
  """Undo span corruption: replace each input sentinel by its target span."""
  def spans(seq):
    out, current = {}, None
    for t in seq:
      if t > first_sentinel - 100:
        current = t
        out[current] = []
      elif current is not None:
        out[current].append(t)
    return out
  filled = spans(list(targets))
  result = []
  for t in inputs:
    result.extend(filled[t] if t > first_sentinel - 100 else [t])
  return result


def test_names_registered():
  names = set(seqio.TaskRegistry.names())
  for n in ("c4_v220_span_corruption", "c4_span_corruption", "c4_v220_prefix_lm",
            "c4_prefix_lm", "c4_v220_full_lm", "c4_causal_lm"):
    assert n in names


def test_span_corruption_shapes_and_reconstruction(mocked_tfds):
  del mocked_tfds
  task = seqio.get_mixture_or_task("c4_v220_span_corruption")
  vocab = task.output_features["targets"].vocabulary
  ds = task.get_dataset({"inputs": 64, "targets": 16}, split="train", shuffle=False)
  examples = list(ds.as_numpy_iterator())
  top = vocab.vocab_size - 1  # <extra_id_0> (seqio numbers extra ids downward)
  stream = _token_stream(vocab, "c4/en:2.2.0")
  ex = examples[0]
  assert len(ex["inputs"]) <= 64 and len(ex["targets"]) <= 16
  assert ex["inputs"][-1] == vocab.eos_id and ex["targets"][-1] == vocab.eos_id
  assert ex["targets"][0] == top  # targets open with the first sentinel
  sentinels = [t for t in ex["inputs"] if t > top - 100]
  assert sentinels == list(range(top, top - len(sentinels), -1))
  original = _fill_sentinels(ex["inputs"][:-1], ex["targets"][:-1], top)
  assert original == stream[:len(original)]


def test_prefix_lm_splits_a_text_into_inputs_and_targets(mocked_tfds):
  del mocked_tfds
  task = seqio.get_mixture_or_task("c4_prefix_lm")
  vocab = task.output_features["targets"].vocabulary
  ex = next(task.get_dataset({"inputs": 32, "targets": 32}, split="train",
                             shuffle=False).as_numpy_iterator())
  stream = _token_stream(vocab, "c4/en:3.1.0")
  joined = list(ex["inputs"][:-1]) + list(ex["targets"][:-1])
  assert joined == stream[:len(joined)]
  assert len(ex["inputs"]) > 1 and len(ex["targets"]) > 1


def test_causal_lm_is_target_only_for_decoders(mocked_tfds):
  del mocked_tfds
  task = seqio.get_mixture_or_task("c4_causal_lm")
  assert set(task.output_features) == {"targets"}
  examples = list(task.get_dataset({"targets": 16}, split="train",
                                   shuffle=False).as_numpy_iterator())
  assert all(set(ex) == {"targets"} and len(ex["targets"]) <= 16 for ex in examples)
  assert len(examples) >= NUM_MOCK
  assert np.concatenate([ex["targets"] for ex in examples]).size > 16 * NUM_MOCK // 2


def test_causal_lm_through_the_decoder_only_pipeline(mocked_tfds):
  del mocked_tfds
  from moe_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  ds = pipeline.build_dataset("c4_causal_lm", {"targets": 16}, 2, seed=0,
                              model_type="decoder", pack=True, shuffle=False)
  batch = next(ds.as_numpy_iterator())
  assert set(batch) == {"decoder_target_tokens", "decoder_input_tokens",
                        "decoder_loss_weights", "decoder_segment_ids",
                        "decoder_positions"}
  assert batch["decoder_target_tokens"].shape == (2, 16)
  # Plain LM: the loss covers every real token.
  np.testing.assert_array_equal(batch["decoder_loss_weights"] > 0,
                                batch["decoder_target_tokens"] > 0)

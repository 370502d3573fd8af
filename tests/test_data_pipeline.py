"""Tests for moe_jax.data.pipeline on the embedded synthetic tasks."""

import collections
import json

import jax
import numpy as np
import pytest
import seqio

import tasks.synthetic  # noqa: F401  (registers the tasks)
from moe_jax.data import pipeline, train_iterator
from moe_jax.data import synthetic_languages as sl

TASK = "synthetic_translate_xa_xb"
MIX = "synthetic_translate_mix"
LENGTHS = {"inputs": 16, "targets": 16}


def _rows(ds, key="decoder_target_tokens"):
  return [tuple(ex[key].tolist()) for ex in ds.as_numpy_iterator()]


def test_two_shards_cover_exactly_one_unsharded_pass():
  # Shuffled: the seeded source shuffle happens before sharding, so the two
  # shards still partition the data.
  kwargs = dict(per_host_batch_size=None, seed=7, pack=False, split="validation",
                shuffle=True, num_epochs=1)
  whole = _rows(pipeline.build_dataset(TASK, LENGTHS, shard_index=0,
                                       num_shards=1, **kwargs))
  shards = [_rows(pipeline.build_dataset(TASK, LENGTHS, shard_index=i,
                                         num_shards=2, **kwargs)) for i in (0, 1)]
  assert len(whole) == sl.SPLIT_SIZES["validation"]
  assert len(shards[0]) + len(shards[1]) == len(whole)
  assert collections.Counter(shards[0] + shards[1]) == collections.Counter(whole)
  # The two shards really split the data (targets are unique per meaning).
  assert not set(shards[0]) & set(shards[1])


def test_resume_from_saved_position_continues_identically(tmp_path):
  make = lambda: train_iterator.get_train_iterator(  # noqa: E731
      MIX, LENGTHS, batch_size=4, seed=3, shard_index=0, num_shards=1)
  first = make()
  for _ in range(5):
    next(first)
  first.save(str(tmp_path / "pos"))
  expected = [next(first) for _ in range(3)]
  resumed = make()
  resumed.restore(str(tmp_path / "pos"))
  got = [next(resumed) for _ in range(3)]
  for e, g in zip(expected, got):
    assert e.keys() == g.keys()
    for k in e:
      np.testing.assert_array_equal(e[k], g[k])
  assert resumed.get_state()["batches_consumed"] == 8
  assert json.loads(json.dumps(resumed.get_state())) == resumed.get_state()


def test_other_seed_other_order_and_restore_rejects_other_config(tmp_path):
  # (Same seed -> same order is shown by the resume test above.)
  it_1 = train_iterator.get_train_iterator(TASK, LENGTHS, 4, seed=1, shard_index=0,
                                           num_shards=1)
  it_2 = train_iterator.get_train_iterator(TASK, LENGTHS, 4, seed=2, shard_index=0,
                                           num_shards=1)
  a, c = next(it_1), next(it_2)
  assert not np.array_equal(a["encoder_input_tokens"], c["encoder_input_tokens"])
  it_1.save(str(tmp_path / "pos"))
  with pytest.raises(ValueError, match="seed=1 but this pipeline has seed=2"):
    it_2.restore(str(tmp_path / "pos"))
  with pytest.raises(ValueError, match="Not a data iterator state"):
    it_2.set_state({"batches_consumed": 3})


def test_packed_rows_hold_whole_examples():
  batch = next(train_iterator.get_train_iterator(TASK, {"inputs": 32, "targets": 16}, 4,
                                           seed=0, shard_index=0, num_shards=1))
  tokens, segments = batch["decoder_target_tokens"], batch["decoder_segment_ids"]
  positions = batch["decoder_positions"]
  assert tokens.shape == (4, 16) and tokens.dtype == np.int32
  assert segments.max() >= 2  # several short sentences per row
  for row in range(4):
    for seg in set(segments[row].tolist()) - {0}:
      where = np.flatnonzero(segments[row] == seg)
      assert tokens[row, where[-1]] == 1  # each segment ends with EOS
      np.testing.assert_array_equal(positions[row, where], np.arange(len(where)))
  # Teacher forcing: inputs are targets shifted right within each segment.
  inp = batch["decoder_input_tokens"]
  starts = positions == 0
  np.testing.assert_array_equal(inp[~starts & (segments > 0)],
                                np.roll(tokens, 1, axis=1)[~starts & (segments > 0)])
  assert np.all(inp[starts & (segments > 0)] == 0)


def test_decoder_model_concatenates_inputs_and_targets():
  ds = pipeline.build_dataset(TASK, {"inputs": 24, "targets": 16}, None, seed=0,
                              pack=False, model_type="decoder",
                              split="validation", shuffle=False, num_epochs=1)
  ex = next(ds.as_numpy_iterator())
  vocab = seqio.get_mixture_or_task(TASK).output_features["targets"].vocabulary
  src, tgt = sl.parallel_corpus("xa", "xb", "validation")
  expected = (vocab.encode(sl.translation_prefix("xa", "xb") + src[0]) + [1]
              + vocab.encode(tgt[0]) + [1])
  n = len(expected)
  assert ex["decoder_target_tokens"].shape == (40,)
  assert ex["decoder_target_tokens"][:n].tolist() == expected
  n_inputs = len(vocab.encode(sl.translation_prefix("xa", "xb") + src[0])) + 1
  # Loss only on targets; causal attention flag marks the prefix.
  assert ex["decoder_loss_weights"][:n_inputs].sum() == 0
  assert ex["decoder_loss_weights"][n_inputs:n].sum() == n - n_inputs


def test_eval_datasets_pad_last_batch_and_keep_order():
  evals = pipeline.get_eval_datasets(TASK, LENGTHS, batch_size=64, shard_index=0,
                                     num_shards=1, max_examples=100)
  ev = evals[TASK]
  assert len(ev.examples) == 100
  batches = list(ev.batches())
  assert [n for _, n in batches] == [64, 36]
  last, n = batches[-1]
  assert last["decoder_target_tokens"].shape == (64, 16)
  assert not last["decoder_target_tokens"][n:].any()
  _, targets = sl.parallel_corpus("xa", "xb", "validation")
  assert [e["targets_pretokenized"].decode() for e in ev.examples] == list(targets[:100])


def test_data_report_counts_truncated_sequences():
  lengths = {"inputs": 12, "targets": 7}
  report = pipeline.data_report(TASK, lengths, split="validation")[TASK]
  vocab = seqio.get_mixture_or_task(TASK).output_features["targets"].vocabulary
  src, tgt = sl.parallel_corpus("xa", "xb", "validation")
  prefix = sl.translation_prefix("xa", "xb")
  assert report["examples"] == len(src)
  assert report["truncated_inputs"] == sum(
      len(vocab.encode(prefix + s)) + 1 > 12 for s in src)
  assert report["truncated_targets"] == sum(len(vocab.encode(t)) + 1 > 7 for t in tgt)
  assert 0 < report["truncated_targets"] < len(tgt)


def test_bad_arguments_explain_the_fix():
  with pytest.raises(ValueError, match="not divisible by the 2 data shards"):
    train_iterator.get_train_iterator(MIX, LENGTHS, batch_size=5, shard_index=0,
                                num_shards=2)
  with pytest.raises(ValueError, match="MIXTURE_OR_TASK_MODULE"):
    train_iterator.get_train_iterator("no_such_task", LENGTHS, batch_size=4)
  with pytest.raises(ValueError, match="model_type"):
    pipeline.make_feature_converter("encoder_only")


def test_default_shard_is_this_process():
  it = train_iterator.get_train_iterator(MIX, LENGTHS, batch_size=4)  # builds lazily
  assert (it.config["shard_index"], it.config["num_shards"]) == (
      jax.process_index(), jax.process_count())
  assert it.config["per_host_batch_size"] == 4 // jax.process_count()

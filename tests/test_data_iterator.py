"""The training iterator's checkpointed position (tf.data iterator state).

Two tiny tasks of 12 distinct examples each (so an epoch is a few batches)
in a mixture, packed: the restored iterator must continue with exactly the
batches the uninterrupted one gives, across epoch boundaries, for every
shard, without replaying.
"""

import os

import numpy as np
import pytest
import seqio
import tensorflow as tf

from moe_jax.data import iterator as iterator_lib
from moe_jax.data import task_builders

N = 12
MIX = "itertest_mix"
LENGTHS = {"inputs": 16, "targets": 16}


def _register():
  vocab = seqio.ByteVocabulary()
  for name in ("itertest_a", "itertest_b"):
    def dataset_fn(split, shuffle_files, seed=None, name=name):
      del split
      return task_builders.examples_dataset(
          {"inputs": [f"{name[-1]} in {i}" for i in range(N)],
           "targets": [f"{name[-1]} out {i}" for i in range(N)]}, shuffle_files, seed)
    task_builders.add_translation_task(name, dataset_fn, splits=["train"],
                                       vocabulary=vocab,
                                       num_input_examples={"train": N})
  task_builders.add_mixture(MIX, ["itertest_a", "itertest_b"], default_rate=1.0)


_register()


def _config(**changes):
  config = dict(mixture_or_task_name=MIX, task_feature_lengths=LENGTHS,
                per_host_batch_size=2, seed=5, shard_index=0, num_shards=1, pack=True,
                model_type="encdec", split="train", shuffle=True, num_epochs=None)
  config.update(changes)
  return config


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(expected, got):
  assert len(expected) == len(got)
  for e, g in zip(expected, got):
    assert e.keys() == g.keys()
    for k in e:
      np.testing.assert_array_equal(e[k], g[k])


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_index_shuffled_source_visits_every_example_once_per_pass():
  columns = {"x": [str(i) for i in range(N)]}
  ds = task_builders.examples_dataset(columns, shuffle=True, seed=3).repeat(3)
  seen = [int(ex["x"]) for ex in ds.as_numpy_iterator()]
  passes = [seen[i * N:(i + 1) * N] for i in range(3)]
  for p in passes:
    assert sorted(p) == list(range(N))            # a permutation of the corpus
  assert passes[0] != passes[1] != passes[2]      # reshuffled every pass
  again = [int(ex["x"]) for ex in task_builders.examples_dataset(
      columns, shuffle=True, seed=3).as_numpy_iterator()]
  assert again == passes[0]                       # a pure function of the seed
  other = [int(ex["x"]) for ex in task_builders.examples_dataset(
      columns, shuffle=True, seed=4).as_numpy_iterator()]
  assert other != passes[0]
  plain = [int(ex["x"]) for ex in task_builders.examples_dataset(
      columns, shuffle=False, seed=3).as_numpy_iterator()]
  assert plain == list(range(N))


def test_restore_continues_bitwise_across_epochs(tmp_path):
  straight = iterator_lib.DataIterator(_config())
  first = _take(straight, 9)   # 9 packed batches > one pass over the 24 examples
  assert sum(int(b["decoder_segment_ids"].max(axis=1).sum()) for b in first) > 2 * N
  straight.save(str(tmp_path / "at9"))
  expected = _take(straight, 8)
  for _ in range(2):           # restoring the same position twice
    resumed = iterator_lib.DataIterator(_config())
    resumed.restore(str(tmp_path / "at9"))
    assert resumed.batches_consumed == 9
    _assert_same(expected, _take(resumed, 8))
  assert resumed.get_state()["batches_consumed"] == 17


def test_fresh_iterator_position_and_state_size_do_not_grow(tmp_path):
  fresh = iterator_lib.DataIterator(_config())
  fresh.save(str(tmp_path / "fresh"))           # nothing read yet
  resumed = iterator_lib.DataIterator(_config())
  resumed.restore(str(tmp_path / "fresh"))
  _assert_same(_take(iterator_lib.DataIterator(_config()), 3), _take(resumed, 3))
  it = iterator_lib.DataIterator(_config())
  _take(it, 2)
  it.save(str(tmp_path / "early"))
  _take(it, 60)
  it.save(str(tmp_path / "late"))
  early, late = _dir_bytes(tmp_path / "early"), _dir_bytes(tmp_path / "late")
  assert late < 1.5 * early, (early, late)      # the position is not a replay log


def test_each_shard_restores_its_own_position(tmp_path):
  shards = [iterator_lib.DataIterator(_config(shard_index=i, num_shards=2))
            for i in range(2)]
  expected = []
  for i, it in enumerate(shards):
    _take(it, 4)
    it.save(str(tmp_path / f"shard{i}"))
    expected.append(_take(it, 3))
  assert not np.array_equal(expected[0][0]["encoder_input_tokens"],
                            expected[1][0]["encoder_input_tokens"])
  for i in range(2):
    resumed = iterator_lib.DataIterator(_config(shard_index=i, num_shards=2))
    resumed.restore(str(tmp_path / f"shard{i}"))
    _assert_same(expected[i], _take(resumed, 3))
  wrong = iterator_lib.DataIterator(_config(shard_index=0, num_shards=2))
  with pytest.raises(iterator_lib.DataSettingsError, match="shard_index=1"):
    wrong.restore(str(tmp_path / "shard1"))


@pytest.mark.parametrize("changes, named", [
    ({"per_host_batch_size": 4}, "per_host_batch_size"),
    ({"seed": 6}, "seed"),
    ({"task_feature_lengths": {"inputs": 16, "targets": 8}}, "task_feature_lengths"),
    ({"num_shards": 2}, "num_shards"),
])
def test_restore_refuses_a_differently_configured_pipeline(tmp_path, changes, named):
  it = iterator_lib.DataIterator(_config())
  _take(it, 2)
  it.save(str(tmp_path / "pos"))
  other = iterator_lib.DataIterator(_config(**changes))
  with pytest.raises(iterator_lib.DataSettingsError,
                     match=f"{named}=.*differently configured"):
    other.restore(str(tmp_path / "pos"))


def test_damaged_or_missing_position_is_a_data_state_error(tmp_path):
  it = iterator_lib.DataIterator(_config())
  _take(it, 3)
  it.save(str(tmp_path / "pos"))
  data_files = [f for f in os.listdir(tmp_path / "pos") if ".data-" in f]
  assert data_files
  with open(tmp_path / "pos" / data_files[0], "r+b") as f:
    f.truncate(10)
  with pytest.raises(iterator_lib.DataStateError, match="tf.data iterator checkpoint"):
    iterator_lib.DataIterator(_config()).restore(str(tmp_path / "pos"))
  with pytest.raises(iterator_lib.DataStateError, match="No data iterator state"):
    iterator_lib.DataIterator(_config()).restore(str(tmp_path / "nothing"))


def test_legacy_json_position_is_replayed(tmp_path):
  """Checkpoints of format /1 held only ``batches_consumed``."""
  straight = iterator_lib.DataIterator(_config())
  _take(straight, 5)
  expected = _take(straight, 3)
  legacy = dict(_config(), format=iterator_lib.LEGACY_STATE_FORMAT, batches_consumed=5)
  resumed = iterator_lib.DataIterator(_config(shard_index=0))
  resumed.set_state(legacy)
  _assert_same(expected, _take(resumed, 3))
  resumed.save(str(tmp_path / "migrated"))      # from now on, a restorable position
  again = iterator_lib.DataIterator(_config())
  again.restore(str(tmp_path / "migrated"))
  _assert_same(_take(resumed, 2), _take(again, 2))
  with pytest.raises(iterator_lib.DataSettingsError, match="seed"):
    iterator_lib.DataIterator(_config(seed=1)).set_state(legacy)
  with pytest.raises(iterator_lib.DataStateError, match="restore"):
    iterator_lib.DataIterator(_config()).set_state(resumed.get_state())


def test_tf_checkpoint_is_what_tf_wrote(tmp_path):
  """The position is a plain tf.train.Checkpoint of the iterator (readable by TF)."""
  it = iterator_lib.DataIterator(_config())
  _take(it, 2)
  it.save(str(tmp_path / "pos"))
  names = [n for n, _ in tf.train.list_variables(
      str(tmp_path / "pos" / iterator_lib.TF_CHECKPOINT))]
  assert any("ITERATOR_STATE" in n for n in names)
  assert iterator_lib.read_state(str(tmp_path / "pos"))["batches_consumed"] == 2

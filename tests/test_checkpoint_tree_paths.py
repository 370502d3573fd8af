"""Tests for moe_jax.checkpoints.tree_paths."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import partitioning
from moe_jax.checkpoints import manager as manager_lib
from moe_jax.checkpoints import restore as restore_lib
from moe_jax.checkpoints import tree_paths
from moe_jax.training.train_state import TrainState


def test_paths_of_dataclass_namedtuple_and_tuple():
  params = {"dense": {"kernel": jnp.ones((2, 3))}}
  tx = optax.adam(1e-3)
  state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                     rng=jnp.zeros(2, jnp.uint32), tx=tx)
  names = list(tree_paths.flatten_with_paths(state))
  # Hand-written: optax.adam is chain(scale_by_adam, scale_by_learning_rate)
  # -> a 2-tuple whose first entry is the ScaleByAdamState namedtuple.
  assert names == ["step", "params/dense/kernel", "opt_state/0/count",
                   "opt_state/0/mu/dense/kernel", "opt_state/0/nu/dense/kernel", "rng"]


def test_live_state_and_checkpoint_metadata_paths_agree(tmp_path):
  mesh = partitioning.make_mesh({"data": 2, "expert": 4})
  params = {"moe": {"wi": jax.device_put(np.zeros((4, 2), np.float32),
                                         NamedSharding(mesh, P("expert")))}}
  tx = optax.adam(1e-3)
  state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                     rng=jnp.zeros(2, jnp.uint32), tx=tx)
  with manager_lib.CheckpointManager(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(0, state, {})
  stored = restore_lib.stored_metadata(str(tmp_path / "0" / "state"))
  live = tree_paths.flatten_with_paths(state)
  assert set(stored) == set(live)
  for name, leaf in live.items():
    assert tuple(stored[name].shape) == tuple(leaf.shape), name


def test_prng_keys_round_trip_concrete_and_abstract():
  key = jax.random.key(42)
  keys = jax.random.split(jax.random.key(1, impl="rbg"), 3)
  tree = {"a": key, "b": keys, "c": jnp.arange(3)}
  encoded, impls = tree_paths.encode_prng_keys(tree)
  assert encoded["a"].dtype == jnp.uint32 and encoded["a"].shape == (2,)
  assert encoded["b"].shape == (3, 4)  # rbg keys hold 4 uint32 words
  np.testing.assert_array_equal(encoded["c"], np.arange(3))
  decoded = tree_paths.decode_prng_keys(encoded, impls)
  np.testing.assert_array_equal(jax.random.key_data(decoded["a"]),
                                jax.random.key_data(key))
  assert str(jax.random.key_impl(decoded["b"])) == str(jax.random.key_impl(keys))
  # Same random numbers from the decoded key.
  np.testing.assert_array_equal(jax.random.uniform(decoded["a"], (4,)),
                                jax.random.uniform(key, (4,)))

  abstract = jax.eval_shape(lambda: tree)
  enc_abstract, _ = tree_paths.encode_prng_keys(abstract)
  assert enc_abstract["b"].shape == (3, 4) and enc_abstract["b"].dtype == jnp.uint32


def test_duplicate_paths_are_refused():
  with pytest.raises(ValueError, match="share the path"):
    tree_paths.flatten_with_paths({"a/b": 1, "a": {"b": 2}})

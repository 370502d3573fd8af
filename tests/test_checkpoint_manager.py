"""Tests for moe_jax.checkpoints.manager (save / keep / restore / no pickles)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import partitioning
from moe_jax.checkpoints import manager as manager_lib
from moe_jax.checkpoints import restore as restore_lib
from moe_jax.training.train_state import TrainState


def _reference_params(seed=0):
  """NumPy params of a tiny MoE: 4 experts, embed 8, mlp 16, vocab 32."""
  rng = np.random.default_rng(seed)
  return {
      "encoder": {"moe": {"wi": rng.standard_normal((4, 8, 16)).astype(np.float32),
                          "wo": rng.standard_normal((4, 16, 8)).astype(np.float32)}},
      "token_embedder": {"embedding": rng.standard_normal((32, 8)).astype(np.float32)},
  }


def _param_specs():
  return {"encoder": {"moe": {"wi": P("expert", "data"), "wo": P("expert")}},
          "token_embedder": {"embedding": P(("data", "expert"))}}


def _place(mesh, ref):
  return jax.tree_util.tree_map(
      lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), ref, _param_specs())


def _toy_state(mesh, seed=0, step=3):
  """A TrainState with sharded params, adam state after one update, typed key."""
  tx = optax.adam(1e-2)
  params = _place(mesh, _reference_params(seed))
  opt_state = tx.init(params)
  grads = jax.tree_util.tree_map(lambda p: 0.5 * p, params)
  _, opt_state = tx.update(grads, opt_state, params)
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                    opt_state=opt_state, rng=jax.random.key(seed + 11), tx=tx)


def _abstract(state):
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _host(tree):
  def to_np(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)
  return jax.tree_util.tree_map(to_np, tree)


@pytest.fixture(scope="module")
def mesh():
  return partitioning.make_mesh({"data": 2, "expert": 4})


def test_round_trip_restores_every_leaf_and_data_state(tmp_path, mesh):
  state = _toy_state(mesh)
  # Independent reference: the adam moments after one update from zero are
  # mu = (1 - b1) * g and nu = (1 - b2) * g**2 with g = 0.5 * params.
  ref = _reference_params()
  expected_mu = jax.tree_util.tree_map(lambda p: 0.1 * 0.5 * p, ref)
  expected_nu = jax.tree_util.tree_map(lambda p: 0.001 * (0.5 * p) ** 2, ref)
  with manager_lib.CheckpointManager(tmp_path, save_interval_steps=1) as ckpt:
    assert ckpt.restore_or_none(_abstract(state)) is None
    assert ckpt.save(3, state, {"epoch": 1, "position": 96, "shard": "a"})
    ckpt.wait_until_finished()
  with manager_lib.CheckpointManager(tmp_path, save_interval_steps=1) as ckpt:
    assert ckpt.latest_step() == 3
    restored, data_state = ckpt.restore_or_none(_abstract(state))
  assert data_state == {"epoch": 1, "position": 96, "shard": "a"}
  assert isinstance(restored, TrainState) and restored.tx is state.tx
  assert int(restored.step) == 3
  assert jnp.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(restored.rng),
                                jax.random.key_data(jax.random.key(11)))
  for got, want in zip(jax.tree_util.tree_leaves(_host(restored.params)),
                       jax.tree_util.tree_leaves(ref)):
    np.testing.assert_array_equal(got, want)
  adam = restored.opt_state[0]
  for got, want in zip(jax.tree_util.tree_leaves(_host(adam.mu)),
                       jax.tree_util.tree_leaves(expected_mu)):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  for got, want in zip(jax.tree_util.tree_leaves(_host(adam.nu)),
                       jax.tree_util.tree_leaves(expected_nu)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
  wi = restored.params["encoder"]["moe"]["wi"]
  assert wi.sharding.spec == P("expert", "data")
  for shard in wi.addressable_shards:
    np.testing.assert_array_equal(shard.data, ref["encoder"]["moe"]["wi"][shard.index])


def test_interval_keep_last_k_and_best(tmp_path, mesh):
  state = _toy_state(mesh)
  losses = {2: 5.0, 4: 1.0, 6: 3.0, 8: 4.0, 10: 6.0}
  with manager_lib.CheckpointManager(tmp_path, save_interval_steps=2, max_to_keep=2,
                                     keep_best_metric="loss", best_mode="min",
                                     async_save=False) as ckpt:
    saved = [s for s in range(1, 11)
             if ckpt.save(s, state, {"pos": s},
                          metrics={"loss": losses.get(s, 9.0)})]
    assert saved == [2, 4, 6, 8, 10]
    # Off-interval, forced (preemption): saved.
    assert ckpt.save(11, state, {"pos": 11}, metrics={"loss": 7.0}, force=True)
    # The same step again is not re-saved.
    assert not ckpt.save(11, state, {"pos": 11}, metrics={"loss": 7.0}, force=True)
    ckpt.wait_until_finished()
    # Last two (10, 11) plus the lowest loss (4).
    assert ckpt.all_steps() == [4, 10, 11]
    assert ckpt.best_step() == 4
  assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [4, 10, 11]


def test_save_rejects_bad_data_state_and_metrics(tmp_path, mesh):
  state = _toy_state(mesh)
  with manager_lib.CheckpointManager(tmp_path, save_interval_steps=1,
                                     keep_best_metric="bleu", best_mode="max") as ckpt:
    with pytest.raises(ValueError, match="JSON-serializable"):
      ckpt.save(1, state, {"pos": object()})
    with pytest.raises(ValueError, match="keep_best_metric 'bleu'"):
      ckpt.save(1, state, {}, metrics={"loss": 1.0})
    with pytest.raises(ValueError, match="Non-finite"):
      ckpt.save(1, state, {}, metrics={"bleu": float("nan")})
  with pytest.raises(ValueError, match="save_interval_steps"):
    manager_lib.CheckpointManager(tmp_path, save_interval_steps=0)


def test_resume_mismatch_names_parameter_and_both_shapes(tmp_path, mesh):
  state = _toy_state(mesh)
  with manager_lib.CheckpointManager(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(1, state, {})
    ckpt.wait_until_finished()
    # A model with 8 experts instead of 4, and a renamed embedding.
    abstract = _abstract(state)
    params = dict(abstract.params)
    replicated = NamedSharding(mesh, P())
    params["encoder"] = {"moe": {
        "wi": jax.ShapeDtypeStruct((8, 8, 16), jnp.float32, sharding=replicated),
        "wo": abstract.params["encoder"]["moe"]["wo"]}}
    params["token_embedder"] = {"embeddings": abstract.params["token_embedder"]["embedding"]}
    with pytest.raises(restore_lib.CheckpointMismatchError) as info:
      ckpt.restore_or_none(abstract.replace(params=params))
  message = str(info.value)
  assert "params/encoder/moe/wi" in message
  assert "(4, 8, 16)" in message and "(8, 8, 16)" in message
  assert "number of experts" in message
  assert "missing in checkpoint" in message and "token_embedder/embeddings" in message
  assert "not in the model" in message and "token_embedder/embedding " in message


_PICKLE_MARKERS = (b"numpy.core.multiarray", b"numpy._core.multiarray",
                   b"_reconstruct", b"copy_reg", b"copyreg")


def test_checkpoint_holds_no_pickles(tmp_path, mesh):
  state = _toy_state(mesh)
  with manager_lib.CheckpointManager(tmp_path, save_interval_steps=1,
                                     keep_best_metric="loss") as ckpt:
    ckpt.save(1, state, {"pos": 1}, metrics={"loss": 0.5})
  files = [os.path.join(root, f) for root, _, names in os.walk(tmp_path)
           for f in names]
  assert files
  kinds = set()
  for path in files:
    assert not path.endswith((".pkl", ".pickle", ".npy", ".npz")), path
    with open(path, "rb") as f:
      data = f.read()
    # Pickle protocols 2-5 start with PROTO (0x80) and the version byte.
    assert not (len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5), path
    assert not any(m in data for m in _PICKLE_MARKERS), path
    try:
      json.loads(data)
      kinds.add("json")
    except (UnicodeDecodeError, json.JSONDecodeError):
      kinds.add("text" if path.endswith(".txt") else "binary")
  assert "json" in kinds
  # The binary files are all tensorstore OCDBT (manifest + data under d/).
  binaries = [p for p in files if not p.endswith(".txt")]
  for path in binaries:
    name = os.path.basename(path)
    with open(path, "rb") as f:
      data = f.read()
    try:
      json.loads(data)
      continue
    except (UnicodeDecodeError, json.JSONDecodeError):
      pass
    assert ("ocdbt" in path or os.path.basename(os.path.dirname(path)) == "d"
            or name == "manifest.ocdbt"), path


def test_async_save_survives_donation_of_the_saved_buffers(tmp_path, mesh):
  ref = _reference_params(seed=4)
  params = _place(mesh, ref)
  step = jax.jit(lambda p: jax.tree_util.tree_map(lambda x: x * 0.0 - 1.0, p),
                 donate_argnums=0)
  with manager_lib.CheckpointManager(tmp_path, save_interval_steps=1) as ckpt:
    assert ckpt.save(1, {"params": params}, {})
    # The train loop's next step reuses (donates) the buffers just saved.
    params = jax.block_until_ready(step(params))
    ckpt.wait_until_finished()
    abstract = {"params": jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)}
    restored, _ = ckpt.restore_or_none(abstract)
  for got, want in zip(jax.tree_util.tree_leaves(_host(restored)),
                       jax.tree_util.tree_leaves(ref)):
    np.testing.assert_array_equal(got, want)

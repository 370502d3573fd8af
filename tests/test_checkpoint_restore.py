"""Tests for moe_jax.checkpoints.restore (params-only restore, name maps, errors)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import partitioning
from moe_jax.checkpoints import manager as manager_lib
from moe_jax.checkpoints import restore as restore_lib


def _reference_params():
  rng = np.random.default_rng(7)
  return {
      "encoder": {
          "layers_0": {"moe": {"wi": rng.standard_normal((4, 8, 16)).astype(np.float32)},
                       "attention": {"query": rng.standard_normal((8, 8)).astype(np.float32)}},
      },
      "decoder": {"block_0": {"mlp": {"wi": rng.standard_normal((8, 16)).astype(np.float32)}},
                  "logits": rng.standard_normal((8, 32)).astype(np.float32)},
      "token_embedder": {"embedding": rng.standard_normal((32, 8)).astype(np.float32)},
      "counter": np.arange(3, dtype=np.int32),
  }


@pytest.fixture(scope="module")
def mesh():
  return partitioning.make_mesh({"data": 2, "expert": 4})


@pytest.fixture(scope="module")
def saved(tmp_path_factory, mesh):
  """A model directory with one step holding {'params': ref, 'step': 5}."""
  directory = tmp_path_factory.mktemp("ckpt")
  ref = _reference_params()
  params = jax.tree_util.tree_map(
      lambda x: jax.device_put(x, NamedSharding(mesh, P())), ref)
  params["encoder"]["layers_0"]["moe"]["wi"] = jax.device_put(
      ref["encoder"]["layers_0"]["moe"]["wi"], NamedSharding(mesh, P("expert")))
  with manager_lib.CheckpointManager(directory, save_interval_steps=1) as ckpt:
    ckpt.save(5, {"params": params, "step": jnp.int32(5)}, {"pos": 5})
  return directory, ref


def _abstract(shapes_dtypes, sharding):
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes_dtypes)


def test_map_name_exact_prefix_and_longest_match():
  name_map = {"decoder/layers_0": "decoder/block_0",
              "decoder/layers_0/mlp/wo": "decoder/block_0/mlp/wo_old",
              "decoder/new_head": None}
  assert restore_lib.map_name("decoder/layers_0/mlp/wi", name_map) == "decoder/block_0/mlp/wi"
  assert restore_lib.map_name("decoder/layers_0/mlp/wo", name_map) == "decoder/block_0/mlp/wo_old"
  assert restore_lib.map_name("decoder/layers_00/x", name_map) == "decoder/layers_00/x"
  assert restore_lib.map_name("decoder/new_head/kernel", name_map) is None
  assert restore_lib.map_name("encoder/x", None) == "encoder/x"


def test_restore_subset_with_rename_and_dtype_cast(saved, mesh):
  directory, ref = saved
  sharded = NamedSharding(mesh, P("expert"))
  replicated = NamedSharding(mesh, P())
  # The new model: renamed decoder block, no logits layer (a subset), bf16.
  abstract = {
      "encoder": {"layers_0": {"moe": {"wi": jax.ShapeDtypeStruct((4, 8, 16), jnp.float32,
                                                                  sharding=sharded)},
                               "attention": {"query": jax.ShapeDtypeStruct(
                                   (8, 8), jnp.float32, sharding=replicated)}}},
      "decoder": {"layers_0": {"mlp": {"wi": jax.ShapeDtypeStruct((8, 16), jnp.float32,
                                                                  sharding=replicated)}}},
      "token_embedder": {"embedding": jax.ShapeDtypeStruct((32, 8), jnp.float32,
                                                           sharding=replicated)},
      "counter": jax.ShapeDtypeStruct((3,), jnp.int32, sharding=replicated),
  }
  got = restore_lib.restore_params(directory, abstract,
                                   name_map={"decoder/layers_0": "decoder/block_0"},
                                   dtype=jnp.bfloat16)
  wi = got["encoder"]["layers_0"]["moe"]["wi"]
  assert wi.dtype == jnp.bfloat16 and wi.sharding.spec == P("expert")
  np.testing.assert_array_equal(
      np.asarray(wi), ref["encoder"]["layers_0"]["moe"]["wi"].astype(ml_dtypes.bfloat16))
  np.testing.assert_array_equal(
      np.asarray(got["decoder"]["layers_0"]["mlp"]["wi"]),
      ref["decoder"]["block_0"]["mlp"]["wi"].astype(ml_dtypes.bfloat16))
  assert got["counter"].dtype == jnp.int32  # integers are never cast
  np.testing.assert_array_equal(np.asarray(got["counter"]), ref["counter"])
  assert "logits" not in got["decoder"]


def test_restore_from_step_and_item_directories(saved, mesh):
  directory, ref = saved
  replicated = NamedSharding(mesh, P())
  abstract = {"token_embedder": {"embedding": jax.ShapeDtypeStruct(
      (32, 8), jnp.float32, sharding=replicated)}}
  for path in (directory / "5", directory / "5" / "state"):
    got = restore_lib.restore_params(str(path), abstract)
    np.testing.assert_array_equal(np.asarray(got["token_embedder"]["embedding"]),
                                  ref["token_embedder"]["embedding"])


def test_one_checkpoint_leaf_feeding_two_parameters(saved, mesh):
  directory, ref = saved
  abstract = {
      "a": jax.ShapeDtypeStruct((32, 8), jnp.float32, sharding=NamedSharding(mesh, P())),
      "b": jax.ShapeDtypeStruct((32, 8), jnp.float32,
                                sharding=NamedSharding(mesh, P(("data", "expert")))),
  }
  got = restore_lib.restore_params(directory, abstract, name_map={
      "a": "token_embedder/embedding", "b": "token_embedder/embedding"})
  assert got["b"].sharding.spec == P(("data", "expert"))
  for leaf in (got["a"], got["b"]):
    np.testing.assert_array_equal(np.asarray(leaf), ref["token_embedder"]["embedding"])


def test_declared_fresh_parameter_comes_from_init_params(saved, mesh):
  directory, ref = saved
  replicated = NamedSharding(mesh, P())
  abstract = {"token_embedder": {"embedding": jax.ShapeDtypeStruct((32, 8), jnp.float32,
                                                                   sharding=replicated)},
              "new_head": {"kernel": jax.ShapeDtypeStruct((8, 4), jnp.float32,
                                                          sharding=replicated)}}
  with pytest.raises(ValueError, match="pass init_params"):
    restore_lib.restore_params(directory, abstract, name_map={"new_head": None})
  init = {"token_embedder": {"embedding": jnp.zeros((32, 8))},
          "new_head": {"kernel": jnp.full((8, 4), 3.0)}}
  got = restore_lib.restore_params(directory, abstract, name_map={"new_head": None},
                                   init_params=init)
  np.testing.assert_array_equal(np.asarray(got["new_head"]["kernel"]), np.full((8, 4), 3.0))
  np.testing.assert_array_equal(np.asarray(got["token_embedder"]["embedding"]),
                                ref["token_embedder"]["embedding"])


def test_missing_parameter_is_an_error_not_a_silent_init(saved, mesh):
  directory, _ = saved
  replicated = NamedSharding(mesh, P())
  abstract = {"new_head": {"kernel": jax.ShapeDtypeStruct((8, 4), jnp.float32,
                                                          sharding=replicated)}}
  with pytest.raises(restore_lib.CheckpointMismatchError,
                     match=r"missing in checkpoint: new_head/kernel with model shape \(8, 4\)"):
    restore_lib.restore_params(directory, abstract)


def test_different_number_of_experts_names_parameter_and_shapes(saved, mesh):
  directory, _ = saved
  replicated = NamedSharding(mesh, P())
  abstract = {"encoder": {"layers_0": {"moe": {"wi": jax.ShapeDtypeStruct(
      (8, 8, 16), jnp.float32, sharding=replicated)}}}}
  with pytest.raises(restore_lib.CheckpointMismatchError) as info:
    restore_lib.restore_params(directory, abstract)
  message = str(info.value)
  assert "encoder/layers_0/moe/wi" in message
  assert "checkpoint shape (4, 8, 16) != model shape (8, 8, 16)" in message
  assert "number of experts" in message


def test_renamed_shape_mismatch_names_both_names(saved, mesh):
  directory, _ = saved
  abstract = {"decoder": {"layers_0": {"mlp": {"wi": jax.ShapeDtypeStruct(
      (8, 12), jnp.float32, sharding=NamedSharding(mesh, P()))}}}}
  with pytest.raises(restore_lib.CheckpointMismatchError,
                     match=r"decoder/layers_0/mlp/wi \(from checkpoint "
                           r"'decoder/block_0/mlp/wi'\): checkpoint shape \(8, 16\) "
                           r"!= model shape \(8, 12\)"):
    restore_lib.restore_params(directory, abstract,
                               name_map={"decoder/layers_0": "decoder/block_0"})


def test_bad_paths_and_keys_say_how_to_fix(saved, mesh, tmp_path):
  directory, _ = saved
  abstract = {"x": jax.ShapeDtypeStruct((2,), jnp.float32,
                                        sharding=NamedSharding(mesh, P()))}
  with pytest.raises(FileNotFoundError, match="No Orbax checkpoint"):
    restore_lib.restore_params(str(tmp_path), abstract)
  with pytest.raises(ValueError, match="match no model parameter"):
    restore_lib.restore_params(directory, abstract, name_map={"y": "x"})
  with pytest.raises(restore_lib.CheckpointMismatchError, match="no 'weights' subtree"):
    restore_lib.restore_params(directory, abstract, params_key="weights")

"""Mesh construction and logical-axis rules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moe_jax import partitioning


def test_mesh_shapes_and_auto_axes():
  mesh = partitioning.make_mesh({"data": 2, "expert": 4})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "model": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  mesh = partitioning.make_mesh({"expert": 2, "data": -1})
  assert dict(mesh.shape)["data"] == 4


@pytest.mark.parametrize("sizes,match", [
    ({"data": 3, "expert": 2}, "multiply to 6 but there are 8 devices"),
    ({"dta": 8}, "Unknown mesh axis 'dta'"),
    ({"data": -1, "expert": -1}, "At most one"),
])
def test_mesh_errors_say_what_to_change(sizes, match):
  with pytest.raises(ValueError, match=match):
    partitioning.make_mesh(sizes)


def test_multislice_dcn_axis():
  mesh = partitioning.make_mesh({"expert": 4}, dcn_axis_sizes={"data": 2})
  assert dict(mesh.shape)["data"] == 2 and dict(mesh.shape)["expert"] == 4


def test_parse_mesh_spec():
  assert partitioning.parse_mesh_spec("data=2, expert=4") == {"data": 2, "expert": 4}
  with pytest.raises(ValueError, match="expert=4"):
    partitioning.parse_mesh_spec("data2")


def test_standard_rules():
  rules = partitioning.standard_logical_rules()
  spec = partitioning.logical_to_spec
  # Activations: batch over data+fsdp+expert; embed then cannot reuse fsdp.
  assert spec(("batch", "length", "embed"), rules) == P(("data", "fsdp", "expert"), None, None)
  # Expert weights: experts over 'expert', hidden over 'model', embed FSDP.
  assert spec(("expert", "embed", "mlp"), rules) == P("expert", "fsdp", "model")
  # After the all-to-all: groups on data+fsdp, experts on expert.
  assert spec(("expert_group", "expert", "length", "embed"), rules) == P(
      ("data", "fsdp"), "expert", None, None)
  no_fsdp = partitioning.standard_logical_rules(fsdp_params=False)
  assert spec(("embed", "mlp"), no_fsdp) == P(None, "model")


def test_params_shardings_follow_logical_axes():
  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param("w", nn.with_logical_partitioning(
          nn.initializers.ones, ("expert", "embed", "mlp")), (4, 8, 6))
      b = self.param("b", nn.initializers.zeros, (6,))
      return jnp.einsum("d,edf->ef", x, w) + b

  mesh = partitioning.make_mesh({"fsdp": 2, "expert": 4})
  rules = partitioning.standard_logical_rules()
  abstract = jax.eval_shape(Tiny().init, jax.random.key(0), jnp.ones(8))
  sh = partitioning.params_shardings(mesh, abstract, rules)
  assert sh["params"]["w"].spec == P("expert", "fsdp", "model")
  assert sh["params"]["b"].spec == P()


def test_partitioner_global_batch_is_batch_sharded_and_equal_to_input():
  partitioner = partitioning.Partitioner.create({"data": 2, "expert": 4})
  assert partitioner.num_batch_shards == 8
  rows = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)
  out = partitioner.global_batch({"decoder_target_tokens": rows,
                                  "decoder_route_ids": rows[:, 0]})  # any rank
  arr = out["decoder_target_tokens"]
  assert isinstance(arr, jax.Array) and arr.shape == (8, 5)
  np.testing.assert_array_equal(np.asarray(arr), rows)
  assert arr.sharding.spec[0] == ("data", "fsdp", "expert")
  for shard in arr.addressable_shards:
    assert shard.data.shape == (1, 5)  # one row per device (8 devices)
    np.testing.assert_array_equal(np.asarray(shard.data), rows[shard.index])
  np.testing.assert_array_equal(np.asarray(out["decoder_route_ids"]), rows[:, 0])
  with pytest.raises(ValueError, match="multiple of data\\*fsdp\\*expert"):
    partitioner.global_batch({"x": np.zeros((6, 5), np.int32)})


def test_partitioner_shardings_and_context():
  partitioner = partitioning.Partitioner.create({"data": 4, "fsdp": 2})
  assert partitioner.sharding(("embed", "mlp")).spec == P("fsdp", "model")
  assert partitioner.replicated.spec == P()
  with partitioner.activate():
    assert partitioning.current_mesh() is not None
  no_fsdp = partitioning.Partitioner.create({"data": 8}, fsdp_params=False)
  assert no_fsdp.sharding(("embed",)).spec == P(None)

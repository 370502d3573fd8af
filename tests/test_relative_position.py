"""Relative position buckets and bias against transformers' T5 and NumPy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.layers.relative_position import (RelativePositionBias,
                                              relative_position_bucket)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 20)])
def test_buckets_match_transformers(bidirectional, num_buckets, max_distance):
  torch = pytest.importorskip("torch")
  t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
  rel = np.arange(-300, 301)
  ours = np.asarray(relative_position_bucket(rel, bidirectional, num_buckets,
                                             max_distance))
  ref = t5.T5Attention._relative_position_bucket(
      torch.tensor(rel), bidirectional=bidirectional, num_buckets=num_buckets,
      max_distance=max_distance).numpy()
  np.testing.assert_array_equal(ours, ref)


def test_bucket_hand_worked_values():
  # Causal, 32 buckets, 128 max distance: 16 exact buckets, then log-spaced.
  rel = np.array([0, -1, -15, -16, -127, -1000, 5])
  out = np.asarray(relative_position_bucket(rel, False, 32, 128))
  # -16 -> 16 + floor(log(16/16)/log(128/16) * 16) = 16; far -> last bucket 31;
  # future keys (positive) never attended: bucket 0.
  np.testing.assert_array_equal(out, [0, 1, 15, 16, 31, 31, 0])


def test_bias_is_table_lookup_and_supports_packed_positions():
  module = RelativePositionBias(num_heads=3, bidirectional=True, num_buckets=8,
                                max_distance=16)
  positions = jnp.arange(5)
  params = module.init(jax.random.PRNGKey(0), positions)
  table = np.asarray(nn.unbox(params)["params"]["rel_embedding"])   # [heads, buckets]
  bias = np.asarray(module.apply(params, positions))
  assert bias.shape == (1, 3, 5, 5)
  rel = np.arange(5)[None, :] - np.arange(5)[:, None]
  buckets = np.asarray(relative_position_bucket(rel, True, 8, 16))
  np.testing.assert_allclose(bias[0], table[:, buckets], atol=1e-6)
  # Packed: a row holding segments of lengths 3 and 2 restarts its positions;
  # within each segment the bias equals the unpacked one.
  packed = jnp.array([[0, 1, 2, 0, 1]])
  pbias = np.asarray(module.apply(params, packed))
  assert pbias.shape == (1, 3, 5, 5)
  np.testing.assert_allclose(pbias[0, :, :3, :3], bias[0, :, :3, :3], atol=1e-6)
  np.testing.assert_allclose(pbias[0, :, 3:, 3:], bias[0, :, :2, :2], atol=1e-6)

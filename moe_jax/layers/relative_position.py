"""T5's bucketed relative position bias.

A relative distance ``key_position - query_position`` is mapped to one of
``num_buckets`` buckets: half the buckets (or all, for causal attention) hold
exact small distances, the rest log-spaced distances up to ``max_distance``
(everything further shares the last bucket). Each bucket has a learned scalar
per head. One module is shared by all layers of a stack.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool,
                             num_buckets: int = 32,
                             max_distance: int = 128) -> jax.Array:
  """Bucket ids ``<int32>[...]`` for ``relative_position = key - query``.

  Bidirectional: keys after the query use buckets ``[num_buckets/2, num_buckets)``.
  Causal: keys after the query (never attended) all land in bucket 0.
  """
  relative_position = jnp.asarray(relative_position, jnp.int32)
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = jnp.maximum(-relative_position, 0)
  max_exact = num_buckets // 2
  is_small = distance < max_exact
  # float32 throughout, as in the reference implementations, so bucket edges agree.
  safe = jnp.maximum(distance, 1).astype(jnp.float32)
  log_ratio = jnp.log(safe / max_exact) / np.float32(np.log(max_distance / max_exact))
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
  """Per-head attention bias from bucketed relative positions.

  ``__call__(query_positions, key_positions)``:
    positions ``<int>[length]`` (shared by the batch) or ``<int>[batch, length]``
    (packed sequences: each token's position within its own segment)
    -> bias ``<float>[1 or batch, heads, q_length, k_length]``.

  The table ``rel_embedding`` is ``<float>[heads, num_buckets]``.
  """
  num_heads: int
  bidirectional: bool
  num_buckets: int = 32
  max_distance: int = 128
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  embedding_init: Any = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")

  @nn.compact
  def __call__(self, query_positions: jax.Array,
               key_positions: Optional[jax.Array] = None) -> jax.Array:
    if key_positions is None:
      key_positions = query_positions
    q = jnp.asarray(query_positions, jnp.int32)
    k = jnp.asarray(key_positions, jnp.int32)
    if q.ndim == 1:
      q = q[None]
    if k.ndim == 1:
      k = k[None]
    relative = k[:, None, :] - q[:, :, None]          # [b, q, k]
    buckets = relative_position_bucket(relative, self.bidirectional,
                                       self.num_buckets, self.max_distance)
    table = self.param(
        "rel_embedding",
        nn.with_logical_partitioning(self.embedding_init, ("heads", "unmodeled")),
        (self.num_heads, self.num_buckets), self.param_dtype)
    table = jnp.asarray(table, self.dtype)
    # Gather via one-hot matmul: cheap at these sizes and sharding-friendly.
    one_hot = jax.nn.one_hot(buckets, self.num_buckets, dtype=self.dtype)
    return jnp.einsum("hn,bqkn->bhqk", table, one_hot)

"""Multi-head dot-product attention of T5 v1.1 with an optional KV cache.

No biases and no ``1/sqrt(d_kv)`` logit scaling: T5 folds that factor into the
query kernel's initializer (``query_init_scale``).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from moe_jax.layers import checkpoint_names
from moe_jax.layers.dense import DenseGeneral

# Large negative bias for masked logits (T5X's convention).
MASK_VALUE = -1e10


def make_attention_mask(query_valid: jax.Array, key_valid: jax.Array) -> jax.Array:
  """``<bool>[b, q]``, ``<bool>[b, k]`` -> ``<bool>[b, 1, q, k]``."""
  return (query_valid[:, :, None] & key_valid[:, None, :])[:, None]


def make_key_mask(key_valid: jax.Array) -> jax.Array:
  """Padding on the key side only: ``<bool>[b, k]`` -> ``<bool>[b, 1, 1, k]``."""
  return key_valid[:, None, None, :]


def make_causal_mask(query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
  """Key at position <= query position. ``[b|1, q]``, ``[b|1, k]`` -> ``<bool>[b|1, 1, q, k]``."""
  q = jnp.atleast_2d(query_positions)
  k = jnp.atleast_2d(key_positions)
  return (k[:, None, :] <= q[:, :, None])[:, None]


def make_segment_mask(query_segments: jax.Array, key_segments: jax.Array) -> jax.Array:
  """Packed sequences: attend within one segment only -> ``<bool>[b, 1, q, k]``."""
  return (query_segments[:, :, None] == key_segments[:, None, :])[:, None]


def mask_to_bias(mask: Optional[jax.Array], dtype=jnp.float32) -> Optional[jax.Array]:
  if mask is None:
    return None
  return jnp.where(mask, 0.0, MASK_VALUE).astype(dtype)


class MultiHeadAttention(nn.Module):
  """``(inputs_q <float>[b, q, embed], inputs_kv <float>[b, k, embed]) -> <float>[b, q, embed]``.

  ``bias`` (``<float>[b|1, heads|1, q, k]``) is added to the logits; it holds
  the relative position bias and the mask (``mask_to_bias``).

  Decoding (``decode=True``, self-attention only): the first call (e.g. from
  ``init``/an initial ``apply``) creates ``cache/cached_key`` and
  ``cache/cached_value`` of shape ``[b, max_length, heads, kv]`` sized by that
  call's inputs. Later calls write their ``q`` new keys/values at
  ``decode_position`` (prefill: many at 0; a step: one) and attend over the
  whole cache; the caller's bias must mask the not-yet-written slots.
  """
  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  query_init_scale: bool = True

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array,
               bias: Optional[jax.Array] = None, *, deterministic: bool = True,
               decode: bool = False,
               decode_position: Optional[jax.Array] = None) -> jax.Array:
    embed = inputs_q.shape[-1]
    base_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
    if self.query_init_scale:
      scale = self.head_dim ** -0.5
      query_init = lambda k, s, d: base_init(k, s, d) * scale  # noqa: E731
    else:
      query_init = base_init

    def proj(name, init):
      return DenseGeneral((self.num_heads, self.head_dim),
                          kernel_axes=("embed", "heads", "kv"), dtype=self.dtype,
                          param_dtype=self.param_dtype, kernel_init=init, name=name)

    qkv_axes = ("batch", "length", "heads", "kv")
    query = nn.with_logical_constraint(proj("query", query_init)(inputs_q), qkv_axes)
    key = nn.with_logical_constraint(proj("key", base_init)(inputs_kv), qkv_axes)
    value = nn.with_logical_constraint(proj("value", base_init)(inputs_kv), qkv_axes)

    if decode:
      initialized = self.has_variable("cache", "cached_key")
      cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape,
                                   value.dtype)
      if initialized:
        if decode_position is None:
          raise ValueError("decode=True with a filled cache needs decode_position.")
        start = (0, decode_position, 0, 0)
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, start)
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value,
                                                          start)
        key, value = cached_key.value, cached_value.value

    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key)
    if bias is not None:
      logits = logits + jnp.asarray(bias, logits.dtype)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    if not deterministic and self.dropout_rate > 0:
      weights = nn.Dropout(self.dropout_rate)(weights, deterministic=False)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    out = nn.with_logical_constraint(out, qkv_axes)
    out = checkpoint_name(out, checkpoint_names.ATTENTION_OUT)
    out = DenseGeneral(embed, axis=(-2, -1), kernel_axes=("heads", "kv", "embed"),
                       dtype=self.dtype, param_dtype=self.param_dtype,
                       kernel_init=base_init, name="out")(out)
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))

"""RMS layer norm (T5 v1.1: scale only, no bias, no mean subtraction)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
  """``y = x / sqrt(mean(x**2) + eps) * scale`` over the last axis.

  ``<float>[..., embed] -> <float>[..., embed]``. The variance is computed in
  float32 whatever ``dtype`` is (as T5 does) and the result cast to ``dtype``.
  """
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = jnp.asarray(x, jnp.float32)
    mean_square = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = jnp.asarray(x32 * jax.lax.rsqrt(mean_square + self.epsilon), self.dtype)
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        (x.shape[-1],), self.param_dtype)
    return y * jnp.asarray(scale, self.dtype)

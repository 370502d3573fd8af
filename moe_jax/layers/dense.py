"""Dense projections whose kernels carry logical axis names.

T5 v1.1 uses no biases anywhere, so these layers have none.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[..., jax.Array]

# T5X's default kernel initializer.
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def _as_tuple(x) -> tuple:
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


class DenseGeneral(nn.Module):
  """A bias-free linear map over the trailing ``len(axis)`` dims of the input.

  ``<float>[..., *in_features] -> <float>[..., *features]``; the kernel has
  shape ``[*in_features, *features]`` and logical names ``kernel_axes``.

  Attributes:
    features: output feature dims (int or tuple).
    axis: input axes to contract (negative ints, default the last one).
    kernel_axes: one logical axis name per kernel dimension.
    dtype: computation dtype; param_dtype: storage dtype.
    kernel_init: initializer; fan-in is the product of contracted dims.
  """
  features: Union[int, Sequence[int]]
  kernel_axes: Sequence[str]
  axis: Union[int, Sequence[int]] = -1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    features = _as_tuple(self.features)
    axis = tuple(a % inputs.ndim for a in _as_tuple(self.axis))
    in_shape = tuple(inputs.shape[a] for a in axis)
    kernel_shape = in_shape + features
    if len(self.kernel_axes) != len(kernel_shape):
      raise ValueError(
          f"{self.name}: kernel_axes {tuple(self.kernel_axes)} name "
          f"{len(self.kernel_axes)} dims but the kernel has shape {kernel_shape}; "
          "give one logical name per kernel dimension.")
    n_in = int(np.prod(in_shape))
    n_out = int(np.prod(features))

    def init(key, shape, dtype):
      # Initialise as a 2D [fan_in, fan_out] matrix so fan-in is right.
      flat = self.kernel_init(key, (n_in, n_out), dtype)
      return jnp.reshape(flat, shape)

    kernel = self.param(
        "kernel", nn.with_logical_partitioning(init, tuple(self.kernel_axes)),
        kernel_shape, self.param_dtype)
    kernel = jnp.asarray(kernel, self.dtype)
    inputs = jnp.asarray(inputs, self.dtype)
    contract = (axis, tuple(range(len(axis))))
    return jax.lax.dot_general(inputs, kernel, (contract, ((), ())))

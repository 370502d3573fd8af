"""Dense (gated) MLP block of T5 v1.1."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.layers.dense import DenseGeneral

_ACTIVATIONS = {
    "relu": nn.relu,
    # tanh approximation: what T5X's "gelu" and HF's "gelu_new" compute.
    "gelu": lambda x: nn.gelu(x, approximate=True),
    "gelu_exact": lambda x: nn.gelu(x, approximate=False),
    "silu": nn.silu,
    "swish": nn.silu,
    "linear": lambda x: x,
}


def get_activation(name: str):
  try:
    return _ACTIVATIONS[name]
  except KeyError:
    raise ValueError(
        f"Unknown activation {name!r}; use one of {sorted(_ACTIVATIONS)}.") from None


class MlpBlock(nn.Module):
  """``<float>[batch, length, embed] -> <float>[batch, length, embed]``.

  With two activations (e.g. ``("gelu", "linear")``) this is T5 v1.1's gated
  MLP: ``wo(act0(wi_0 x) * act1(wi_1 x))``; with one it is ``wo(act(wi x))``.
  Dropout is applied to the hidden layer (as T5X does).
  """
  d_ff: int
  activations: Sequence[str] = ("gelu", "linear")
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    if len(self.activations) not in (1, 2):
      raise ValueError(
          f"MlpBlock activations={tuple(self.activations)}: give one (plain) or "
          "two (gated) activation names.")
    embed = x.shape[-1]
    dense = lambda feats, axes, name: DenseGeneral(  # noqa: E731
        feats, kernel_axes=axes, dtype=self.dtype, param_dtype=self.param_dtype,
        name=name)
    if len(self.activations) == 1:
      names = ("wi",)
    else:
      names = ("wi_0", "wi_1")
    hidden = None
    for act_name, name in zip(self.activations, names):
      h = get_activation(act_name)(dense(self.d_ff, ("embed", "mlp"), name)(x))
      hidden = h if hidden is None else hidden * h
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
    hidden = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(
        hidden, deterministic=deterministic)
    out = dense(embed, ("mlp", "embed"), "wo")(hidden)
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))

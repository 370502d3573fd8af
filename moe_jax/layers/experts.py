"""Stacked expert MLP weights and the expert computation on dispatched slots.

Weights (logical axes in parentheses):
  * ``wi_0``, ``wi_1`` (gated) or ``wi`` (plain): <param>[E, embed, d_ff]
    ``('expert', 'embed', 'mlp')``
  * ``wo``: <param>[E, d_ff, embed] ``('expert', 'mlp', 'embed')``

so expert weights shard their expert dimension over the ``expert`` mesh axis
and their hidden dimension over ``model``. With ``shared_core_rank > 0`` the
same kernels are built from a shared core plus low-rank per-expert deltas
(``shared_core.py``, MPOE).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.layers import shared_core

Array = jax.Array

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "linear": lambda x: x,
}


def activation_fn(name: str) -> Callable[[Array], Array]:
  try:
    return _ACTIVATIONS[name]
  except KeyError:
    raise ValueError(
        f"Unknown activation {name!r}; choose from {sorted(_ACTIVATIONS)}.") from None


def expert_kernel_init(in_axis: int = -2, out_axis: int = -1,
                       batch_axis: tuple[int, ...] = (0,)):
  """T5-style fan-in truncated normal; the leading expert dim(s) are batch."""
  return nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis,
      batch_axis=batch_axis)


# Logical axis of bi-level routing's outer expert level (bilevel.py;
# partitioning.standard_logical_rules maps it).
OUTER_LOGICAL_AXIS = "expert_outer"


class ExpertWeights(nn.Module):
  """Creates the stacked expert weights; returns them (cast to ``dtype``).

  Attributes:
    num_experts, d_model, d_ff: sizes.
    activations: one (plain MLP) or two (gated MLP) activation names.
    shared_core_rank: 0 for independent expert kernels; ``r > 0`` builds each
      kernel as a shared matrix plus a rank-``r`` per-expert delta.
    num_outer: bi-level routing (``bilevel.py``): 0 for ``[E, ...]`` kernels,
      else ``[num_outer, E, ...]`` (``E`` experts per outer group) with the
      leading axes ``('expert_outer', 'expert')``.
  """
  num_experts: int
  d_model: int
  d_ff: int
  activations: Sequence[str] = ("gelu", "linear")
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  shared_core_rank: int = 0
  num_outer: int = 0

  @nn.compact
  def __call__(self) -> dict[str, Array]:
    e, d, f = self.num_experts, self.d_model, self.d_ff
    names = ["wi_0", "wi_1"] if len(self.activations) == 2 else ["wi"]
    if self.shared_core_rank:
      return shared_core.shared_core_weights(
          self, names, e, d, f, self.shared_core_rank, self.dtype, self.param_dtype)
    lead, axes = (e,), ("expert",)
    if self.num_outer:
      lead, axes = (self.num_outer, e), (OUTER_LOGICAL_AXIS, "expert")
    init = expert_kernel_init(batch_axis=tuple(range(len(lead))))
    shapes = {n: (lead + (d, f), axes + ("embed", "mlp")) for n in names}
    shapes["wo"] = (lead + (f, d), axes + ("mlp", "embed"))
    return {n: jnp.asarray(self.param(n, nn.with_logical_partitioning(init, names_),
                                      shape, self.param_dtype), self.dtype)
            for n, (shape, names_) in shapes.items()}


def hidden_activation(pre: Sequence[Array], activations: Sequence[str]) -> Array:
  """Combines the ``wi`` projections: ``act0(h0) * act1(h1)`` or ``act(h)``."""
  h = activation_fn(activations[0])(pre[0])
  for x, name in zip(pre[1:], activations[1:]):
    h = h * activation_fn(name)(x)
  return h


def dropout(h: Array, rate: float, key) -> Array:
  """Inverted dropout on the expert hidden layer (no-op without a key or rate)."""
  if rate <= 0.0 or key is None:
    return h
  keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
  return jnp.where(keep, h / (1.0 - rate), 0.0).astype(h.dtype)


def input_kernels(weights: dict[str, Array]) -> list[Array]:
  return [weights[k] for k in ("wi_0", "wi_1", "wi") if k in weights]

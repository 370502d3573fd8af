"""Router logits: the first part of every MoE layer.

``__call__(x <float>[batch, length, D], *, route_ids, deterministic) ->
(<float32>[batch, length, E], selection_bias <float32>[E] | None)``. The MoE
layer runs the module the config asks for (:func:`make`) with a *shared
scope*, so its parameters keep their historical paths
``.../moe/router_kernel`` (and ``router_bias``, ``expert_bias``).

* ``TokenRouterLogits``: a linear map of the token's hidden state (float32),
  with Switch's multiplicative jitter ``U(1-eps, 1+eps)`` on the input in
  training (``"jitter"`` RNG stream) and an optional bias. With
  auxiliary-loss-free balancing it also holds ``expert_bias`` <float32>[E],
  the *selection* bias: a non-trainable parameter (logical axis
  ``unmodeled``) that the train step moves (``training/non_trainable.py``).
* ``task_routing.TaskRouterLogits``: a learned row per route id (Task-MoE).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.layers import moe_config as cfg_lib
from moe_jax.layers import task_routing

Array = jax.Array
# The aux-loss-free selection bias (a non-trainable parameter).
NON_TRAINABLE_BIAS = "expert_bias"


class TokenRouterLogits(nn.Module):
  """``logits = (x * jitter) @ router_kernel [+ router_bias]``, in float32.

  Attributes:
    num_experts: ``E``.
    init_stddev: stddev of the kernel's normal initializer.
    use_bias: add ``router_bias <float32>[E]``.
    jitter_noise: ``eps`` of the training-time input jitter (0: none).
  """
  num_experts: int
  init_stddev: float = 0.02
  use_bias: bool = False
  jitter_noise: float = 0.0
  selection_bias: bool = False

  @nn.compact
  def __call__(self, x: Array, *, route_ids: Optional[Array] = None,
               deterministic: bool = True) -> tuple[Array, Optional[Array]]:
    del route_ids
    router_in = x.astype(jnp.float32)
    if not deterministic and self.jitter_noise > 0:
      router_in = router_in * jax.random.uniform(
          self.make_rng("jitter"), router_in.shape, minval=1.0 - self.jitter_noise,
          maxval=1.0 + self.jitter_noise)
    kernel = self.param(
        "router_kernel",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=self.init_stddev),
                                     ("embed", "unmodeled")),
        (x.shape[-1], self.num_experts), jnp.float32)
    logits = jnp.einsum("bld,de->ble", router_in, jnp.asarray(kernel, jnp.float32))
    if self.use_bias:
      logits = logits + self.param(
          "router_bias",
          nn.with_logical_partitioning(nn.initializers.zeros, ("unmodeled",)),
          (self.num_experts,), jnp.float32)
    bias = None
    if self.selection_bias:
      bias = jnp.asarray(self.param(
          NON_TRAINABLE_BIAS,
          nn.with_logical_partitioning(nn.initializers.zeros, ("unmodeled",)),
          (self.num_experts,), jnp.float32), jnp.float32)
    return logits, bias


def make(config: cfg_lib.MoeConfig) -> nn.Module:
  """The router-logits module of ``config.routing_level``."""
  if config.routing_level == "task":
    return task_routing.TaskRouterLogits(
        num_route_ids=config.num_route_ids, num_experts=config.num_experts,
        init_stddev=config.router_init_stddev)
  return TokenRouterLogits(
      num_experts=config.num_experts, init_stddev=config.router_init_stddev,
      use_bias=config.router_bias, jitter_noise=config.jitter_noise,
      selection_bias=config.expert_bias_update_rate > 0)

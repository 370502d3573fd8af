"""The sparse Mixture-of-Experts layer, as a data flow of exchangeable parts.

``MoeLayer(x)`` for ``x: <float>[batch, length, embed]``:

  1. router logits ``[batch, length, E]`` (float32) from the module of
     ``router_logits.make`` -- the token router (jitter inside) or the task
     router -- run in the layer's scope, so its parameters are
     ``.../moe/router_kernel`` (and ``router_bias``);
  2. tokens are split into ``G`` groups of ``S`` (``grouping.py``; ``G`` a
     multiple of the batch-sharding devices ``data*fsdp*expert``, so each
     device owns whole groups) and a ``routing.Router`` (``routers.py``,
     by ``router_type``) turns the logits into a ``RoutingDecision``;
  3. decision transforms: the sequence-wise balance loss, Expert Output
     Masking (EOM);
  4. an ``ExpertCompute`` (``computes.py``: capacity dispatch with the
     all-to-all, dropless, gating dropout's local / zero paths) maps the
     grouped tokens and the decision to the experts' combined output;
  5. output transforms: shared experts added (``shared_experts.py``), Final
     Output Masking (FOM);
  6. one loop sows the decision's and the compute's metrics
     (``moe_metrics.py``: unweighted; the model weights the losses).

A new method is a new router, compute or transform registered beside the
others (see ``docs/moe_layer.md``, "Adding a router or a compute"), not a
branch here. Bi-level routing has its own layer (``bilevel.py``), chosen by
``models/blocks.py``.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import partitioning
from moe_jax.layers import computes as computes_lib
from moe_jax.layers import experts as experts_lib
from moe_jax.layers import grouping
from moe_jax.layers import moe_config as cfg_lib
from moe_jax.layers import moe_metrics
from moe_jax.layers import regularization
from moe_jax.layers import router_logits as router_logits_lib
from moe_jax.layers import routers
from moe_jax.layers import selection
from moe_jax.layers import shared_experts

Array = jax.Array
MoeConfig = cfg_lib.MoeConfig


def draw_rng(module: nn.Module, mode: Optional[str], stream: str = "routing"
             ) -> Optional[Array]:
  """The key a router asked for: a fresh ``stream`` key, a fixed one, or None."""
  if mode == "stream":
    return module.make_rng(stream)
  if mode == "fixed":
    return jax.random.key(0)
  return None


class MoeLayer(nn.Module):
  """Sparse MoE MLP block (no residual, no norm: the model adds those).

  Attributes:
    config: ``MoeConfig``.
    dtype: activation/computation dtype of the experts (router is float32).
    param_dtype: parameter dtype.
  """
  config: MoeConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, padding_mask: Optional[Array] = None, *,
               deterministic: bool = True, causal: bool = False,
               decode: bool = False, route_ids: Optional[Array] = None) -> Array:
    """Applies the layer.

    Args:
      x: <float>[batch, length, embed].
      padding_mask: <bool|int>[batch, length], 1 for real tokens; padding
        takes no expert capacity and does not count in losses or metrics.
      deterministic: eval mode (eval capacity factor, no noise, no dropout).
      causal: the layer sits in a causal decoder (experts-choose refused).
      decode: autoregressive decoding with a KV cache: capacity comes from
        ``capacity_factor_decode`` (default: no drops at all).
      route_ids: <int>[batch, length] route id of each token's example, for
        ``routing_level="task"`` (see ``task_routing.py``); else unused.

    Returns:
      <float>[batch, length, embed] in ``dtype``.
    """
    c, train = self.config, not deterministic
    if c.bilevel_outer_size:
      raise ValueError("MoeConfig.bilevel_outer_size > 0 is bi-level routing: build "
                       "moe_jax.layers.bilevel.BilevelMoeLayer (models/blocks.py "
                       "picks it for you), not MoeLayer.")
    mesh = partitioning.current_mesh()
    c.validate(num_expert_shards=partitioning.mesh_axis_size(mesh, "expert"),
               causal=causal)
    b, l, d = x.shape
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    router = routers.make_router(c)
    compute = computes_lib.make_compute(c, train=train, mesh=mesh)

    g = grouping.choose_num_groups(
        b, l, compute.tokens_per_group(b, l),
        partitioning.mesh_axis_size(mesh, partitioning.BATCH_MESH_AXES))
    s = b * l // g
    capacity = grouping.capacity_for_mode(
        c, s, c.num_experts, c.num_selected_experts,
        deterministic=deterministic, decode=decode)
    with jax.named_scope("router"):  # names the ops in profiles and HLO
      logits_module = router_logits_lib.make(c)
      nn.share_scope(self, logits_module)
      logits, selection_bias = logits_module(x, route_ids=route_ids,
                                             deterministic=deterministic)
      logits = nn.with_logical_constraint(logits.reshape(g, s, c.num_experts),
                                          ("batch", "length", "unmodeled"))
      mask = None if padding_mask is None else padding_mask.reshape(g, s)
      decision = router.route(logits, mask, capacity,
                              draw_rng(self, router.rng_mode(train)),
                              selection_bias=selection_bias)
      decision = selection.with_sequence_loss(decision, c.sequence_balance_loss, b, l)

    weights = experts_lib.ExpertWeights(
        num_experts=c.num_experts, d_model=d, d_ff=c.d_ff, activations=c.activations,
        dtype=self.dtype, param_dtype=self.param_dtype,
        shared_core_rank=c.shared_core_rank, name="experts")()
    rngs = {name: self.make_rng(stream) for name, stream in compute.rng_streams()}
    decision = regularization.mask_expert_outputs(
        decision, compute.weight_field, c.expert_output_masking_rate, deterministic,
        self._dropout_key(train and c.expert_output_masking_rate > 0))
    y, compute_metrics = compute(x.astype(self.dtype).reshape(g, s, d), decision,
                                 weights, rngs)
    y = shared_experts.add_shared_experts(c, x.astype(self.dtype), y.reshape(b, l, d),
                                          self.dtype, self.param_dtype)
    y = regularization.mask_final_outputs(
        y, c.final_output_masking_rate, deterministic,
        self._dropout_key(train and c.final_output_masking_rate > 0))

    moe_metrics.sow_all(self, {**compute.adjust_metrics(decision.metrics),
                               **compute_metrics})
    return nn.with_logical_constraint(y.astype(self.dtype), ("batch", "length", "embed"))

  def _dropout_key(self, needed: bool) -> Optional[Array]:
    return self.make_rng("dropout") if needed else None

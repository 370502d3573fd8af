"""Expert computes: how routed tokens reach their experts and come back.

One protocol for every path (:class:`ExpertCompute`)::

    compute(x <float>[G, S, D], decision, weights, rngs)
        -> (<float>[G, S, D], metrics)

``weights`` are the stacked expert kernels (``experts.ExpertWeights``);
``rngs`` maps the names the compute asked for in :meth:`rng_streams` to
keys. Each compute also says which combine weights EOM masks
(``weight_field``), how many tokens form a routing group, and how it
changes the router's metrics (``adjust_metrics``); the ``metrics`` it
returns (by ``moe_metrics`` name) are sown beside the router's and win over
them.

* :class:`CapacityCompute` -- dispatch into ``[E, G, C, D]`` slots (a
  ``dispatch.py`` strategy), all-to-all onto the ``expert`` axis (from the
  sharding constraints), batched expert matmuls, all-to-all back, combine.
* :class:`DroplessCompute` -- no capacity: ``dropless.py``'s sort +
  grouped matmul in ``shard_map``.
* :class:`LocalExpertCompute` -- Gate-Drop: each device's tokens to its own
  experts (``local_experts.py``), no all-to-all.
* :class:`ZeroCompute` -- Gate-Expert-Drop: no expert output at all.
* :class:`GatingDropout` -- wraps two computes and picks one per step with
  ``lax.cond`` (one draw per layer, the same on every device).

:func:`make_compute` builds the one a ``MoeConfig`` asks for.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from moe_jax.layers import checkpoint_names
from moe_jax import partitioning
from moe_jax.layers import dispatch as dispatch_lib
from moe_jax.layers import dropless as dropless_lib
from moe_jax.layers import expert_parallel
from moe_jax.layers import experts as experts_lib
from moe_jax.layers import local_experts
from moe_jax.layers import moe_config as cfg_lib
from moe_jax.layers import moe_metrics as mm

Array = jax.Array
Rngs = Mapping[str, Optional[Array]]


@dataclasses.dataclass(frozen=True)
class ExpertCompute:
  """Base class: the defaults of the protocol.

  Attributes:
    config: the layer's ``MoeConfig``.
    train: training mode (expert dropout on).
  """
  config: cfg_lib.MoeConfig
  train: bool = False

  weight_field = "slot_weight"

  def tokens_per_group(self, batch: int, length: int) -> int:
    """Target tokens per routing group (``MoeConfig.group_size``)."""
    del batch, length
    return self.config.group_size

  def rng_streams(self) -> tuple[tuple[str, str], ...]:
    """``(key name, RNG stream)`` pairs the layer draws, in order, for ``rngs``."""
    if self.train and self.config.expert_dropout_rate > 0:
      return (("dropout", "dropout"),)
    return ()

  @property
  def dropout_rate(self) -> float:
    return self.config.expert_dropout_rate if self.train else 0.0

  def adjust_metrics(self, metrics: Mapping[str, Array]) -> dict[str, Array]:
    """The router's metrics as this compute makes them true."""
    return dict(metrics)

  def __call__(self, x: Array, decision, weights: dict[str, Array],
               rngs: Rngs) -> tuple[Array, dict[str, Array]]:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class CapacityCompute(ExpertCompute):
  """Slots of ``C`` tokens per expert and group; overflow was dropped by the
  router. ``dispatcher``: a ``dispatch.py`` strategy."""
  dispatcher: Any = dataclasses.field(default_factory=dispatch_lib.ScatterCombine)

  def __call__(self, x, decision, weights, rngs):
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    with jax.named_scope("dispatch"):
      slots = self.dispatcher.dispatch(x, decision)  # [E, G, C, D]
      slots = nn.with_logical_constraint(slots, ("unmodeled", "batch", "length", "embed"))
    with jax.named_scope("all_to_all"):
      # Groups leave the expert axis, experts move onto it.
      slots = nn.with_logical_constraint(
          slots, ("expert", "expert_group", "length", "embed"))
      slots = checkpoint_name(slots, checkpoint_names.MOE_DISPATCH)
    with jax.named_scope("experts"):
      pre = [jnp.einsum("egcd,edf->egcf", slots, w)
             for w in experts_lib.input_kernels(weights)]
      h = experts_lib.hidden_activation(pre, self.config.activations)
      h = nn.with_logical_constraint(h, ("expert", "expert_group", "length", "mlp"))
      h = experts_lib.dropout(h, self.dropout_rate, rngs.get("dropout"))
      out = jnp.einsum("egcf,efd->egcd", h, weights["wo"])
      out = nn.with_logical_constraint(out, ("expert", "expert_group", "length", "embed"))
    with jax.named_scope("all_to_all"):
      out = nn.with_logical_constraint(out, ("unmodeled", "batch", "length", "embed"))
    with jax.named_scope("combine"):
      y = self.dispatcher.combine(out, decision)
      y = checkpoint_name(y, checkpoint_names.MOE_COMBINE)
      return nn.with_logical_constraint(y, ("batch", "length", "embed")), {}


@dataclasses.dataclass(frozen=True)
class DroplessCompute(ExpertCompute):
  """Every assignment computed (MegaBlocks-style); one group of all tokens."""
  mesh: Any = None

  weight_field = "expert_weight"

  def tokens_per_group(self, batch, length):
    return batch * length

  def adjust_metrics(self, metrics):
    # Capacity is not applied: what the router would drop is computed.
    return {**metrics, mm.DROPPED_FRACTION: jnp.zeros((), jnp.float32)}

  @property
  def routes_per_token(self) -> Optional[int]:
    """At most this many expert shards per token: device-limited routing's
    ``M`` when its groups tile the shards (whole groups per shard), else
    None (``min(K, EP)``)."""
    c = self.config
    ep = partitioning.mesh_axis_size(self.mesh, expert_parallel.ExpertParallelAxes
                                     .from_rules().expert)
    if not c.routing_groups or c.routing_groups % ep:
      return None
    return c.routing_groups_per_token

  @property
  def exchange(self) -> str:
    """The exchange ``dropless_exchange`` names (``"auto"``: by platform)."""
    name = self.config.dropless_exchange
    if name != "auto":
      return name
    return "all_to_all" if expert_parallel.platform(self.mesh) == "cpu" else "ragged"

  def __call__(self, x, decision, weights, rngs):
    g, s, d = x.shape
    c = self.config
    k = decision.expert_index.shape[-1]
    y, overflow = dropless_lib.dropless_moe(
        x.reshape(g * s, d), decision.expert_index.reshape(g * s, k),
        decision.expert_weight.reshape(g * s, k), weights, activations=c.activations,
        num_experts=c.num_experts, block=c.dropless_block_size, mesh=self.mesh,
        dropout_rate=self.dropout_rate, dropout_rng=rngs.get("dropout"),
        exchange=self.exchange, buffer_factor=c.dropless_buffer_factor,
        routes_per_token=self.routes_per_token)
    # Only assignments that overflowed an exchange buffer go uncomputed.
    return y.reshape(g, s, d), {mm.DROPPED_FRACTION: overflow}


@dataclasses.dataclass(frozen=True)
class LocalExpertCompute(ExpertCompute):
  """Gate-Drop: tokens served by their own device's experts (top-k of the
  router probabilities restricted to them), no all-to-all."""
  mesh: Any = None

  def rng_streams(self):
    return ()

  def __call__(self, x, decision, weights, rngs):
    del rngs
    g, s, d = x.shape
    c = self.config
    y = local_experts.local_expert_moe(
        x.reshape(g * s, d), decision.probs.reshape(g * s, -1),
        decision.token_mask.reshape(g * s, 1).astype(x.dtype), weights,
        k=c.num_selected_experts, num_experts=c.num_experts,
        activations=c.activations, block=c.dropless_block_size, mesh=self.mesh,
        renormalize=c.renormalize_top_k)
    return y.reshape(g, s, d), {}


@dataclasses.dataclass(frozen=True)
class ZeroCompute(ExpertCompute):
  """Gate-Expert-Drop: the MoE contributes nothing (residual only)."""

  def rng_streams(self):
    return ()

  def __call__(self, x, decision, weights, rngs):
    del decision, weights, rngs
    return jnp.zeros_like(x), {}


@dataclasses.dataclass(frozen=True)
class GatingDropout(ExpertCompute):
  """Gating Dropout (Liu et al., ICML 2022): with probability ``rate`` per
  layer and step, run ``dropped`` instead of ``routed``. The draw comes from
  the ``"routing"`` stream with a key replicated on every device, so all
  devices take the same branch; it is sown as ``gating_dropout_fired``."""
  routed: Optional[ExpertCompute] = None
  dropped: Optional[ExpertCompute] = None
  rate: float = 0.0

  @property
  def weight_field(self):  # EOM masks what the routed path reads
    return self.routed.weight_field

  def tokens_per_group(self, batch, length):
    return self.routed.tokens_per_group(batch, length)

  def rng_streams(self):
    return (self.routed.rng_streams() + self.dropped.rng_streams()
            + (("gating", "routing"),))

  def adjust_metrics(self, metrics):
    return self.routed.adjust_metrics(metrics)

  def __call__(self, x, decision, weights, rngs):
    fired = jax.random.bernoulli(rngs["gating"], self.rate)
    routed = lambda x: self.routed(x, decision, weights, rngs)  # noqa: E731
    routed_metrics = jax.eval_shape(routed, x)[1]

    def dropped(x):  # both branches return the routed path's metrics
      y, metrics = self.dropped(x, decision, weights, rngs)
      zeros = {k: jnp.zeros(v.shape, v.dtype) for k, v in routed_metrics.items()}
      return y, {**zeros, **metrics}

    y, metrics = jax.lax.cond(fired, dropped, routed, x)
    return y, {**metrics, mm.GATING_DROPOUT_FIRED: fired.astype(jnp.float32)}


def make_compute(config: cfg_lib.MoeConfig, *, train: bool,
                 mesh: Optional[Any]) -> ExpertCompute:
  """The compute a ``MoeConfig`` asks for, in training or eval mode."""
  if config.dropless:
    routed = DroplessCompute(config, train, mesh=mesh)
  else:
    routed = CapacityCompute(config, train, dispatcher=dispatch_lib.make_dispatcher(
        config.dispatch, expert_parallel.platform(mesh)))
  if not (train and config.gating_dropout_rate > 0):
    return routed
  if config.gating_dropout_mode == "gate_expert_drop":
    dropped = ZeroCompute(config, train)
  else:
    dropped = LocalExpertCompute(config, train, mesh=mesh)
  return GatingDropout(config, train, routed=routed, dropped=dropped,
                       rate=config.gating_dropout_rate)

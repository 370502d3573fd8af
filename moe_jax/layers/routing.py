"""Routers: from router logits to a routing decision, plus auxiliary losses.

Every router implements one interface (:class:`Router`)::

    router.route(logits, padding_mask, capacity, rng) -> RoutingDecision
    router.rng_mode(train) -> None | "stream" | "fixed"

where ``logits`` is ``<float32>[groups, tokens_per_group, experts]`` and the
decision says, for every expert *slot*, which token of the group fills it and
with what combine weight (for the capacity computes), and for every token
which experts it chose with what weight (for the dropless computes).
``rng_mode`` tells the layer which key to pass: ``"stream"`` a fresh key of
the ``"routing"`` RNG stream, ``"fixed"`` a constant key, ``None`` none. The
layer never special-cases a router: ``routers.py`` maps
``MoeConfig.router_type`` to one.

Routers here:
  * ``TokensChooseRouter`` -- each token picks its top-k experts (k=1 Switch,
    k=2 GShard); per-expert capacity; overflow is dropped (the token keeps
    only its residual). Priority by position, batch-prioritized (BPR) or
    random (DeepSpeed RTS).
  * ``ExpertsChooseRouter`` -- each expert picks its top-C tokens (Zhou et
    al. 2022). Not causal: encoder only.

The dense-to-sparse gate is in ``dts_gate.py``. All computation is float32,
whatever the activation dtype; metric names come from ``moe_metrics.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Protocol

import flax.struct
import jax
import jax.numpy as jnp

from moe_jax.layers import moe_metrics as mm
from moe_jax.layers import regularization
from moe_jax.layers import selection

Array = jax.Array


@flax.struct.dataclass
class RoutingDecision:
  """What the expert computes need to dispatch and combine.

  Attributes:
    slot_token: <int32>[G, E, C] token index (within its group) filling each
      expert slot; ``tokens_per_group`` (one past the end) marks an empty slot.
    slot_weight: <float32>[G, E, C] combine weight of each slot (0 if empty).
    expert_index: <int32>[G, S, K] the experts each token chose (tokens-choose
      routers; None for experts-choose); used by the dropless computes.
    expert_weight: <float32>[G, S, K] their combine weights, 0 for padding.
    probs: <float32>[G, S, E] router probabilities (softmax of the logits).
    token_mask: <float32>[G, S], 1 for real tokens, 0 for padding.
    metrics: unweighted values to sow, by ``moe_metrics`` name: ``aux_loss``,
      ``z_loss``, ``dropped_fraction``, ``expert_load`` <float32>[E],
      ``router_confidence``, and router-specific ones.
    token_slot: <int32>[G, S, K] flat slot ``expert * C + position`` of each
      assignment, ``E * C`` when it was dropped: the inverse of
      ``slot_token`` (each filled slot has exactly one assignment). Routers
      whose tokens reach a bounded number of experts give it (tokens choose);
      None otherwise. The gather dispatch uses it to avoid scatters.
  """
  slot_token: Optional[Array]
  slot_weight: Optional[Array]
  expert_index: Optional[Array]
  expert_weight: Optional[Array]
  probs: Array
  token_mask: Array
  metrics: Mapping[str, Array]
  token_slot: Optional[Array] = None


class Router(Protocol):
  """The interface every router implements."""

  def rng_mode(self, train: bool) -> Optional[str]:
    """``None``, ``"stream"`` (a fresh ``"routing"`` key) or ``"fixed"``."""
    ...

  def route(self, logits: Array, padding_mask: Optional[Array], capacity: int,
            rng: Optional[Array], selection_bias: Optional[Array] = None
            ) -> RoutingDecision:
    """``selection_bias`` <float32>[E]: added to the scores for choosing only
    (auxiliary-loss-free balancing); routers that do not support it refuse it."""
    ...


def masked_mean(x: Array, mask: Array, axis) -> Array:
  """Mean of ``x`` over ``axis`` counting only positions where mask is 1."""
  total = jnp.sum(x * mask, axis=axis)
  count = jnp.sum(mask, axis=axis)
  return total / jnp.maximum(count, 1.0)


def queue_positions(claims: Array) -> Array:
  """Position of every claim in its expert's queue.

  Args:
    claims: <int32>[G, J, S, E] one-hot expert claims in claim order: all
      rank-0 claims (tokens in queue order), then all rank-1 claims, ...; a
      row of zeros is no claim.
  Returns:
    <int32>[G, S, J]: how many earlier claims went to the same expert.
  """
  g, j, s, e = claims.shape
  flat = claims.reshape(g, j * s, e)
  before = jnp.cumsum(flat, axis=1) - flat
  return jnp.swapaxes(jnp.sum(before * flat, axis=-1).reshape(g, j, s), 1, 2)


def slot_tables(slot: Array, weight: Array, num_slots: int) -> tuple[Array, Array]:
  """Inverts token->slot assignments into per-slot tables.

  Args:
    slot: <int32>[G, S, J] flat slot (``expert * capacity + position``) of
      each assignment; ``num_slots`` marks a dropped one.
    weight: <float32>[G, S, J] gate of each assignment.
  Returns:
    ``slot_token`` <int32>[G, num_slots] (``S`` = empty slot) and
    ``slot_weight`` <float32>[G, num_slots].
  """
  _, s, j = slot.shape
  token_ids = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[:, None], (s, j))

  def one(slot_g, weight_g):
    tok = jnp.full((num_slots,), s, jnp.int32).at[slot_g.reshape(-1)].set(
        token_ids.reshape(-1), mode="drop")
    wt = jnp.zeros((num_slots,), jnp.float32).at[slot_g.reshape(-1)].set(
        weight_g.reshape(-1), mode="drop")
    return tok, wt

  return jax.vmap(one)(slot, weight)


def router_z_loss(logits: Array, mask: Array) -> Array:
  """ST-MoE router z-loss: mean over real tokens of ``logsumexp(logits)^2``.

  Args:
    logits: <float32>[G, S, E].
    mask: <float32>[G, S], 1 for real tokens.
  """
  lse = jax.nn.logsumexp(logits, axis=-1)
  return jnp.sum(lse ** 2 * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def load_balancing_loss(probs: Array, expert_index: Array, mask: Array,
                        scope: str = "group") -> Array:
  """Switch load-balancing loss ``E * sum_e f_e * P_e``.

  ``f_e`` is the fraction of real tokens that have expert ``e`` among their
  top-k (so ``sum_e f_e = k``); ``P_e`` the mean router probability of ``e``.
  Perfect balance gives ``k``. ``scope="group"`` (Switch, GShard) computes
  ``f`` and ``P`` per token group and averages the losses over groups;
  ``"global"`` (Qwen's global-batch balance) computes them over every real
  token of the (global) batch, so a group may be unbalanced as long as the
  batch is not. Under SPMD the global statistics cost two small all-reduces.

  Args:
    probs: <float32>[G, S, E] router probabilities.
    expert_index: <int32>[G, S, K] chosen experts.
    mask: <float32>[G, S].
  """
  num_experts = probs.shape[-1]
  chosen = jnp.max(jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32),
                   axis=-2)  # [G, S, E]
  if scope == "global":
    f = masked_mean(chosen, mask[..., None], axis=(0, 1))  # [E]
    p = masked_mean(probs, mask[..., None], axis=(0, 1))  # [E]
    return jnp.sum(f * p) * num_experts
  if scope != "group":
    raise ValueError(f"Unknown balance scope {scope!r}; use one of "
                     f"{selection.BALANCE_SCOPES}.")
  f = masked_mean(chosen, mask[..., None], axis=1)  # [G, E]
  p = masked_mean(probs, mask[..., None], axis=1)  # [G, E]
  return jnp.mean(jnp.sum(f * p, axis=-1)) * num_experts


def _priority_rank(top1_prob: Array, mask: Array, priority: str,
                   rng: Optional[Array]) -> Array:
  """Rank of each token in the order in which tokens claim capacity.

  Args:
    top1_prob: <float32>[G, S].
    mask: <float32>[G, S].
    priority: "position" | "batch_prioritized" | "random".
    rng: PRNG key, needed for "random".

  Returns:
    <int32>[G, S]: 0 for the token served first. Padding tokens go last.
  """
  g, s = top1_prob.shape
  if priority == "position":
    key = jnp.broadcast_to(jnp.arange(s, dtype=jnp.float32), (g, s))
  elif priority == "batch_prioritized":
    key = -top1_prob
  elif priority == "random":
    if rng is None:
      raise ValueError("priority='random' needs an RNG (the 'routing' stream).")
    key = jax.random.uniform(rng, (g, s))
  else:
    raise ValueError(f"Unknown priority {priority!r}.")
  key = jnp.where(mask > 0, key, jnp.inf)
  order = jnp.argsort(key, axis=-1, stable=True)  # order[g, r] = token
  rank = jnp.argsort(order, axis=-1, stable=True)  # inverse permutation
  return rank.astype(jnp.int32)


def standard_metrics(probs: Array, logits: Array, mask: Array, *, aux_loss: Array,
                     dropped_fraction: Array, expert_load: Array) -> dict[str, Array]:
  """The metrics every router reports, by ``moe_metrics`` name.

  Args:
    probs, logits: <float32>[G, S, E]; mask: <float32>[G, S].
    aux_loss, dropped_fraction: <float32>[]; expert_load: <float32>[E].
  """
  return {mm.AUX_LOSS: aux_loss,
          mm.Z_LOSS: router_z_loss(logits, mask),
          mm.DROPPED_FRACTION: dropped_fraction,
          mm.EXPERT_LOAD: expert_load,
          mm.ROUTER_CONFIDENCE: masked_mean(probs.max(-1), mask, axis=(0, 1))}


def as_mask(padding_mask: Optional[Array], shape: tuple[int, int]) -> Array:
  """<float32>[G, S]: the padding mask, or all ones without one."""
  if padding_mask is None:
    return jnp.ones(shape, jnp.float32)
  return padding_mask.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class TokensChooseRouter:
  """Each token chooses its top-k experts, subject to expert capacity.

  Assignments claim slots in this order: every token's 1st choice (tokens in
  priority order), then every token's 2nd choice, and so on (GShard). An
  assignment whose expert is full is dropped. With expert clusters (MoEC)
  the decision also reports ``cluster_loss`` and, in training, re-routes a
  share of the assignments within their cluster.

  The selection follows today's MoE models when ``options`` ask
  (``selection.SelectionOptions``): sigmoid scores, a routed scaling factor
  on the gates, a per-expert selection bias (auxiliary-loss-free balancing:
  ``route(..., selection_bias=b)``; the decision then reports the bias step
  ``expert_bias_update``), device-limited routing over expert groups, and a
  balance loss over the whole batch instead of per group.
  """
  num_selected_experts: int = 2
  priority: str = "position"
  renormalize_top_k: bool = True
  num_clusters: int = 0
  cluster_dropout_rate: float = 0.0
  options: selection.SelectionOptions = selection.SelectionOptions()

  def rng_mode(self, train: bool) -> Optional[str]:
    """Random priority needs a key even in eval (a fixed one); cluster
    re-routing draws only in training."""
    reroutes = bool(self.num_clusters) and self.cluster_dropout_rate > 0
    if train and (self.priority == "random" or reroutes):
      return "stream"
    return "fixed" if self.priority == "random" else None

  def route(self, logits: Array, padding_mask: Optional[Array], capacity: int,
            rng: Optional[Array] = None,
            selection_bias: Optional[Array] = None) -> RoutingDecision:
    """See ``Router``. logits <float32>[G, S, E]; padding_mask [G, S];
    selection_bias <float32>[E] or None."""
    logits = logits.astype(jnp.float32)
    g, s, e = logits.shape
    k = self.num_selected_experts
    mask = as_mask(padding_mask, (g, s))
    o = self.options
    scores, probs = selection.score(logits, o.score_function)
    gate, expert_index = selection.select_top_k(  # [G, S, K]
        scores, k, bias=selection_bias, num_groups=o.routing_groups,
        groups_per_token=o.routing_groups_per_token, group_score=o.routing_group_score)
    if self.renormalize_top_k and k > 1:
      gate = gate / jnp.sum(gate, axis=-1, keepdims=True)
    if o.routed_scaling_factor != 1.0:
      gate = gate * o.routed_scaling_factor
    gate = gate * mask[..., None]
    priority_rng = reroute_rng = None
    if rng is not None:
      priority_rng, reroute_rng = jax.random.split(rng)
    extra = {}
    if self.num_clusters:
      extra[mm.CLUSTER_LOSS] = regularization.cluster_variance_loss(
          probs, mask, self.num_clusters)
      if self.cluster_dropout_rate > 0 and reroute_rng is not None:
        expert_index = regularization.reroute_within_cluster(
            expert_index, e, self.num_clusters, self.cluster_dropout_rate, reroute_rng)

    rank = _priority_rank(probs.max(-1), mask, self.priority, priority_rng)  # [G, S]
    # Position of each assignment within its expert's queue: count earlier
    # assignments (in claim order) to the same expert.
    one_hot = jax.nn.one_hot(expert_index, e, dtype=jnp.int32)  # [G, S, K, E]
    one_hot = one_hot * mask.astype(jnp.int32)[..., None, None]
    # Reorder tokens into priority order, k-major: [G, K, S(rank), E].
    order = jnp.argsort(rank, axis=-1)  # [G, S]: token at each rank
    by_rank = jnp.take_along_axis(one_hot, order[:, :, None, None], axis=1)
    pos_by_rank = queue_positions(jnp.swapaxes(by_rank, 1, 2))  # [G, S(rank), K]
    position = jnp.take_along_axis(pos_by_rank, rank[:, :, None], axis=1)  # [G,S,K]

    keep = (position < capacity) & (mask[..., None] > 0)
    slot = jnp.where(keep, expert_index * capacity + position, e * capacity)
    slot_token, slot_weight = slot_tables(slot, gate, e * capacity)

    real = jnp.maximum(jnp.sum(mask) * k, 1.0)
    load = jnp.sum(one_hot, axis=(0, 1, 2)).astype(jnp.float32) / real
    metrics = standard_metrics(
        probs, logits, mask,
        aux_loss=load_balancing_loss(probs, expert_index, mask, o.balance_loss_scope),
        dropped_fraction=1.0 - jnp.sum(keep.astype(jnp.float32)) / real,
        expert_load=load)
    if o.expert_bias_update_rate > 0:
      extra[mm.EXPERT_BIAS_UPDATE] = selection.bias_update(load, o.expert_bias_update_rate)
    return RoutingDecision(
        slot_token=slot_token.reshape(g, e, capacity),
        slot_weight=slot_weight.reshape(g, e, capacity),
        expert_index=expert_index.astype(jnp.int32),
        expert_weight=gate, probs=probs, token_mask=mask,
        metrics={**metrics, **extra}, token_slot=slot.astype(jnp.int32))


@dataclasses.dataclass(frozen=True)
class ExpertsChooseRouter:
  """Each expert chooses the ``capacity`` tokens of a group it likes best.

  Combine weight of a (token, expert) pair is the router probability
  ``softmax(logits)[token, expert]`` (Zhou et al. 2022). Perfectly balanced by
  construction (aux loss 0); some tokens may reach no expert (counted as
  dropped). Each token's output depends on the other tokens of its group, so
  this router must not be used in a causal decoder.
  """

  def rng_mode(self, train: bool) -> Optional[str]:
    del train
    return None

  def route(self, logits: Array, padding_mask: Optional[Array], capacity: int,
            rng: Optional[Array] = None,
            selection_bias: Optional[Array] = None) -> RoutingDecision:
    del rng
    if selection_bias is not None:
      raise ValueError("Experts-choose routing is balanced by construction and takes "
                       "no selection bias; set MoeConfig.expert_bias_update_rate=0.")
    logits = logits.astype(jnp.float32)
    g, s, e = logits.shape
    mask = as_mask(padding_mask, (g, s))
    probs = jax.nn.softmax(logits, axis=-1)
    # Padding can never outrank a real token: score -1 < any probability.
    scores = jnp.where(mask[..., None] > 0, probs, -1.0)
    slot_score, slot_token = selection.top_k(jnp.swapaxes(scores, 1, 2), capacity)
    real_slot = slot_score >= 0  # [G, E, C]
    slot_weight = jnp.where(real_slot, slot_score, 0.0)
    slot_token = jnp.where(real_slot, slot_token, s).astype(jnp.int32)

    def reached(tok_g):
      return jnp.zeros((s + 1,), jnp.float32).at[tok_g.reshape(-1)].max(1.0)[:s]

    reached_any = jax.vmap(reached)(slot_token)  # [G, S]
    n_real = jnp.maximum(jnp.sum(mask), 1.0)
    per_expert = jnp.sum(real_slot.astype(jnp.float32), axis=(0, 2))
    metrics = standard_metrics(
        probs, logits, mask, aux_loss=jnp.zeros((), jnp.float32),
        dropped_fraction=1.0 - jnp.sum(reached_any * mask) / n_real,
        expert_load=per_expert / jnp.maximum(jnp.sum(per_expert), 1.0))
    return RoutingDecision(
        slot_token=slot_token, slot_weight=slot_weight, expert_index=None,
        expert_weight=None, probs=probs, token_mask=mask, metrics=metrics)

"""Expert selection of today's MoE models: scores, biases, group limits, balance.

Pure functions used by the routers (``routing.py``):

* :func:`top_k` -- ``lax.top_k`` that the SPMD partitioner keeps sharded.
* :func:`score` -- softmax (Switch, GShard, Mixtral) or sigmoid (DeepSeek-V3)
  router scores, and the normalized ``probs`` the balance losses and metrics
  read (for sigmoid, the affinities normalized over experts, DeepSeek-V3's
  ``s'``).
* :func:`limit_to_groups` -- device-limited routing (DeepSeek-V2; node-limited
  in V3): experts form ``num_groups`` groups (one per expert-parallel shard
  when ``num_groups`` is the expert axis size); each token keeps only the
  experts of its ``groups_per_token`` best groups, ranked by their best score
  (``"max"``, V2) or the sum of their two best (``"top2_sum"``, V3). A token
  then reaches at most ``groups_per_token`` shards.
* :func:`bias_update` -- auxiliary-loss-free load balancing (DeepSeek-V3,
  Wang et al. 2024): a per-expert bias, added to the scores for the top-k
  *selection only*, moves by ``rate * sign(mean_load - load)`` after every
  training step.
* :func:`sequence_balance_loss` -- DeepSeek-V3's complementary sequence-wise
  balance loss ``sum_i f_i P_i`` per sequence.

Everything is float32; shapes ``<float32>[G, S, E]`` unless noted.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax.layers import moe_metrics as mm

Array = jax.Array

SCORE_FUNCTIONS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")
BALANCE_SCOPES = ("group", "global")


@dataclasses.dataclass(frozen=True)
class SelectionOptions:
  """How a tokens-choose router selects; a base of ``MoeConfig`` (same names,
  documented there) and the ``options`` of ``routing.TokensChooseRouter``."""
  score_function: str = "softmax"
  """``"softmax"`` or ``"sigmoid"`` scores (:func:`score`)."""
  routed_scaling_factor: float = 1.0
  """Multiplies the routed experts' gates."""
  expert_bias_update_rate: float = 0.0
  """Auxiliary-loss-free balancing: the bias step per training step (0 = off)."""
  routing_groups: int = 0
  """Device-limited routing: expert groups (0 = off; :func:`limit_to_groups`)."""
  routing_groups_per_token: int = 0
  """The groups a token may use."""
  routing_group_score: str = "max"
  """How groups are ranked: ``"max"`` or ``"top2_sum"``."""
  balance_loss_scope: str = "group"
  """The Switch balance loss per token group or over the global batch."""

  @classmethod
  def of(cls, config) -> "SelectionOptions":
    """The options of a ``MoeConfig`` (or anything with these attributes)."""
    return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


def top_k(x: Array, k: int) -> tuple[Array, Array]:
  """``jax.lax.top_k`` along the last axis, partitioned like the rest.

  XLA's TopK is not split along the leading (group) dimensions by the SPMD
  partitioner: a sharded ``[G, S, E]`` input is all-gathered and every
  device ranks the whole global batch. This version is made of argmax
  reductions (``k <= 8``) or a stable sort, both of which keep the group
  dimension sharded. Same values, same indices, same tie-break (the lower
  index first) as ``lax.top_k``.

  Args:
    x: <float>[..., N]; k: how many, ``<= N``.
  Returns:
    ``(values <float>[..., k], indices <int32>[..., k])``, largest first.
  """
  if k <= 8:
    remaining, values, indices = x, [], []
    for _ in range(k):
      index = jnp.argmax(remaining, axis=-1)
      values.append(jnp.take_along_axis(x, index[..., None], axis=-1)[..., 0])
      indices.append(index)
      taken = jax.nn.one_hot(index, x.shape[-1], dtype=jnp.bool_)
      remaining = jnp.where(taken, -jnp.inf, remaining)
    return jnp.stack(values, axis=-1), jnp.stack(indices, axis=-1).astype(jnp.int32)
  order = jnp.argsort(-x, axis=-1, stable=True)[..., :k].astype(jnp.int32)
  return jnp.take_along_axis(x, order, axis=-1), order


def score(logits: Array, score_function: str) -> tuple[Array, Array]:
  """``(scores, probs)``: gating scores and their normalized form.

  Softmax scores are already normalized (``probs is scores``); sigmoid scores
  are independent per expert, ``probs = scores / sum_e scores``.
  """
  if score_function == "softmax":
    probs = jax.nn.softmax(logits, axis=-1)
    return probs, probs
  if score_function == "sigmoid":
    scores = jax.nn.sigmoid(logits)
    return scores, scores / jnp.maximum(jnp.sum(scores, axis=-1, keepdims=True), 1e-9)
  raise ValueError(f"Unknown score_function {score_function!r}; use one of "
                   f"{SCORE_FUNCTIONS}.")


def limit_to_groups(select: Array, num_groups: int, groups_per_token: int,
                    group_score: str = "max") -> Array:
  """Selection scores with every expert outside a token's best groups at -inf.

  Args:
    select: <float32>[..., E] scores used for selection; experts
      ``[g * E / num_groups, (g + 1) * E / num_groups)`` form group ``g``.
    num_groups: number of expert groups (divides ``E``).
    groups_per_token: ``M``, groups each token may use.
    group_score: how a group is ranked: ``"max"`` (its best expert) or
      ``"top2_sum"`` (its two best; groups need >= 2 experts).
  """
  e = select.shape[-1]
  grouped = select.reshape(select.shape[:-1] + (num_groups, e // num_groups))
  if group_score == "max":
    rank = jnp.max(grouped, axis=-1)
  elif group_score == "top2_sum":
    rank = jnp.sum(top_k(grouped, 2)[0], axis=-1)
  else:
    raise ValueError(f"Unknown group_score {group_score!r}; use one of {GROUP_SCORES}.")
  _, best = top_k(rank, groups_per_token)  # [..., M]
  keep = jnp.any(best[..., :, None] == jnp.arange(num_groups), axis=-2)  # [..., groups]
  keep = jnp.repeat(keep, e // num_groups, axis=-1)
  return jnp.where(keep, select, -jnp.inf)


def bias_update(expert_load: Array, rate: float) -> Array:
  """DeepSeek-V3's bias step ``rate * sign(mean_e(load) - load)``, <float32>[E].

  Overloaded experts (load above the mean) get their selection bias lowered,
  underloaded ones raised, by the same amount ``rate``.
  """
  return rate * jnp.sign(jnp.mean(expert_load) - expert_load)


def sequence_balance_loss(probs: Array, expert_index: Array, mask: Array) -> Array:
  """DeepSeek-V3's sequence-wise balance loss, averaged over sequences.

  Per sequence of ``T`` real tokens: ``sum_i f_i P_i`` with
  ``f_i = E / (K T) * #{t : i in top-k(t)}`` and ``P_i = mean_t probs[t, i]``
  (1 at perfect balance).

  Args:
    probs: <float32>[B, L, E] normalized scores; expert_index: <int32>[B, L, K];
    mask: <float32>[B, L] real tokens.
  """
  e, k = probs.shape[-1], expert_index.shape[-1]
  chosen = jnp.sum(jax.nn.one_hot(expert_index, e, dtype=jnp.float32), axis=-2)  # [B,L,E]
  tokens = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)  # [B, 1]
  f = e / k * jnp.sum(chosen * mask[..., None], axis=1) / tokens
  p = jnp.sum(probs * mask[..., None], axis=1) / tokens
  has_tokens = (jnp.sum(mask, axis=-1) > 0).astype(jnp.float32)
  per_sequence = jnp.sum(f * p, axis=-1) * has_tokens
  return jnp.sum(per_sequence) / jnp.maximum(jnp.sum(has_tokens), 1.0)


def select_top_k(scores: Array, k: int, *, bias: Optional[Array] = None,
                 num_groups: int = 0, groups_per_token: int = 0,
                 group_score: str = "max") -> tuple[Array, Array]:
  """``(gates, expert_index)`` of a token's top-k experts.

  The *selection* uses ``scores + bias`` restricted to the token's allowed
  groups; the gates are the unbiased ``scores`` of the selected experts
  (DeepSeek-V3: the bias steers the choice, never the combine weight).

  Returns:
    ``(<float32>[..., K], <int32>[..., K])``, best first.
  """
  if bias is None and not num_groups:
    return top_k(scores, k)
  select = scores if bias is None else scores + bias.astype(scores.dtype)
  if num_groups:
    select = limit_to_groups(select, num_groups, groups_per_token, group_score)
  _, index = top_k(select, k)
  return jnp.take_along_axis(scores, index, axis=-1), index


def with_sequence_loss(decision, enabled: bool, batch: int, length: int):
  """The decision with ``sequence_aux_loss`` in its metrics when ``enabled``.

  Groups are contiguous runs of the row-major ``[batch, length]`` tokens, so
  the ``[G, S, ...]`` arrays reshape back to sequences.
  """
  if not enabled:
    return decision
  e = decision.probs.shape[-1]
  loss = sequence_balance_loss(
      decision.probs.reshape(batch, length, e),
      decision.expert_index.reshape(batch, length, -1),
      decision.token_mask.reshape(batch, length))
  return decision.replace(metrics={**decision.metrics, mm.SEQUENCE_AUX_LOSS: loss})

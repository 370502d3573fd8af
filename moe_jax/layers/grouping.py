"""Token groups, expert capacity, and slot gather/scatter.

Every capacity-based MoE computation (the flat layer and each level of
bi-level routing) splits its tokens into ``G`` groups of ``S`` tokens, gives
each expert ``C`` slots per group, and moves tokens between the group layout
``<float>[G, S, D]`` and the slot layout ``<float>[E, G, C, D]`` (or
``[G, E, C, D]``). A routing decision names, for every slot, the token that
fills it (``slot_token <int32>[G, E, C]``, ``S`` = empty) and its combine
weight (``slot_weight <float32>[G, E, C]``).

Gathers and scatters are plain indexed moves (no one-hot einsum); see
``dispatch.py`` for the strategies that build on them.
"""

from __future__ import annotations

import math
import jax
import jax.numpy as jnp

Array = jax.Array


def _aligned(batch: int, length: int, g: int) -> bool:
  """Groups hold whole sequences, or a sequence splits into whole groups."""
  return (batch * length) % g == 0 and (
      batch % g == 0 or (g % batch == 0 and length % (g // batch) == 0))


def choose_num_groups(batch: int, length: int, group_size: int,
                      num_batch_shards: int) -> int:
  """Number of token groups for ``batch x length`` tokens.

  The count comes from ``group_size`` alone -- the smallest count that
  divides the tokens evenly, aligns with sequences and gives groups of at most
  ``group_size`` tokens -- so routing (and therefore the model's output) does
  not depend on the mesh. Every device must own whole groups, so the count
  must be a multiple of ``num_batch_shards`` (data*fsdp*expert). If it is not
  (e.g. a decode step with few tokens), the smallest aligned multiple of
  ``num_batch_shards`` is used instead; then capacity per group, and possibly
  which tokens drop, depends on the mesh. Choose ``group_size`` so that
  ``tokens / group_size`` is a multiple of the batch shards to avoid that.

  Raises:
    ValueError: when no valid count exists, saying what to change.
  """
  tokens = batch * length
  if batch % num_batch_shards:
    raise ValueError(
        f"The batch size {batch} is not divisible by the {num_batch_shards} "
        "batch-sharding devices (mesh axes data*fsdp*expert); use a batch size "
        f"that is a multiple of {num_batch_shards}.")
  natural = next((g for g in range(1, tokens + 1)
                  if _aligned(batch, length, g) and tokens // g <= group_size), None)
  if natural is not None and natural % num_batch_shards == 0:
    return natural
  g = num_batch_shards
  while g <= tokens:
    if _aligned(batch, length, g) and tokens // g <= group_size:
      return g
    g += num_batch_shards
  raise ValueError(
      f"Cannot split batch={batch} x length={length} tokens into groups of at "
      f"most group_size={group_size} tokens, a multiple of {num_batch_shards} "
      "groups; raise MoeConfig.group_size or change the batch/length.")


def expert_capacity(tokens_per_group: int, num_experts: int, k: int,
                    capacity_factor: float, min_capacity: int) -> int:
  """GShard/DeepSpeed capacity: ``ceil(cf * k * S / E)``, floored, at most S."""
  cap = math.ceil(capacity_factor * k * tokens_per_group / num_experts)
  cap = max(cap, min_capacity)
  return max(1, min(cap, tokens_per_group))


def capacity_for_mode(config, tokens_per_group: int, num_experts: int, k: int, *,
                      deterministic: bool, decode: bool) -> int:
  """Slots per expert per group for the layer's mode.

  Training uses ``capacity_factor_train``, eval ``capacity_factor_eval``;
  autoregressive decoding ``capacity_factor_decode``, where ``None`` means
  room for every token of the group (a decode step must not depend on which
  other sequences share its batch).

  Args:
    config: a ``MoeConfig`` (capacity factors, ``min_expert_capacity``).
    tokens_per_group: ``S``; num_experts, k: experts and choices per token
      at this routing level.
  """
  if decode:
    if config.capacity_factor_decode is None:
      return tokens_per_group
    factor = config.capacity_factor_decode
  else:
    factor = config.capacity_factor_eval if deterministic else config.capacity_factor_train
  return expert_capacity(tokens_per_group, num_experts, k, factor,
                         config.min_expert_capacity)


def gather_slots(tokens: Array, slot_token: Array, expert_major: bool = False) -> Array:
  """Gathers each group's tokens into its expert slots.

  Args:
    tokens: <float>[G, S, D].
    slot_token: <int32>[G, E, C] token filling each slot (``S`` = empty).
    expert_major: return ``[E, G, C, D]`` (the expert matmuls are then plain
      batched dots) instead of ``[G, E, C, D]``.
  Returns:
    Slots, empty ones zero.
  """
  padded = jnp.concatenate([tokens, jnp.zeros_like(tokens[:, :1])], axis=1)
  return jax.vmap(lambda t, idx: t[idx], out_axes=1 if expert_major else 0)(
      padded, slot_token)


def combine_slots(out: Array, slot_token: Array, slot_weight: Array,
                  tokens_per_group: int, expert_major: bool = False) -> Array:
  """Sums the weighted slot outputs back onto their tokens.

  Args:
    out: <float>[E, G, C, D] (``expert_major``) or [G, E, C, D].
    slot_token: <int32>[G, E, C]; slot_weight: <float32>[G, E, C].
    tokens_per_group: ``S``.
  Returns:
    <float>[G, S, D].
  """
  s, d = tokens_per_group, out.shape[-1]
  weight = jnp.swapaxes(slot_weight, 0, 1) if expert_major else slot_weight
  weighted = out * weight[..., None].astype(out.dtype)

  def one(w, idx):  # w [E, C, D], idx [E, C]
    return jnp.zeros((s + 1, d), w.dtype).at[idx.reshape(-1)].add(
        w.reshape(-1, d))[:s]

  return jax.vmap(one, in_axes=(1 if expert_major else 0, 0))(weighted, slot_token)


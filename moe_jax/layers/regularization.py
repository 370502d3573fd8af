"""Regularization methods of the MoE literature that act inside the layer.

All are off by default (``MoeConfig``); each is a small pure function:

* ``output_mask`` -- Expert Output Masking / Final Output Masking (NLLB,
  Elbayad et al. 2023): keep with probability ``1-p`` in training, scale by
  ``1-p`` in eval (dropout without the inverted scaling).
* ``cluster_variance_loss`` and ``reroute_within_cluster`` -- Mixture of
  Expert Clusters (Xie et al., AAAI 2023).

Gating Dropout's compute paths are in ``computes.py`` / ``local_experts.py``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def output_mask(values: Array, rate: float, deterministic: bool,
                rng: Optional[Array]) -> Array:
  """EOM/FOM mask: ``values * Bernoulli(1-rate)`` (train) or ``* (1-rate)`` (eval).

  Args:
    values: any shape; for EOM the per-slot combine weights <float>[G, E, C],
      for FOM a per-token multiplier broadcastable to the output.
  """
  if rate <= 0.0:
    return values
  if deterministic:
    return values * (1.0 - rate)
  keep = jax.random.bernoulli(rng, 1.0 - rate, values.shape)
  return jnp.where(keep, values, jnp.zeros_like(values))


def cluster_variance_loss(probs: Array, mask: Array, num_clusters: int,
                          eps: float = 1e-9) -> Array:
  """MoEC variance loss: intra-cluster over inter-cluster variance of router probs.

  Experts ``[c*m, (c+1)*m)`` form cluster ``c`` (``m = E / num_clusters``).
  For each token, the intra-cluster variance is the mean over clusters of the
  variance of its probabilities within the cluster; the inter-cluster
  variance is the variance of the cluster means. Both are averaged over real
  tokens, then divided: small values mean experts of a cluster are routed
  alike and clusters are told apart.

  Args:
    probs: <float32>[G, S, E]; mask: <float32>[G, S].
  Returns:
    <float32>[] loss.
  """
  g, s, e = probs.shape
  p = probs.reshape(g, s, num_clusters, e // num_clusters)
  intra = jnp.mean(jnp.var(p, axis=-1), axis=-1)  # [G, S]
  inter = jnp.var(jnp.mean(p, axis=-1), axis=-1)  # [G, S]
  n = jnp.maximum(jnp.sum(mask), 1.0)
  return (jnp.sum(intra * mask) / n) / (jnp.sum(inter * mask) / n + eps)


def reroute_within_cluster(expert_index: Array, num_experts: int,
                           num_clusters: int, rate: float, rng: Array) -> Array:
  """MoEC cluster-level expert dropout.

  Each assignment is, with probability ``rate``, sent to a uniformly chosen
  *other* expert of its cluster.

  Args:
    expert_index: <int32>[..., K].
  Returns:
    <int32>[..., K].
  """
  m = num_experts // num_clusters
  if m < 2 or rate <= 0.0:
    return expert_index
  k_drop, k_shift = jax.random.split(rng)
  drop = jax.random.bernoulli(k_drop, rate, expert_index.shape)
  shift = jax.random.randint(k_shift, expert_index.shape, 1, m)
  base = (expert_index // m) * m
  sibling = base + (expert_index - base + shift) % m
  return jnp.where(drop, sibling, expert_index).astype(expert_index.dtype)


def mask_expert_outputs(decision, weight_field: str, rate: float, deterministic: bool,
                        rng: Optional[Array]):
  """EOM as a decision transform: masks the combine weights the compute reads.

  Args:
    decision: a ``routing.RoutingDecision``.
    weight_field: ``"slot_weight"`` (capacity computes, <float>[G, E, C]) or
      ``"expert_weight"`` (dropless computes, <float>[G, S, K]).
  """
  if rate <= 0.0:
    return decision
  return decision.replace(**{weight_field: output_mask(
      getattr(decision, weight_field), rate, deterministic, rng)})


def mask_final_outputs(y: Array, rate: float, deterministic: bool,
                       rng: Optional[Array]) -> Array:
  """FOM as an output transform: a token's whole output, <float>[b, l, D]."""
  if rate <= 0.0:
    return y
  return y * output_mask(jnp.ones(y.shape[:-1] + (1,), y.dtype), rate, deterministic, rng)

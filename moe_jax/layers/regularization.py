"""Regularization methods of the MoE literature that act inside the layer.

All are off by default (``MoeConfig``); each is a small pure function:

* ``output_mask`` -- Expert Output Masking / Final Output Masking (NLLB,
  Elbayad et al. 2023): keep with probability ``1-p`` in training, scale by
  ``1-p`` in eval (dropout without the inverted scaling).
* ``cluster_variance_loss`` and ``reroute_within_cluster`` -- Mixture of
  Expert Clusters (Xie et al., AAAI 2023).
* ``local_expert_moe`` -- the Gate-Drop branch of Gating Dropout (Liu et al.,
  ICML 2022): tokens are served by the experts on their own device, so the
  branch contains no all-to-all.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax.layers import dropless as dropless_lib
from moe_jax.partitioning import BATCH_MESH_AXES

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


def local_expert_moe(x: Array, probs: Array, mask: Array, weights: dict, *, k: int,
                     num_experts: int, activations: Sequence[str], block: int,
                     mesh: Optional[Any], renormalize: bool = True) -> Array:
  """Gate-Drop: every device serves its tokens with its own experts only.

  The router probabilities are restricted to the device's local experts; each
  token takes its top-``min(k, E_local)`` of those (renormalized), computed
  dropless. No all-to-all or all-gather: only a psum over ``model`` when the
  experts' hidden dimension is sharded.

  Args:
    x: <float>[T, D] batch-sharded tokens; probs: <float32>[T, E] router probs;
    mask: <float32>[T, 1], 0 for padding (served by no expert).
  Returns:
    <float>[T, D].
  """
  shape = dict(mesh.shape) if mesh is not None else {}
  n_expert = shape.get("expert", 1)
  n_model = shape.get("model", 1)
  e_local = num_experts // n_expert
  k_local = min(k, e_local)

  def body(x, probs, mask, weights):
    if n_expert > 1:
      start = jax.lax.axis_index("expert") * e_local
      local = jax.lax.dynamic_slice_in_dim(probs, start, e_local, axis=1)
    else:
      local = probs
    gate, idx = jax.lax.top_k(local, k_local)
    if renormalize:
      gate = gate / jnp.maximum(jnp.sum(gate, axis=-1, keepdims=True), 1e-9)
    gate = gate * mask
    y = dropless_lib.local_expert_mlp(
        x, idx.astype(jnp.int32), gate.astype(x.dtype), weights,
        activations=tuple(activations), num_experts_local=e_local,
        expert_offset=0, block=block, dropout_rate=0.0, dropout_rng=None,
        backend=None)
    if n_model > 1:
      y = jax.lax.psum(y, "model")
    return y

  if mesh is None:
    return body(x, probs, mask, weights)
  tok = P(BATCH_MESH_AXES, None)
  return jax.shard_map(body, mesh=mesh,
                       in_specs=(tok, tok, tok, dropless_lib.expert_weight_specs(weights)),
                       out_specs=tok, check_vma=False)(x, probs, mask, weights)

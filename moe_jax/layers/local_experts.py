"""Gate-Drop's compute: every device serves its tokens with its own experts.

The Gate-Drop branch of Gating Dropout (Liu et al., ICML 2022): the router
probabilities are restricted to the device's local experts, so the branch
has no all-to-all (only a psum over the experts' hidden-dimension axes).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from moe_jax.layers import dropless as dropless_lib
from moe_jax.layers import expert_parallel
from moe_jax.layers import selection

Array = jax.Array


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
  axes = expert_parallel.ExpertParallelAxes.from_rules()
  n_expert, n_model = axes.sizes(mesh)
  expert_axis = axes.collective_axis(axes.expert)
  e_local = num_experts // n_expert
  k_local = min(k, e_local)

  def body(x, probs, mask, weights):
    if n_expert > 1:
      start = jax.lax.axis_index(expert_axis) * e_local
      local = jax.lax.dynamic_slice_in_dim(probs, start, e_local, axis=1)
    else:
      local = probs
    gate, idx = selection.top_k(local, k_local)
    if renormalize:
      gate = gate / jnp.maximum(jnp.sum(gate, axis=-1, keepdims=True), 1e-9)
    gate = gate * mask
    y = dropless_lib.local_expert_mlp(
        x, idx.astype(jnp.int32), gate.astype(x.dtype), weights,
        activations=tuple(activations), num_experts_local=e_local,
        expert_offset=0, block=block, dropout_rate=0.0, dropout_rng=None,
        backend=dropless_lib.kernel_for(mesh))
    if n_model > 1:
      y = jax.lax.psum(y, axes.collective_axis(axes.model))
    return y

  if mesh is None:
    return body(x, probs, mask, weights)
  tok = axes.token_spec()
  return jax.shard_map(body, mesh=mesh,
                       in_specs=(tok, tok, tok, axes.weight_specs(weights)),
                       out_specs=tok, check_vma=False)(x, probs, mask, weights)

"""Dropless expert computation: sort tokens by expert, grouped matmul, no capacity.

Expert-parallel layout (inside ``shard_map``): each device holds
``E_local = E / expert_shards`` experts and a batch shard of tokens.

  1. all-gather the tokens (and their top-k choices) of the ``expert`` axis, so
     each device sees every token of its data shard group;
  2. keep the assignments that go to *local* experts, sort them by expert and
     lay them out block-aligned (``grouped_matmul.make_block_layout``);
  3. run the expert MLP as grouped matmuls over the used blocks only;
  4. scatter the weighted outputs back onto tokens and reduce-scatter over the
     ``expert`` axis (each device gets its own tokens back, summed over the
     experts of all shards); psum over ``model`` when ``d_ff`` is sharded.

Communication is one all-gather and one reduce-scatter of ``[tokens, embed]``
-- the same volume as the two all-to-alls of the capacity path -- and nothing
is dropped. Without a mesh the same body runs with no collectives.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax.layers import blocked_ffn
from moe_jax.layers import experts as experts_lib
from moe_jax.layers import grouped_matmul as gmm_lib
from moe_jax.partitioning import BATCH_MESH_AXES

Array = jax.Array


def expert_weight_specs(weights: dict) -> dict:
  """shard_map specs of the stacked expert weights: experts over 'expert',
  the hidden dimension over 'model'."""
  return {name: (P("expert", "model", None) if name == "wo"
                 else P("expert", None, "model")) for name in weights}


def local_expert_mlp(x, expert_index, expert_weight, weights, *, activations,
                      num_experts_local, expert_offset, block, dropout_rate,
                      dropout_rng, backend):
  """Dropless MLP of the local experts for all the given tokens.

  Args:
    x: <float>[T, D] tokens.
    expert_index: <int32>[T, K] global expert ids chosen by each token.
    expert_weight: <float>[T, K] combine weights (0 for padding tokens).
    weights: local expert weights, ``wi*``: [E_local, D, F], ``wo``: [E_local, F, D].
    expert_offset: global id of the first local expert (traced).

  Returns:
    <float>[T, D] sum over local experts of weight * expert(x).
  """
  t, d = x.shape
  k = expert_index.shape[1]
  local = expert_index - expert_offset  # [T, K]
  is_local = (local >= 0) & (local < num_experts_local) & (expert_weight != 0)
  group = jnp.where(is_local, local, num_experts_local).reshape(-1)  # [A]
  token = jnp.repeat(jnp.arange(t, dtype=jnp.int32), k)  # [A]
  weight = expert_weight.reshape(-1)

  counts = jnp.bincount(group, length=num_experts_local + 1)[:num_experts_local]
  max_rows = t * min(k, num_experts_local) + num_experts_local * (block - 1)
  num_rows = -(-max_rows // block) * block
  layout = gmm_lib.make_block_layout(counts.astype(jnp.int32), num_rows, block)

  order = jnp.argsort(group, stable=True)  # local assignments first, by expert
  sorted_group = group[order]
  unpadded_start = jnp.cumsum(counts) - counts
  padded_start = jnp.cumsum(layout.group_sizes) - layout.group_sizes
  safe_group = jnp.minimum(sorted_group, num_experts_local - 1)
  rank = jnp.arange(order.shape[0], dtype=jnp.int32) - unpadded_start[safe_group]
  dest = jnp.where(sorted_group < num_experts_local,
                   padded_start[safe_group] + rank, num_rows)
  row_token = jnp.full((num_rows,), t, jnp.int32).at[dest].set(
      token[order], mode="drop")
  row_weight = jnp.zeros((num_rows,), x.dtype).at[dest].set(
      weight[order].astype(x.dtype), mode="drop")

  backend = backend or ("cpu" if jax.default_backend() == "cpu" else "ragged")
  if backend == "cpu":
    return blocked_ffn.expert_ffn_rows(x, row_token, row_weight, layout, weights,
                                       activations, dropout_rate, dropout_rng)
  # GPU/TPU: materialize the sorted rows and use a grouped-GEMM kernel.
  x_pad = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)], axis=0)
  rows = x_pad[row_token]  # [M, D]
  pre = [gmm_lib.grouped_matmul(rows, w, layout, backend)
         for w in experts_lib.input_kernels(weights)]
  h = experts_lib.dropout(experts_lib.hidden_activation(pre, activations),
                         dropout_rate, dropout_rng)
  out = gmm_lib.grouped_matmul(h, weights["wo"], layout, backend)  # [M, D]
  out = out * row_weight[:, None]
  y = jnp.zeros((t + 1, d), out.dtype).at[row_token].add(out)
  return y[:t]


def dropless_moe(x: Array, expert_index: Array, expert_weight: Array,
                 weights: dict[str, Array], *, activations: Sequence[str],
                 num_experts: int, block: int, mesh: Optional[Any],
                 dropout_rate: float = 0.0, dropout_rng: Optional[Array] = None,
                 backend: Optional[str] = None) -> Array:
  """Dropless MoE over flat tokens.

  Args:
    x: <float>[T, D], batch-sharded over ``('data', 'fsdp', 'expert')``.
    expert_index: <int32>[T, K]; expert_weight: <float>[T, K].
    weights: stacked expert weights (``ExpertWeights``).
    mesh: the current mesh, or None for a single-device computation.

  Returns:
    <float>[T, D].
  """
  kwargs = dict(activations=tuple(activations), block=block,
                dropout_rate=dropout_rate, backend=backend)
  if mesh is None:
    return local_expert_mlp(x, expert_index, expert_weight, weights,
                             num_experts_local=num_experts, expert_offset=0,
                             dropout_rng=dropout_rng, **kwargs)
  shape = dict(mesh.shape)
  n_expert = shape.get("expert", 1)
  n_model = shape.get("model", 1)
  e_local = num_experts // n_expert

  def body(x, idx, wt, weights):
    if n_expert > 1:
      x = jax.lax.all_gather(x, "expert", axis=0, tiled=True)
      idx = jax.lax.all_gather(idx, "expert", axis=0, tiled=True)
      wt = jax.lax.all_gather(wt, "expert", axis=0, tiled=True)
      offset = jax.lax.axis_index("expert") * e_local
    else:
      offset = 0
    rng = None
    if dropout_rng is not None:
      rng = dropout_rng
      for axis in ("data", "fsdp", "expert", "model"):
        if shape.get(axis, 1) > 1:
          rng = jax.random.fold_in(rng, jax.lax.axis_index(axis))
    y = local_expert_mlp(x, idx, wt, weights, num_experts_local=e_local,
                          expert_offset=offset, dropout_rng=rng, **kwargs)
    if n_model > 1:
      y = jax.lax.psum(y, "model")
    if n_expert > 1:
      y = jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)
    return y

  tok_spec = P(BATCH_MESH_AXES, None)
  fn = jax.shard_map(body, mesh=mesh,
                     in_specs=(tok_spec, tok_spec, tok_spec, expert_weight_specs(weights)),
                     out_specs=tok_spec, check_vma=False)
  return fn(x, expert_index, expert_weight, weights)

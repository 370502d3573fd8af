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
from moe_jax.layers import ep_exchange
from moe_jax.layers import expert_parallel
from moe_jax.layers import experts as experts_lib
from moe_jax.layers import grouped_matmul as gmm_lib

Array = jax.Array


def fold_in_device(rng: Array, mesh: Any) -> Array:
  """Inside ``shard_map``: ``rng`` folded with this device's mesh coordinates
  (every axis of size > 1, in mesh order), so devices draw independently."""
  for axis, size in dict(mesh.shape).items():
    if size > 1:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis))
  return rng


def kernel_for(mesh: Optional[Any]) -> str:
  """Grouped-matmul kernel of the mesh's platform: the blocked CPU loop on
  CPU, ``ragged_dot`` / tokamax on TPU and GPU (``grouped_matmul.py``)."""
  return "cpu" if expert_parallel.platform(mesh) == "cpu" else "ragged"


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
                 backend: Optional[str] = None, exchange: str = "all_gather",
                 buffer_factor: float = 1.5,
                 routes_per_token: Optional[int] = None) -> tuple[Array, Array]:
  """Dropless MoE over flat tokens.

  Args:
    x: <float>[T, D], batch-sharded over the logical ``batch`` axes.
    expert_index: <int32>[T, K]; expert_weight: <float>[T, K].
    weights: stacked expert weights (``ExpertWeights``).
    mesh: the current mesh, or None for a single-device computation.
    backend: grouped-matmul kernel (``grouped_matmul.py``); default: by the
      platform of ``mesh``'s devices.
    exchange: how tokens reach the expert shards: ``"all_gather"``,
      ``"all_to_all"`` or ``"ragged"`` (``ep_exchange.py``).
    buffer_factor: receive-buffer size of the last two, in multiples of the
      balanced load.
    routes_per_token: at most this many expert shards per token (device-
      limited routing guarantees it); sizes the exchange buffers. Default
      ``min(K, EP)``.

  Returns:
    ``(y <float>[T, D], overflow <float32>[])``: the fraction of real
    assignments that did not fit the exchange buffers (always 0 for
    ``"all_gather"`` and without a mesh).
  """
  if exchange not in ep_exchange.EXCHANGES:
    raise ValueError(f"Unknown dropless exchange {exchange!r}; use one of "
                     f"{ep_exchange.EXCHANGES}.")
  backend = backend or kernel_for(mesh)
  kwargs = dict(activations=tuple(activations), block=block,
                dropout_rate=dropout_rate, backend=backend)
  none = jnp.zeros((), jnp.float32)
  if mesh is None:
    return local_expert_mlp(x, expert_index, expert_weight, weights,
                            num_experts_local=num_experts, expert_offset=0,
                            dropout_rng=dropout_rng, **kwargs), none
  axes = expert_parallel.ExpertParallelAxes.from_rules()
  n_expert, n_model = axes.sizes(mesh)
  expert_axis = axes.collective_axis(axes.expert)
  model_axis = axes.collective_axis(axes.model)
  batch_axis = axes.collective_axis(axes.batch)
  e_local = num_experts // n_expert
  if n_expert == 1:
    exchange = "all_gather"  # nothing to exchange: every expert is local

  def mlp(rows, local_expert, weights, rng):
    """Results of received rows <float>[R, D] with local experts <int32>[R]
    (-1 = empty row, left zero), by this shard's expert ``weights``."""
    return local_expert_mlp(rows, local_expert[:, None],
                            (local_expert >= 0).astype(rows.dtype)[:, None], weights,
                            num_experts_local=e_local, expert_offset=0,
                            dropout_rng=rng, **kwargs)

  def gather_body(x, idx, wt, weights, rng):
    if n_expert > 1:
      x = jax.lax.all_gather(x, expert_axis, axis=0, tiled=True)
      idx = jax.lax.all_gather(idx, expert_axis, axis=0, tiled=True)
      wt = jax.lax.all_gather(wt, expert_axis, axis=0, tiled=True)
      offset = jax.lax.axis_index(expert_axis) * e_local
    else:
      offset = 0
    y = local_expert_mlp(x, idx, wt, weights, num_experts_local=e_local,
                         expert_offset=offset, dropout_rng=rng, **kwargs)
    if n_model > 1:
      y = jax.lax.psum(y, model_axis)
    if n_expert > 1:
      y = jax.lax.psum_scatter(y, expert_axis, scatter_dimension=0, tiled=True)
    return y, jnp.zeros((), jnp.float32)

  def routes(k):
    return min(k, n_expert, routes_per_token or k)

  def all_to_all_body(x, idx, wt, weights, rng):
    (t, k), d = idx.shape, x.shape[-1]
    p = ep_exchange.plan(idx, wt, e_local, n_expert)
    rows = ep_exchange.buffer_rows(t, routes(k), n_expert, buffer_factor)
    send_x, send_e, send_w, _ = ep_exchange.padded_send(x, p, rows)
    a2a = lambda v: jax.lax.all_to_all(v, expert_axis, 0, 0, tiled=True)  # noqa: E731
    y_rows = local_expert_mlp(
        a2a(send_x).reshape(-1, d), a2a(send_e).reshape(-1, k),
        a2a(send_w).reshape(-1, k).astype(x.dtype), weights, num_experts_local=e_local,
        expert_offset=0, dropout_rng=rng, **kwargs)
    back = a2a(y_rows.reshape(n_expert, rows, d)).reshape(-1, d)
    positions = ep_exchange.padded_positions(p, rows)
    return (ep_exchange.combine_routes(back, positions, t),
            ep_exchange.overflow_assignments(p, positions, n_expert * rows))

  def ragged_body(x, idx, wt, weights, rng):
    (t, k), d = idx.shape, x.shape[-1]
    p = ep_exchange.plan(idx, wt, e_local, n_expert)
    sent = t * routes(k)  # every route is among the first `sent` sorted slots
    capacity = ep_exchange.receive_rows(t, routes(k), n_expert, buffer_factor)
    me = jax.lax.axis_index(expert_axis)
    o = ep_exchange.ragged_offsets(
        jax.lax.all_gather(p.counts, expert_axis), me, capacity)
    starts_matrix = jax.lax.all_gather(p.starts, expert_axis)  # [src, dst]
    # Routes in destination order; the empty slots at the end are not sent.
    sorted_x, sorted_e, sorted_w = ep_exchange.gather_routes(x, p, p.order[:sent])

    def send(operand, output):
      return jax.lax.ragged_all_to_all(operand, output, p.starts, o["send_sizes"],
                                       o["output_offsets"], o["recv_sizes"],
                                       axis_name=expert_axis)

    y_rows = local_expert_mlp(
        send(sorted_x, jnp.zeros((capacity, d), x.dtype)),
        send(sorted_e, jnp.full((capacity, k), -1, jnp.int32)),
        send(sorted_w.astype(x.dtype), jnp.zeros((capacity, k), x.dtype)), weights,
        num_experts_local=e_local, expert_offset=0, dropout_rng=rng, **kwargs)
    back = jax.lax.ragged_all_to_all(
        y_rows, jnp.zeros((sent, d), y_rows.dtype), o["recv_offsets"],
        o["recv_sizes"], starts_matrix[:, me], o["send_sizes"], axis_name=expert_axis)
    positions = ep_exchange.ragged_positions(p, o["send_sizes"], sent)
    return (ep_exchange.combine_routes(back, positions, t),
            ep_exchange.overflow_assignments(p, positions, sent))

  body_of = {"all_gather": gather_body, "all_to_all": all_to_all_body,
             "ragged": ragged_body}[exchange]

  def body(x, idx, wt, weights):
    rng = None if dropout_rng is None else fold_in_device(dropout_rng, mesh)
    y, overflow = body_of(x, idx, wt, weights, rng)
    if exchange != "all_gather" and n_model > 1:
      y = jax.lax.psum(y, model_axis)
    real = jnp.sum((wt != 0).astype(jnp.float32))  # real assignments
    totals = jax.lax.psum(jnp.stack([overflow.astype(jnp.float32), real]), batch_axis)
    return y, totals[0] / jnp.maximum(totals[1], 1.0)

  tok_spec = axes.token_spec()
  fn = jax.shard_map(body, mesh=mesh,
                     in_specs=(tok_spec, tok_spec, tok_spec, axes.weight_specs(weights)),
                     out_specs=(tok_spec, P()), check_vma=False)
  return fn(x, expert_index, expert_weight, weights)

"""Fused dropless expert FFN for CPU: gather -> expert MLP -> weighted scatter, per row block.

Why a fused loop: the dropless buffer must be sized for the worst case (every
token picking a local expert), but on average only ``1 / expert_shards`` of it
is used. Materializing ``[rows, d_ff]`` activations for the whole buffer (as a
grouped matmul followed by an element-wise activation does) wastes memory
traffic and activation FLOPs on empty rows, and ``jax.lax.ragged_dot`` on CPU
computes every group densely. Here a ``while_loop`` visits only the used row
blocks; each block gathers its tokens, runs its expert's MLP, and adds the
weighted result onto its tokens. A custom VJP does the same per block in
reverse, recomputing the block's hidden activations (so no ``[rows, d_ff]``
residual is kept).

Layout contract (``grouped_matmul.make_block_layout``): row block ``b`` holds
tokens of expert ``block_group[b]`` only; padding rows point at token ``T``
(a zero row) with weight 0.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from moe_jax.layers import experts as experts_lib

Array = jax.Array


def _block_ffn(x_blk, ws, activations, dropout_rate, key):
  """Expert MLP on one block. x_blk [B, D]; ws = (wi..., wo) of one expert."""
  *wis, wo = ws
  pre = [jnp.dot(x_blk, w, preferred_element_type=jnp.float32).astype(x_blk.dtype)
         for w in wis]
  h = experts_lib.dropout(experts_lib.hidden_activation(pre, activations),
                         dropout_rate, key)
  return jnp.dot(h, wo, preferred_element_type=jnp.float32).astype(x_blk.dtype)


def _slice_block(arr, b, block):
  return jax.lax.dynamic_slice_in_dim(arr, b * block, block, axis=0)


def _expert_weights(weights, g):
  return tuple(jax.lax.dynamic_index_in_dim(w, g, axis=0, keepdims=False)
               for w in weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def blocked_expert_ffn(x, row_token, row_weight, block_group, num_blocks,
                       weights_and_key, block, activations, dropout_rate):
  """y[t] = sum over rows r with row_token[r] == t of row_weight[r] * FFN_g(x[t]).

  Args:
    x: <float>[T, D] tokens.
    row_token: <int32>[M] token of each row (T = padding).
    row_weight: <float>[M] combine weight of each row.
    block_group: <int32>[M // block] expert of each row block.
    num_blocks: <int32>[] used blocks.
    weights_and_key: (weights tuple ``(wi..., wo)`` each [E_local, ...],
      dropout key data <uint32>[2] or None).
    block: static block size; activations: static tuple; dropout_rate: static.

  Returns:
    <float>[T, D].
  """
  y, _ = _fwd(x, row_token, row_weight, block_group, num_blocks,
              weights_and_key, block, activations, dropout_rate)
  return y


def _key(key_data, b):
  return jax.random.fold_in(jax.random.wrap_key_data(key_data), b)


def _fwd(x, row_token, row_weight, block_group, num_blocks, weights_and_key,
         block, activations, dropout_rate):
  weights, key_data = weights_and_key
  t, d = x.shape
  x_pad = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)], axis=0)

  def body(b, y):
    tok = _slice_block(row_token, b, block)
    wt = _slice_block(row_weight, b, block).astype(x.dtype)
    key = _key(key_data, b) if dropout_rate > 0 else None
    out = _block_ffn(x_pad[tok], _expert_weights(weights, block_group[b]),
                     activations, dropout_rate, key)
    return y.at[tok].add(out * wt[:, None])

  y = jax.lax.fori_loop(0, num_blocks, body, jnp.zeros((t + 1, d), x.dtype))
  return y[:t], (x, row_token, row_weight, block_group, num_blocks, weights_and_key)


def _bwd(block, activations, dropout_rate, res, dy):
  x, row_token, row_weight, block_group, num_blocks, weights_and_key = res
  weights, key_data = weights_and_key
  t, d = x.shape
  x_pad = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)], axis=0)
  dy_pad = jnp.concatenate([dy, jnp.zeros((1, d), dy.dtype)], axis=0)

  def body(b, carry):
    dx, dwt, dws = carry
    tok = _slice_block(row_token, b, block)
    wt = _slice_block(row_weight, b, block)
    g = block_group[b]
    key = _key(key_data, b) if dropout_rate > 0 else None
    x_blk = x_pad[tok]
    ws = _expert_weights(weights, g)
    out, vjp = jax.vjp(
        lambda xb, ws: _block_ffn(xb, ws, activations, dropout_rate, key), x_blk, ws)
    dy_blk = dy_pad[tok]
    dwt_blk = jnp.sum(dy_blk.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    dx_blk, dws_blk = vjp((dy_blk * wt[:, None].astype(dy_blk.dtype)).astype(out.dtype))
    dx = dx.at[tok].add(dx_blk.astype(dx.dtype))
    dwt = jax.lax.dynamic_update_slice_in_dim(dwt, dwt_blk.astype(dwt.dtype), b * block, 0)
    dws = tuple(
        jax.lax.dynamic_update_index_in_dim(
            acc, jax.lax.dynamic_index_in_dim(acc, g, 0, keepdims=False)
            + dw.astype(acc.dtype), g, 0)
        for acc, dw in zip(dws, dws_blk))
    return dx, dwt, dws

  init = (jnp.zeros((t + 1, d), x.dtype), jnp.zeros_like(row_weight),
          tuple(jnp.zeros(w.shape, jnp.float32) for w in weights))
  dx, dwt, dws = jax.lax.fori_loop(0, num_blocks, body, init)
  dws = tuple(dw.astype(w.dtype) for dw, w in zip(dws, weights))
  return (dx[:t], None, dwt, None, None, (dws, None))


blocked_expert_ffn.defvjp(_fwd, _bwd)


def expert_ffn_rows(x: Array, row_token: Array, row_weight: Array, layout,
                    weights: dict, activations: Sequence[str],
                    dropout_rate: float = 0.0, dropout_rng=None) -> Array:
  """Convenience wrapper taking the ``ExpertWeights`` dict and a BlockLayout."""
  ws = tuple(experts_lib.input_kernels(weights)) + (weights["wo"],)
  key_data = (jax.random.key_data(dropout_rng)
              if (dropout_rate > 0 and dropout_rng is not None) else None)
  rate = dropout_rate if key_data is not None else 0.0
  return blocked_expert_ffn(x, row_token, row_weight, layout.block_group,
                            layout.num_blocks, (ws, key_data), layout.block,
                            tuple(activations), rate)

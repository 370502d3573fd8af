"""Grouped matrix multiply for dropless MoE (MegaBlocks' idea).

``grouped_matmul(lhs, rhs, layout)``: rows of ``lhs`` are sorted by group
(expert) and every group's rows start at a multiple of ``block`` (the layout
pads each group up to a block multiple with zero rows). Row block ``b`` is
multiplied by ``rhs[block_group[b]]``.

Backends:
  * CPU: a ``while_loop`` over the *used* blocks only (``num_blocks`` is a
    traced value), with a custom VJP that does the same for both gradients.
    ``jax.lax.ragged_dot`` on CPU computes every group densely (measured ~8x
    slower for 8 groups), and a static loop over the worst-case buffer would
    multiply mostly zero blocks when one device holds few experts.
  * GPU/TPU: ``tokamax.ragged_dot`` when installed, else
    ``jax.lax.ragged_dot`` (which lowers to a grouped-GEMM kernel there), with
    the padded group sizes of the same layout.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class BlockLayout(NamedTuple):
  """Where each group's rows sit in the padded row buffer.

  Attributes:
    group_sizes: <int32>[G] rows per group, each padded up to a multiple of
      ``block`` (so the groups tile the first ``sum(group_sizes)`` rows).
    block_group: <int32>[M // block] group of every row block (blocks past
      the used ones repeat the last group; they are never computed).
    num_blocks: <int32>[] number of used blocks.
    block: static block size.
  """
  group_sizes: Array
  block_group: Array
  num_blocks: Array
  block: int


def make_block_layout(counts: Array, num_rows: int, block: int) -> BlockLayout:
  """Layout for groups of ``counts`` rows in a buffer of ``num_rows`` rows.

  Args:
    counts: <int32>[G] rows per group (unpadded).
    num_rows: static buffer size, a multiple of ``block``.
    block: block size.
  """
  if num_rows % block:
    raise ValueError(f"num_rows={num_rows} must be a multiple of block={block}.")
  padded = ((counts + block - 1) // block) * block
  ends = jnp.cumsum(padded)
  starts = jnp.arange(num_rows // block, dtype=jnp.int32) * block
  block_group = jnp.searchsorted(ends, starts, side="right").astype(jnp.int32)
  block_group = jnp.minimum(block_group, counts.shape[0] - 1)
  return BlockLayout(padded.astype(jnp.int32), block_group,
                     (ends[-1] // block).astype(jnp.int32), block)


def _blocked_matmul(lhs, rhs, block_group, num_blocks, block, transpose_rhs):
  """out[blk] = lhs[blk] @ rhs[g] (or rhs[g].T) for used blocks; zeros elsewhere."""
  m = lhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  out = jnp.zeros((m, n), lhs.dtype)

  def body(b, out):
    x = jax.lax.dynamic_slice_in_dim(lhs, b * block, block, axis=0)
    w = jax.lax.dynamic_index_in_dim(rhs, block_group[b], axis=0, keepdims=False)
    if transpose_rhs:
      y = jnp.dot(x, w.T, preferred_element_type=jnp.float32)
    else:
      y = jnp.dot(x, w, preferred_element_type=jnp.float32)
    return jax.lax.dynamic_update_slice_in_dim(out, y.astype(out.dtype), b * block, axis=0)

  return jax.lax.fori_loop(0, num_blocks, body, out)


def _blocked_weight_grad(lhs, dout, block_group, num_blocks, block, num_groups):
  """drhs[g] = sum over blocks of group g of lhs[blk].T @ dout[blk]."""
  k, n = lhs.shape[1], dout.shape[1]
  grad = jnp.zeros((num_groups, k, n), jnp.float32)

  def body(b, grad):
    x = jax.lax.dynamic_slice_in_dim(lhs, b * block, block, axis=0)
    dy = jax.lax.dynamic_slice_in_dim(dout, b * block, block, axis=0)
    g = block_group[b]
    cur = jax.lax.dynamic_index_in_dim(grad, g, axis=0, keepdims=True)
    upd = cur + jnp.dot(x.T, dy, preferred_element_type=jnp.float32)[None]
    return jax.lax.dynamic_update_index_in_dim(grad, upd[0], g, axis=0)

  return jax.lax.fori_loop(0, num_blocks, body, grad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _cpu_gmm(lhs, rhs, block_group, num_blocks, block):
  return _blocked_matmul(lhs, rhs, block_group, num_blocks, block, False)


def _cpu_gmm_fwd(lhs, rhs, block_group, num_blocks, block):
  out = _blocked_matmul(lhs, rhs, block_group, num_blocks, block, False)
  return out, (lhs, rhs, block_group, num_blocks)


def _cpu_gmm_bwd(block, res, dout):
  lhs, rhs, block_group, num_blocks = res
  dlhs = _blocked_matmul(dout.astype(lhs.dtype), rhs, block_group, num_blocks,
                         block, True)
  drhs = _blocked_weight_grad(lhs, dout.astype(lhs.dtype), block_group,
                              num_blocks, block, rhs.shape[0]).astype(rhs.dtype)
  return dlhs, drhs, None, None


_cpu_gmm.defvjp(_cpu_gmm_fwd, _cpu_gmm_bwd)


def _ragged_dot(lhs, rhs, group_sizes):
  try:
    import tokamax  # pylint: disable=g-import-not-at-top
    return tokamax.ragged_dot(lhs, rhs, group_sizes=group_sizes)
  except ImportError:
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)


def grouped_matmul(lhs: Array, rhs: Array, layout: BlockLayout,
                   backend: str) -> Array:
  """Grouped matmul over a block layout.

  Args:
    lhs: <float>[M, K] rows sorted by group, groups block-aligned, zero padding.
    rhs: <float>[G, K, N] one matrix per group.
    layout: from ``make_block_layout``.
    backend: ``"cpu"`` (blocked loop) or ``"ragged"`` (ragged_dot / tokamax);
      choose by the platform of the mesh's devices (``dropless.kernel_for``),
      not ``jax.default_backend()``, which is the host's under ``moe-compile``.

  Returns:
    <float>[M, N]; rows outside the used blocks are zero.
  """
  if backend == "cpu":
    return _cpu_gmm(lhs, rhs, layout.block_group, layout.num_blocks, layout.block)
  if backend == "ragged":
    return _ragged_dot(lhs, rhs, layout.group_sizes)
  raise ValueError(f"Unknown grouped_matmul backend {backend!r}; use 'cpu' or 'ragged'.")

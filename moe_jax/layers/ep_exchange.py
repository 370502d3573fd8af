"""Expert-parallel token exchange of the dropless compute.

Inside ``shard_map`` a device holds ``T`` tokens, their top-``K`` choices and
``E_local = E / EP`` experts (``EP`` = expert-parallel shards). The dropless
compute needs every assignment computed by the shard that owns its expert.
Three exchanges, one result (``MoeConfig.dropless_exchange``):

* ``"all_gather"`` -- every shard gathers every token of its expert group and
  keeps the assignments to its experts; a reduce-scatter brings the sums
  back. Simple and fastest at small ``EP``, but each shard receives ``EP x``
  the tokens it needs: bytes and temporary memory grow with ``EP``.
* ``"all_to_all"`` -- the assignments are sorted by destination shard and
  sent in a fixed-size buffer of ``B ~ factor * T * K / EP`` rows per peer
  (:func:`buffer_rows`; ``factor = dropless_buffer_factor``, MaxText's
  ``ragged_buffer_factor``) with one ``all_to_all``, computed, and sent back
  with another. Runs on every backend. Assignments beyond a peer's ``B`` rows
  are *overflow*: not computed, counted and reported as the layer's
  ``dropped_fraction`` (so never silent).
* ``"ragged"`` -- the same exchange with ``jax.lax.ragged_all_to_all``: each
  device sends exactly its assignments to each peer (offsets from the routing
  counts) into a receive buffer of ``~ factor * T * K`` rows, and the
  results come back the same way. TPU/GPU only (XLA:CPU has no
  ragged-all-to-all).

The index math (:func:`plan`, :func:`ragged_offsets`) is plain arrays so it
is checked against a NumPy model of ``ragged_all_to_all`` on CPU.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

Array = jax.Array

EXCHANGES = ("all_gather", "all_to_all", "ragged")


@dataclasses.dataclass(frozen=True)
class Plan:
  """Where a device's assignments go (all per device, inside ``shard_map``).

  Attributes:
    order: <int32>[A] assignment ids (``token * K + k``) sorted by destination
      shard, then local expert; unsent assignments (weight 0) last.
    dest: <int32>[A] destination shard of each assignment (``EP`` = not sent).
    local_expert: <int32>[A] expert id within its shard (``E_local`` = none).
    counts: <int32>[EP] assignments sent to each shard.
    starts: <int32>[EP] first sorted position of each shard's assignments.
  """
  order: Array
  dest: Array
  local_expert: Array
  counts: Array
  starts: Array


def plan(expert_index: Array, expert_weight: Array, num_experts_local: int,
         num_shards: int) -> Plan:
  """Sorts a device's assignments by destination shard.

  Args:
    expert_index: <int32>[T, K] global expert of each assignment.
    expert_weight: <float>[T, K] its combine weight; 0 (padding) is not sent.
  """
  e_local, ep = num_experts_local, num_shards
  index = expert_index.reshape(-1)
  sent = expert_weight.reshape(-1) != 0
  dest = jnp.where(sent, index // e_local, ep).astype(jnp.int32)
  local_expert = jnp.where(sent, index % e_local, e_local).astype(jnp.int32)
  order = jnp.argsort(dest * (e_local + 1) + local_expert, stable=True).astype(jnp.int32)
  counts = jnp.bincount(dest, length=ep + 1)[:ep].astype(jnp.int32)
  return Plan(order, dest, local_expert, counts, jnp.cumsum(counts) - counts)


def _pad_row(a: Array) -> Array:
  return jnp.concatenate([a, jnp.zeros((1,) + a.shape[1:], a.dtype)], axis=0)


def unpermute(rows: Array, positions: Array, expert_weight: Array) -> Array:
  """Weighted sum over each token's ``K`` assignments of their result rows.

  Args:
    rows: <float>[R, D] results; positions: <int32>[A] row of each
      assignment (``R`` = none, contributes zero); expert_weight: [T, K].
  Returns:
    <float>[T, D].
  """
  t, k = expert_weight.shape
  per_assignment = _pad_row(rows)[positions].reshape(t, k, -1)
  return jnp.einsum("tkd,tk->td", per_assignment, expert_weight.astype(rows.dtype))


def buffer_rows(tokens: int, k: int, num_shards: int, factor: float) -> int:
  """Receive rows per peer: ``ceil(factor * m + 4 sqrt(m))``, ``m = T * K / EP``.

  ``m`` is the balanced load. ``factor`` covers routing imbalance; the
  ``4 sqrt(m)`` term covers the chance fluctuation of a balanced router's
  load (its standard deviation is about ``sqrt(m)``), which dominates when
  ``m`` is small. Never more than ``T * K`` (everything to one peer).
  """
  m = tokens * k / num_shards
  return max(1, min(tokens * k, math.ceil(factor * m + 4.0 * math.sqrt(m))))


def receive_rows(tokens: int, k: int, num_shards: int, factor: float) -> int:
  """Receive rows per device of the ragged exchange: as :func:`buffer_rows`
  for the balanced total ``m = T * K``, never more than ``EP * T * K``."""
  m = tokens * k
  return max(1, min(num_shards * m, math.ceil(factor * m + 4.0 * math.sqrt(m))))


def padded_send(x: Array, p: Plan, k: int, rows: int) -> tuple[Array, Array, Array]:
  """The send buffers of the fixed-size exchange.

  Returns:
    ``(send_x <float>[EP, B, D], send_expert <int32>[EP, B], overflow <int32>[])``:
    peer ``j``'s rows are its first ``min(counts[j], B)`` assignments in
    sorted order; empty rows have expert ``-1`` (never computed).
  """
  t = x.shape[0]
  a = p.order.shape[0]
  pos = p.starts[:, None] + jnp.arange(rows, dtype=jnp.int32)[None, :]  # [EP, B]
  valid = jnp.arange(rows)[None, :] < p.counts[:, None]
  assignment = jnp.where(valid, p.order[jnp.clip(pos, 0, a - 1)], a)
  token = jnp.where(valid, assignment // k, t)
  send_x = _pad_row(x)[token]
  send_expert = jnp.where(valid, _pad_row(p.local_expert)[assignment], -1)
  overflow = jnp.sum(jnp.maximum(p.counts - rows, 0))
  return send_x, send_expert, overflow


def padded_positions(p: Plan, rows: int) -> Array:
  """<int32>[A]: each assignment's row in the returned ``[EP * B, D]`` buffer,
  ``EP * B`` when it was not sent or overflowed."""
  ep = p.counts.shape[0]
  rank = jnp.argsort(p.order).astype(jnp.int32)  # sorted position of each assignment
  dest = jnp.minimum(p.dest, ep - 1)
  offset = rank - p.starts[dest]
  ok = (p.dest < ep) & (offset < rows)
  return jnp.where(ok, dest * rows + offset, ep * rows)


def ragged_offsets(counts_matrix: Array, me: Array, capacity: int):
  """Offsets and sizes of both ragged exchanges, from all devices' counts.

  Args:
    counts_matrix: <int32>[EP, EP], ``[src, dst]`` = assignments ``src``
      sends to ``dst`` (every device has the whole matrix).
    me: this device's index on the expert axes.
    capacity: receive-buffer rows per device.
  Returns:
    A dict of <int32>[EP] arrays for this device: ``send_sizes`` (what it
    sends each peer, cut to fit the peer's buffer), ``output_offsets``
    (where those rows land on each peer), ``recv_sizes`` / ``recv_offsets``
    (what it receives from each peer and where it lands here), and
    ``overflow`` <int32>[] (its assignments that did not fit).
  """
  before = jnp.cumsum(counts_matrix, axis=0) - counts_matrix  # rows from lower srcs
  fits = lambda offset, size: jnp.clip(capacity - offset, 0, size)  # noqa: E731
  send_sizes = fits(before[me], counts_matrix[me])
  recv_offsets = before[:, me]
  recv_sizes = fits(recv_offsets, counts_matrix[:, me])
  return dict(send_sizes=send_sizes, output_offsets=before[me],
              recv_sizes=recv_sizes, recv_offsets=recv_offsets,
              overflow=jnp.sum(counts_matrix[me] - send_sizes))


def ragged_positions(p: Plan, send_sizes: Array) -> Array:
  """<int32>[A]: each assignment's row in the returned ``[A, D]`` buffer (its
  sorted position), ``A`` when it was not sent or did not fit."""
  ep = p.counts.shape[0]
  a = p.order.shape[0]
  rank = jnp.argsort(p.order).astype(jnp.int32)
  dest = jnp.minimum(p.dest, ep - 1)
  ok = (p.dest < ep) & (rank - p.starts[dest] < send_sizes[dest])
  return jnp.where(ok, rank, a)

"""Expert-parallel token exchange of the dropless compute.

Inside ``shard_map`` a device holds ``T`` tokens, their top-``K`` choices and
``E_local = E / EP`` experts (``EP`` = expert-parallel shards). The dropless
compute needs every assignment computed by the shard that owns its expert.
Three exchanges, one result (``MoeConfig.dropless_exchange``):

* ``"all_gather"`` -- every shard gathers every token of its expert group and
  keeps the assignments to its experts; a reduce-scatter brings the sums
  back. Simple and fastest at small ``EP``, but each shard receives ``EP x``
  the tokens it needs: bytes and temporary memory grow with ``EP``.
* ``"all_to_all"`` -- each token is sent *once* to each shard that holds at
  least one of its experts (a *route*: a (token, shard) pair), with the
  shard-local expert ids and combine weights of its assignments there. The
  shard computes the weighted sum of those experts and sends one row back.
  Routes go in a fixed-size buffer of ``B`` rows per peer (:func:`buffer_rows`,
  ``~ dropless_buffer_factor x`` the balanced load; MaxText's
  ``ragged_buffer_factor``) with one ``all_to_all`` each way. Runs on every
  backend. Routes beyond a peer's ``B`` rows *overflow*: not computed,
  counted and reported as the layer's ``dropped_fraction`` (never silent).
* ``"ragged"`` -- the same routes with ``jax.lax.ragged_all_to_all``: each
  device sends exactly its routes to each peer (offsets from the routing
  counts) into a receive buffer of ``~ factor x`` the balanced total
  (:func:`receive_rows`), and the results come back the same way. TPU/GPU
  only (XLA:CPU has no ragged-all-to-all).

Because a route carries all of a token's experts on one shard, the bytes
moved are ``2 x routes x D``: at most ``K`` rows per token, and at most ``M``
with device-limited routing (``routing_groups_per_token = M``), which is what
that routing saves.

The index math (:func:`plan`, :func:`ragged_offsets`) is plain arrays, so it
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
  """A device's routes (inside ``shard_map``).

  A route is a (token, destination shard) pair with at least one of the
  token's assignments on that shard. Token ``t`` has up to ``K`` routes, in
  route slots ``t * K + r`` (``r``-th distinct shard among its choices), so
  every array is ``O(T * K)`` whatever ``EP`` is.

  Attributes:
    order: <int32>[T * K] route slots sorted by destination shard; empty
      slots (no route) last.
    present: <bool>[T * K] whether the slot holds a route.
    dest: <int32>[T * K] its destination shard (``EP`` when empty).
    expert: <int32>[T * K, K] the route's local expert ids (-1 = none).
    weight: <float>[T * K, K] their combine weights (0 = none).
    counts: <int32>[EP] routes to each shard.
    starts: <int32>[EP] first sorted position of each shard's routes.
  """
  order: Array
  present: Array
  dest: Array
  expert: Array
  weight: Array
  counts: Array
  starts: Array


def plan(expert_index: Array, expert_weight: Array, num_experts_local: int,
         num_shards: int) -> Plan:
  """A device's routes, sorted by destination shard.

  Args:
    expert_index: <int32>[T, K] global expert of each assignment.
    expert_weight: <float>[T, K] its combine weight; 0 (padding) is not sent.
  """
  t, k = expert_index.shape
  ep = num_shards
  real = expert_weight != 0
  shard = jnp.where(real, expert_index // num_experts_local, ep)  # [T, K]
  by_shard = jnp.sort(shard, axis=-1)
  first = jnp.concatenate([jnp.ones((t, 1), bool), by_shard[:, 1:] != by_shard[:, :-1]],
                          axis=-1)
  present = first & (by_shard < ep)  # [T, K] route slots
  dest = jnp.where(present, by_shard, ep)
  # Assignment j of token t belongs to route slot r when their shards match.
  member = (shard[:, None, :] == dest[:, :, None]) & present[..., None]  # [T, R, K]
  expert = jnp.where(member, (expert_index % num_experts_local)[:, None, :], -1)
  weight = jnp.where(member, expert_weight[:, None, :],
                     jnp.zeros((), expert_weight.dtype))
  dest = dest.reshape(-1).astype(jnp.int32)
  order = jnp.argsort(dest, stable=True).astype(jnp.int32)
  counts = jnp.bincount(dest, length=ep + 1)[:ep].astype(jnp.int32)
  return Plan(order, present.reshape(-1), dest, expert.reshape(t * k, k).astype(jnp.int32),
              weight.reshape(t * k, k), counts, jnp.cumsum(counts) - counts)


def _pad_row(a: Array) -> Array:
  return jnp.concatenate([a, jnp.zeros((1,) + a.shape[1:], a.dtype)], axis=0)


def buffer_rows(tokens: int, k: int, num_shards: int, factor: float) -> int:
  """Receive rows per peer: ``ceil(factor * m + 4 sqrt(m))``, ``m = T * K / EP``.

  ``m`` bounds the balanced load of routes (a token's ``K`` assignments make
  at most ``K`` routes). ``factor`` covers routing imbalance; the
  ``4 sqrt(m)`` term covers the chance fluctuation of a balanced router's
  load (its standard deviation is about ``sqrt(m)``), which dominates when
  ``m`` is small. Never more than ``T`` (every token, once).
  """
  m = tokens * min(k, num_shards) / num_shards
  return max(1, min(tokens, math.ceil(factor * m + 4.0 * math.sqrt(m))))


def receive_rows(tokens: int, k: int, num_shards: int, factor: float) -> int:
  """Receive rows per device of the ragged exchange: as :func:`buffer_rows`
  for the balanced total ``m = T * min(K, EP)``, never more than ``EP * T``."""
  m = tokens * min(k, num_shards)
  return max(1, min(num_shards * tokens, math.ceil(factor * m + 4.0 * math.sqrt(m))))


def gather_routes(x: Array, p: Plan, route: Array) -> tuple[Array, Array, Array]:
  """Rows of the given route slots (``T * K`` = empty): ``(x rows <float>[R, D],
  local experts <int32>[R, K] (-1 = none), weights <float>[R, K])``."""
  k = p.expert.shape[1]
  token = jnp.minimum(route // k, x.shape[0])
  empty_e = jnp.full((1, k), -1, jnp.int32)
  rows_x = _pad_row(x)[token]
  rows_e = jnp.concatenate([p.expert, empty_e])[route]
  rows_w = _pad_row(p.weight)[route]
  return rows_x, rows_e, rows_w


def padded_send(x: Array, p: Plan, rows: int):
  """Send buffers of the fixed-size exchange, ``[EP, B, ...]``.

  Returns:
    ``(send_x <float>[EP, B, D], send_expert <int32>[EP, B, K], send_weight
    <float>[EP, B, K], overflow <int32>[])``: peer ``j``'s rows are its first
    ``min(counts[j], B)`` routes in sorted order; empty rows have no expert.
  """
  n = p.order.shape[0]
  pos = p.starts[:, None] + jnp.arange(rows, dtype=jnp.int32)[None, :]  # [EP, B]
  valid = jnp.arange(rows)[None, :] < p.counts[:, None]
  route = jnp.where(valid, p.order[jnp.clip(pos, 0, n - 1)], n)
  send_x, send_e, send_w = gather_routes(x, p, route.reshape(-1))
  shape = route.shape
  overflow = jnp.sum(jnp.maximum(p.counts - rows, 0))
  return (send_x.reshape(shape + send_x.shape[1:]), send_e.reshape(shape + (-1,)),
          send_w.reshape(shape + (-1,)), overflow)


def combine_routes(rows: Array, positions: Array, tokens: int) -> Array:
  """Each token's sum of its returned route rows.

  Args:
    rows: <float>[R, D] returned results (already weighted by the receiver).
    positions: <int32>[T * K] row of each route slot (``R`` = none, adds
      zero); slots ``t * K ... t * K + K - 1`` are token ``t``'s.
  Returns:
    <float>[T, D].
  """
  per_route = _pad_row(rows)[positions]  # [T * EP, D]
  return per_route.reshape(tokens, -1, rows.shape[-1]).sum(axis=1)


def padded_positions(p: Plan, rows: int) -> Array:
  """<int32>[T * K]: each route slot's row in the returned ``[EP * B, D]``
  buffer, ``EP * B`` when it is empty or overflowed."""
  ep = p.counts.shape[0]
  rank = jnp.argsort(p.order).astype(jnp.int32)  # sorted position of each slot
  shard = jnp.minimum(p.dest, ep - 1)
  offset = rank - p.starts[shard]
  ok = p.present & (offset < rows)
  return jnp.where(ok, shard * rows + offset, ep * rows)


def ragged_offsets(counts_matrix: Array, me: Array, capacity: int):
  """Offsets and sizes of both ragged exchanges, from all devices' counts.

  Args:
    counts_matrix: <int32>[EP, EP], ``[src, dst]`` = routes ``src`` sends to
      ``dst`` (every device has the whole matrix).
    me: this device's index on the expert axes.
    capacity: receive-buffer rows per device.
  Returns:
    A dict of <int32>[EP] arrays for this device: ``send_sizes`` (what it
    sends each peer, cut to fit the peer's buffer), ``output_offsets``
    (where those rows land on each peer), ``recv_sizes`` / ``recv_offsets``
    (what it receives from each peer and where it lands here), and
    ``overflow`` <int32>[] (its routes that did not fit).
  """
  before = jnp.cumsum(counts_matrix, axis=0) - counts_matrix  # rows from lower srcs
  fits = lambda offset, size: jnp.clip(capacity - offset, 0, size)  # noqa: E731
  send_sizes = fits(before[me], counts_matrix[me])
  recv_offsets = before[:, me]
  recv_sizes = fits(recv_offsets, counts_matrix[:, me])
  return dict(send_sizes=send_sizes, output_offsets=before[me],
              recv_sizes=recv_sizes, recv_offsets=recv_offsets,
              overflow=jnp.sum(counts_matrix[me] - send_sizes))


def ragged_positions(p: Plan, send_sizes: Array, rows: int = 0) -> Array:
  """<int32>[T * K]: each route slot's row in the returned ``[rows, D]``
  buffer (its sorted position), ``rows`` when empty or it did not fit.
  ``rows`` (default ``T * K``) must hold every route."""
  ep = p.counts.shape[0]
  n = rows or p.order.shape[0]
  rank = jnp.argsort(p.order).astype(jnp.int32)
  shard = jnp.minimum(p.dest, ep - 1)
  ok = p.present & (rank - p.starts[shard] < send_sizes[shard])
  return jnp.where(ok, rank, n)


def overflow_assignments(p: Plan, positions: Array, absent: int) -> Array:
  """<float32>[]: real assignments whose route was not computed."""
  lost = p.present & (positions == absent)
  return jnp.sum(jnp.sum((p.weight != 0), axis=-1) * lost).astype(jnp.float32)

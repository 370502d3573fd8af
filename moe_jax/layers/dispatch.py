"""Dispatch strategies of the capacity compute: tokens -> expert slots -> tokens.

One interface (:class:`Dispatcher`), chosen by ``MoeConfig.dispatch``::

    dispatch(x <float>[G, S, D], decision) -> <float>[E, G, C, D]
    combine(out <float>[E, G, C, D], decision) -> <float>[G, S, D]

Every strategy gives the same values (up to float summation order) and the
same all-to-alls: the capacity compute moves the ``[E, G, C, D]`` slots
between the batch and the expert mesh axes around the expert matmuls, so
the collectives do not depend on how the slots were filled, and no strategy
touches the expert weights. All work per group (``G`` is a batch dimension
of every gather), so each device's groups stay on the device.

* ``"scatter"`` -- gather the group's tokens by ``slot_token``; combine by a
  weighted scatter-add. Autodiff makes the backward a scatter-add (dispatch)
  and a gather (combine).
* ``"gather"`` -- the same forward gathers in both directions (combine reads
  each token's ``K`` slots through the router's ``token_slot``), with custom
  VJPs whose backward passes are gathers too: slot -> token and token -> slot
  are inverse index maps, so no scatter is ever needed. Needs
  ``decision.token_slot`` (tokens-choose routers); falls back to
  ``"scatter"`` without it.
* ``"einsum"`` -- GShard / flaxformer: a one-hot ``[G, E, C, S]`` dispatch
  mask and two einsums; ``2 * G*E*C*S*D`` extra FLOPs each way, but dense
  matmuls.
* ``"sort"`` -- MaxText's permute/unpermute: argsort the assignments by
  slot, take the sorted rows, segment them into ``[E, C]`` by each expert's
  start offset, and unpermute with the inverse permutation (``take``;
  autodiff gives scatter-adds in the backward).

``"auto"`` picks per backend by the devices of the mesh (not
``jax.default_backend()``: ``moe-compile`` compiles TPU programs on a CPU
host); the choice and the measurements behind it are in
``docs/moe_layer.md``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Protocol

import jax
import jax.numpy as jnp

from moe_jax.layers import grouping

Array = jax.Array


class Dispatcher(Protocol):
  """Moves tokens into expert slots and back."""

  def dispatch(self, x: Array, decision) -> Array:
    """<float>[G, S, D] -> <float>[E, G, C, D] (empty slots zero)."""
    ...

  def combine(self, out: Array, decision) -> Array:
    """<float>[E, G, C, D] -> <float>[G, S, D], weighted by the slot weights."""
    ...


def _pad_row(a: Array, axis: int) -> Array:
  """``a`` with one zero row appended along ``axis`` (the target of empty /
  dropped indices)."""
  pad = [(0, 0)] * a.ndim
  pad[axis] = (0, 1)
  return jnp.pad(a, pad)


# --- "scatter" ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ScatterCombine:
  """Indexed gather into slots, weighted scatter-add back."""

  def dispatch(self, x, decision):
    return grouping.gather_slots(x, decision.slot_token, expert_major=True)

  def combine(self, out, decision):
    return grouping.combine_slots(out, decision.slot_token, decision.slot_weight,
                                  decision.token_mask.shape[1], expert_major=True)


# --- "gather": gathers both ways, forward and backward --------------------------
def _slots_of_tokens(x: Array, slot_token: Array) -> Array:
  """<float>[G, S, D], <int32>[G, E, C] -> <float>[E, G, C, D] (S = empty)."""
  return jax.vmap(lambda t, idx: t[idx], out_axes=1)(_pad_row(x, 1), slot_token)


def _sum_token_slots(slots: Array, token_slot: Array) -> Array:
  """<float>[E, G, C, D], <int32>[G, S, K] -> <float>[G, S, D]: each token's
  sum over its K slots (``E * C`` = dropped, contributes zero)."""
  e, _, c, d = slots.shape

  def one(slots_g, idx):  # [E, C, D], [S, K]
    return _pad_row(slots_g.reshape(e * c, d), 0)[idx].sum(axis=1)

  return jax.vmap(one, in_axes=(1, 0))(slots, token_slot)


@jax.custom_vjp
def gather_dispatch(x: Array, slot_token: Array, token_slot: Array) -> Array:
  """Tokens into slots; the backward sums each token's slot gradients (a gather)."""
  del token_slot
  return _slots_of_tokens(x, slot_token)


def _gather_dispatch_fwd(x, slot_token, token_slot):
  return _slots_of_tokens(x, slot_token), (slot_token, token_slot)


def _gather_dispatch_bwd(res, d_slots):
  _, token_slot = res
  return _sum_token_slots(d_slots, token_slot), None, None


gather_dispatch.defvjp(_gather_dispatch_fwd, _gather_dispatch_bwd)


@jax.custom_vjp
def gather_combine(out: Array, slot_weight: Array, slot_token: Array,
                   token_slot: Array) -> Array:
  """``y[g, s] = sum_k (w * out)[slot of (g, s, k)]``; backward by gathers.

  Args:
    out: <float>[E, G, C, D]; slot_weight: <float32>[G, E, C];
    slot_token: <int32>[G, E, C]; token_slot: <int32>[G, S, K].
  Returns:
    <float>[G, S, D].
  """
  weighted = out * jnp.swapaxes(slot_weight, 0, 1)[..., None].astype(out.dtype)
  return _sum_token_slots(weighted, token_slot)


def _gather_combine_fwd(out, slot_weight, slot_token, token_slot):
  return (gather_combine(out, slot_weight, slot_token, token_slot),
          (out, slot_weight, slot_token))


def _gather_combine_bwd(res, dy):
  out, slot_weight, slot_token = res
  dy_slots = _slots_of_tokens(dy, slot_token)  # each slot's token's gradient
  w = jnp.swapaxes(slot_weight, 0, 1)[..., None]
  d_out = (dy_slots * w.astype(dy_slots.dtype)).astype(out.dtype)
  d_weight = jnp.sum(dy_slots.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  return d_out, jnp.swapaxes(d_weight, 0, 1).astype(slot_weight.dtype), None, None


gather_combine.defvjp(_gather_combine_fwd, _gather_combine_bwd)


@dataclasses.dataclass(frozen=True)
class GatherBothWays:
  """Index gathers in both directions (custom VJPs); no scatter anywhere."""

  def dispatch(self, x, decision):
    if decision.token_slot is None:
      return ScatterCombine().dispatch(x, decision)
    return gather_dispatch(x, decision.slot_token, decision.token_slot)

  def combine(self, out, decision):
    if decision.token_slot is None:
      return ScatterCombine().combine(out, decision)
    return gather_combine(out, decision.slot_weight, decision.slot_token,
                          decision.token_slot)


# --- "einsum": GShard / flaxformer one-hot masks --------------------------------
@dataclasses.dataclass(frozen=True)
class OneHotEinsum:
  """Dispatch and combine as einsums with a one-hot ``[G, E, C, S]`` mask."""

  def _mask(self, decision, dtype):
    s = decision.token_mask.shape[1]
    return jax.nn.one_hot(decision.slot_token, s, dtype=dtype)  # empty slot -> 0

  def dispatch(self, x, decision):
    return jnp.einsum("gecs,gsd->egcd", self._mask(decision, x.dtype), x)

  def combine(self, out, decision):
    weights = (self._mask(decision, out.dtype)
               * decision.slot_weight[..., None].astype(out.dtype))
    return jnp.einsum("gecs,egcd->gsd", weights, out)


# --- "sort": MaxText-style permute / unpermute ----------------------------------
@dataclasses.dataclass(frozen=True)
class SortPermute:
  """Argsort assignments by slot, take, segment into ``[E, C]``, unpermute."""

  def _layout(self, decision):
    """Per group: the assignment order sorted by slot, and for each slot the
    sorted position that fills it (``A`` = empty)."""
    g, e, c = decision.slot_token.shape
    s = decision.token_mask.shape[1]
    flat = decision.token_slot.reshape(g, -1)  # [G, A], A = S * K
    order = jnp.argsort(flat, axis=-1, stable=True)
    counts = jnp.sum(decision.slot_token < s, axis=-1)  # [G, E] filled slots
    starts = jnp.cumsum(counts, axis=-1) - counts
    pos = jnp.arange(c)
    src = jnp.where(pos[None, None] < counts[..., None], starts[..., None] + pos,
                    flat.shape[1])  # [G, E, C]
    return order, src

  def dispatch(self, x, decision):
    if decision.token_slot is None:
      return ScatterCombine().dispatch(x, decision)
    k = decision.token_slot.shape[-1]
    order, src = self._layout(decision)
    rows = jnp.take_along_axis(x, (order // k)[..., None], axis=1)  # permute [G, A, D]
    return jax.vmap(lambda r, i: r[i], out_axes=1)(_pad_row(rows, 1), src)

  def combine(self, out, decision):
    if decision.token_slot is None:
      return ScatterCombine().combine(out, decision)
    g, s, k = decision.token_slot.shape
    e, _, c, d = out.shape
    order, _ = self._layout(decision)
    weighted = out * jnp.swapaxes(decision.slot_weight, 0, 1)[..., None].astype(out.dtype)
    sorted_slot = jnp.take_along_axis(decision.token_slot.reshape(g, -1), order, axis=1)
    rows = jax.vmap(lambda o, i: _pad_row(o.reshape(e * c, d), 0)[i], in_axes=(1, 0))(
        weighted, sorted_slot)  # [G, A, D] in sorted order
    inverse = jnp.argsort(order, axis=-1)
    per_assignment = jnp.take_along_axis(rows, inverse[..., None], axis=1)  # unpermute
    return per_assignment.reshape(g, s, k, d).sum(axis=2)


_STRATEGIES: dict[str, Callable[[], Dispatcher]] = {
    "scatter": ScatterCombine, "gather": GatherBothWays, "einsum": OneHotEinsum,
    "sort": SortPermute}
DISPATCH_STRATEGIES = tuple(_STRATEGIES)
# The default of MoeConfig.dispatch="auto", per platform of the mesh's devices
# (measured: docs/moe_layer.md, "Dispatch strategies").
AUTO = {"cpu": "scatter", "tpu": "scatter", "gpu": "scatter"}


@functools.lru_cache(maxsize=None)
def make_dispatcher(name: str, platform: str = "cpu") -> Dispatcher:
  """The strategy ``name`` (``"auto"``: the measured default of ``platform``)."""
  if name == "auto":
    name = AUTO.get(platform, "gather")
  try:
    return _STRATEGIES[name]()
  except KeyError:
    raise ValueError(f"Unknown dispatch strategy {name!r}; use 'auto' or one of "
                     f"{DISPATCH_STRATEGIES}.") from None

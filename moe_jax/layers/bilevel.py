"""Bi-level (hierarchical) routing, after SMILE (He et al. 2022).

The ``E`` experts are laid out as ``E_o x E_i``: ``E_o`` *outer* groups
(nodes; the outer level lives on the slow, cross-host mesh axis, ``data`` by
default through the logical axis ``expert_outer``) of ``E_i`` *inner*
experts (on the fast, in-host ``expert`` mesh axis). Flat expert ``e`` is
``(o, i) = divmod(e, E_i)``.

Data flow for ``x: <float>[batch, length, D]`` grouped into ``[G, S, D]``:

  1. outer router ``[D, E_o]``: each token picks one outer group (top-1,
     outer capacity ``C1``); dispatch ``[E_o, G, C1, D]``;
  2. **all-to-all #1**: ``E_o`` moves onto the outer mesh axis, the groups
     leave it -- an exchange only among devices that share every other
     coordinate (the outer sub-axis groups);
  3. inner router of outer group ``o`` (kernel ``[E_o, D, E_i]``, sharded
     with ``o``) routes the ``C1`` slots of every ``(o, g)`` to its top-k
     inner experts (capacity ``C2``); dispatch ``[E_i, E_o, G, C2, D]``;
  4. **all-to-all #2**: ``E_i`` moves onto the ``expert`` axis (the inner
     sub-axis groups, within a host);
  5. experts ``[E_o, E_i, D, F]`` run as batched matmuls; both steps are
     undone in reverse order and combined with weight ``gate_outer *
     gate_inner``, so the task loss trains both routers.

Capacities: ``C1 = capacity(S, E_o, k=1)``; ``C2 = min(C1, capacity(S, E,
k))`` -- an inner expert gets the same number of slots as a flat-routed
expert. With ``E_o = 1`` the outer gate is 1, ``C1 = S`` and the layer is
exactly flat top-k routing (tested).

Losses sown into ``intermediates`` (unweighted): ``aux_loss_outer`` (Switch
loss over the ``E_o`` groups), ``aux_loss_inner`` (Switch loss of each
non-empty inner group ``(o, g)``, averaged), ``aux_loss`` = their sum,
``z_loss`` = the sum of both routers' z-losses, plus the usual
``dropped_fraction``, ``expert_load`` [E] and ``router_confidence`` (of the
inner router).

``BilevelMoeLayer`` is its own layer (``models/blocks.py`` picks it when
``MoeConfig.bilevel_outer_size > 0``) named ``moe`` like the flat one, so
parameters and sown values sit where flat routing puts them:
``router_outer_kernel`` ``[D, E_o]``, ``router_inner_kernel`` ``[E_o, D,
E_i]`` and ``experts/{wi_0, wi_1 | wi, wo}`` ``[E_o, E_i, ...]``. It shares
grouping, capacity, gather/scatter, the top-k router, expert weights and
activations, EOM/FOM and the metric registry with the flat layer.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import partitioning
from moe_jax.layers import expert_parallel
from moe_jax.layers import experts as experts_lib
from moe_jax.layers import grouping
from moe_jax.layers import moe as moe_lib
from moe_jax.layers import moe_metrics as mm
from moe_jax.layers import regularization
from moe_jax.layers import routing

Array = jax.Array
# Logical axis of the outer level (partitioning.standard_logical_rules maps it).
OUTER_LOGICAL_AXIS = experts_lib.OUTER_LOGICAL_AXIS
DEFAULT_OUTER_MESH_AXES = ("data",)

# Private logical names for the two intermediate layouts (resolved per call).
_OUTER = "bilevel_outer"
_INNER = "bilevel_inner"
_GROUPS_AFTER_OUTER = "bilevel_groups_after_outer"
_GROUPS_AFTER_BOTH = "bilevel_groups_after_both"
_OUTER_THEN_GROUPS = "bilevel_outer_then_groups"


def level_mesh_axes(rules) -> dict[str, tuple[str, ...]]:
  """Mesh axes of each level and of the token groups between the all-to-alls.

  Returns:
    ``{"outer", "inner", "batch", "groups_after_outer", "groups_after_both"}``
    -> tuples of mesh axis names. Groups start on the ``batch`` axes; all-to-
    all #1 takes the outer axes from them, #2 the inner axes.
  """
  outer = expert_parallel.mesh_axes(rules, OUTER_LOGICAL_AXIS, DEFAULT_OUTER_MESH_AXES)
  inner = expert_parallel.mesh_axes(rules, "expert")
  batch = expert_parallel.mesh_axes(rules, "batch", partitioning.BATCH_MESH_AXES)
  after_outer = tuple(a for a in batch if a not in outer)
  after_both = tuple(a for a in after_outer if a not in inner)
  return dict(outer=outer, inner=inner, batch=batch,
              groups_after_outer=after_outer, groups_after_both=after_both)


def _constrain(x: Array, names: Sequence[Optional[str]]) -> Array:
  """Logical sharding constraint with the bi-level layout names resolved.

  A no-op without an active mesh and logical rules (unsharded runs).
  """
  rules = nn.get_logical_axis_rules()
  if not rules or partitioning.current_mesh() is None:
    return x
  axes = level_mesh_axes(rules)
  local = ((_OUTER, axes["outer"] or None), (_INNER, axes["inner"] or None),
           (_GROUPS_AFTER_OUTER, axes["groups_after_outer"] or None),
           (_GROUPS_AFTER_BOTH, axes["groups_after_both"] or None),
           (_OUTER_THEN_GROUPS, (axes["outer"] + axes["groups_after_outer"]) or None)
           ) + tuple(rules)
  return nn.with_logical_constraint(x, tuple(names), rules=local)


def validate_mesh(num_outer: int, num_inner: int, mesh: Optional[Any], rules) -> None:
  """Raises ``ValueError`` if the levels cannot be sharded evenly on ``mesh``."""
  if mesh is None or not rules:
    return
  axes = level_mesh_axes(rules)
  n_outer = partitioning.mesh_axis_size(mesh, axes["outer"])
  n_inner = partitioning.mesh_axis_size(mesh, axes["inner"])
  if num_outer % n_outer:
    raise ValueError(
        f"bilevel_outer_size={num_outer} is not divisible by the outer mesh axes "
        f"{axes['outer']} of size {n_outer}; use a multiple of {n_outer} outer "
        "groups (usually exactly the number of hosts/slices on that axis).")
  if num_inner % n_inner:
    raise ValueError(
        f"num_experts / bilevel_outer_size = {num_inner} inner experts is not "
        f"divisible by the inner mesh axes {axes['inner']} of size {n_inner}; "
        "change num_experts or bilevel_outer_size.")


def _capacities(c, s: int, deterministic: bool, decode: bool) -> tuple[int, int]:
  """(C1, C2): outer slots per (group, outer group); inner slots per expert."""
  mode = dict(deterministic=deterministic, decode=decode)
  c1 = grouping.capacity_for_mode(c, s, c.bilevel_outer_size, 1, **mode)
  c2 = grouping.capacity_for_mode(c, s, c.num_experts, c.num_selected_experts, **mode)
  return c1, min(c1, c2)


class BilevelMoeLayer(moe_lib.MoeLayer):
  """Bi-level sparse MoE MLP block: ``MoeLayer``'s attributes and call
  signature, with ``config.bilevel_outer_size > 0``."""

  @nn.compact
  def __call__(self, x: Array, padding_mask: Optional[Array] = None, *,
               deterministic: bool = True, causal: bool = False,
               decode: bool = False, route_ids: Optional[Array] = None) -> Array:
    """<float>[batch, length, D] -> <float>[batch, length, D] in ``dtype``;
    arguments as ``MoeLayer`` (``route_ids`` unused)."""
    del route_ids
    c = self.config
    mesh = partitioning.current_mesh()
    c.validate(num_expert_shards=partitioning.mesh_axis_size(mesh, "expert"),
               causal=causal)
    eo = c.bilevel_outer_size
    ei = c.num_experts // eo
    k = c.num_selected_experts
    validate_mesh(eo, ei, mesh, nn.get_logical_axis_rules())
    train = not deterministic
    b, l, d = x.shape
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    n_batch = partitioning.mesh_axis_size(mesh, partitioning.BATCH_MESH_AXES)
    g = grouping.choose_num_groups(b, l, c.group_size, n_batch)
    s = b * l // g
    c1, c2 = _capacities(c, s, deterministic, decode)
    mask = routing.as_mask(None if padding_mask is None else padding_mask.reshape(g, s),
                           (g, s))
    rng_outer = rng_inner = None
    if c.priority == "random":
      key = self.make_rng("routing") if train else jax.random.key(0)
      rng_outer, rng_inner = jax.random.split(key)

    # --- level 1: outer routing on the source devices ----------------------
    w_outer = self._router_kernel("router_outer_kernel", (d, eo), ("embed", "unmodeled"))
    w_inner = self._router_kernel("router_inner_kernel", (eo, d, ei),
                                  (OUTER_LOGICAL_AXIS, "embed", "unmodeled"))
    logits_o = jnp.einsum("bld,do->blo", self._jitter(x.astype(jnp.float32), train),
                          w_outer)
    logits_o = _constrain(logits_o.reshape(g, s, eo), ("batch", "length", None))
    outer = routing.TokensChooseRouter(
        num_selected_experts=1, priority=c.priority).route(logits_o, mask, c1, rng_outer)
    xg = _constrain(x.astype(self.dtype).reshape(g, s, d), ("batch", "length", None))
    # All-to-all #1 (and back). Groups are split as [Gd, Gr]: Gd over the
    # outer mesh axes, Gr over the remaining batch axes, so that exchanging
    # Gd for E_o only pairs devices along the outer axes. After the exchange
    # a device holds one outer group's slots from every Gd; they are merged,
    # with Gr, into N = E_o * Gr * Gd inner routing groups (sharded like the
    # batch).
    gd = partitioning.mesh_axis_size(
        mesh, level_mesh_axes(nn.get_logical_axis_rules() or ())["outer"])
    gd = gd if g % gd == 0 else 1  # G is a multiple of the batch shards: divides
    gr, n = g // gd, eo * g

    def to_outer(a: Array) -> Array:
      """<T>[G, E_o, C1, ...] (group-sharded) -> <T>[N, C1, ...] at the outer group."""
      tail = (None,) * (a.ndim - 2)
      a = jnp.moveaxis(a.reshape(gd, gr, *a.shape[1:]), 2, 0)  # [E_o, Gd, Gr, C1, ...]
      a = _constrain(a, (None, _OUTER, _GROUPS_AFTER_OUTER) + tail)
      a = _constrain(a, (_OUTER, None, _GROUPS_AFTER_OUTER) + tail)  # all-to-all
      a = jnp.swapaxes(a, 1, 2).reshape(n, *a.shape[3:])  # [N, C1, ...]
      return _constrain(a, (_OUTER_THEN_GROUPS,) + tail)

    def from_outer(a: Array) -> Array:
      """Inverse of ``to_outer``: <T>[N, C1, ...] -> <T>[G, E_o, C1, ...]."""
      tail = (None,) * (a.ndim - 1)
      a = jnp.swapaxes(a.reshape(eo, gr, gd, *a.shape[1:]), 1, 2)  # [E_o,Gd,Gr,C1,...]
      a = _constrain(a, (_OUTER, None, _GROUPS_AFTER_OUTER) + tail)
      a = _constrain(a, (None, _OUTER, _GROUPS_AFTER_OUTER) + tail)  # all-to-all
      return jnp.moveaxis(a, 0, 2).reshape(g, eo, *a.shape[3:])

    xo = to_outer(grouping.gather_slots(xg, outer.slot_token))  # [N, C1, D]
    mask_i = to_outer((outer.slot_token < s).astype(jnp.float32))  # [N, C1]

    # --- level 2: inner routing inside each outer group --------------------
    xo_by_outer = self._jitter(xo.astype(jnp.float32), train).reshape(eo, gr * gd, c1, d)
    logits_i = jnp.einsum("omcd,ode->omce", xo_by_outer, w_inner).reshape(n, c1, ei)
    logits_i = _constrain(logits_i, (_OUTER_THEN_GROUPS, "length", None))
    inner = routing.TokensChooseRouter(
        num_selected_experts=k, priority=c.priority,
        renormalize_top_k=c.renormalize_top_k).route(logits_i, mask_i, c2, rng_inner)
    xi = grouping.gather_slots(xo, inner.slot_token)  # [N, E_i, C2, D]
    xi = jnp.moveaxis(xi.reshape(eo, gr, gd, ei, c2, d), 3, 0)  # [E_i,E_o,Gr,Gd,C2,D]
    layout_before = (None, _OUTER, _GROUPS_AFTER_OUTER, None, "length", None)
    layout_expert = (_INNER, _OUTER, _GROUPS_AFTER_BOTH, None, "length", None)
    xi = _constrain(xi, layout_before)
    xi = _constrain(xi, layout_expert)  # all-to-all #2

    # --- experts ------------------------------------------------------------
    weights = experts_lib.ExpertWeights(
        num_experts=ei, num_outer=eo, d_model=d, d_ff=c.d_ff, activations=c.activations,
        dtype=self.dtype, param_dtype=self.param_dtype, name="experts")()
    pre = [jnp.einsum("iorgcd,oidf->iorgcf", xi, w)
           for w in experts_lib.input_kernels(weights)]
    h = experts_lib.hidden_activation(pre, c.activations)
    h = _constrain(h, layout_expert[:-1] + ("mlp",))
    rate = c.expert_dropout_rate if train else 0.0
    h = experts_lib.dropout(h, rate, self._dropout_key(rate > 0))
    out = jnp.einsum("iorgcf,oifd->iorgcd", h, weights["wo"])
    out = _constrain(out, layout_expert)

    # --- undo both levels ---------------------------------------------------
    out = _constrain(out, layout_before)  # all-to-all #2 back
    out = jnp.moveaxis(out, 0, 3).reshape(n, ei, c2, d)
    inner_weight = regularization.mask_expert_outputs(
        inner, "slot_weight", c.expert_output_masking_rate, deterministic,
        self._dropout_key(train and c.expert_output_masking_rate > 0)).slot_weight
    yo = grouping.combine_slots(out, inner.slot_token, inner_weight, c1)  # [N, C1, D]
    yo = _constrain(yo, (_OUTER_THEN_GROUPS, "length", None))
    y = grouping.combine_slots(from_outer(yo), outer.slot_token, outer.slot_weight, s)
    y = regularization.mask_final_outputs(
        y.reshape(b, l, d).astype(self.dtype), c.final_output_masking_rate,
        deterministic, self._dropout_key(train and c.final_output_masking_rate > 0))
    mm.sow_all(self, level_metrics(outer, inner, mask, mask_i, eo=eo, k=k))
    return nn.with_logical_constraint(y, ("batch", "length", "embed"))

  def _router_kernel(self, name, shape, axes) -> Array:
    w = self.param(name, nn.with_logical_partitioning(
        nn.initializers.normal(stddev=self.config.router_init_stddev), axes),
                   shape, jnp.float32)
    return jnp.asarray(w, jnp.float32)

  def _jitter(self, v: Array, train: bool) -> Array:
    eps = self.config.jitter_noise
    if not train or eps <= 0:
      return v
    return v * jax.random.uniform(self.make_rng("jitter"), v.shape,
                                  minval=1.0 - eps, maxval=1.0 + eps)

  def _dropout_key(self, needed: bool) -> Optional[Array]:
    return self.make_rng("dropout") if needed else None


def level_metrics(outer: routing.RoutingDecision, inner: routing.RoutingDecision,
                  mask: Array, inner_mask: Array, *, eo: int, k: int) -> dict[str, Array]:
  """The per-level and the combined metrics, by ``moe_metrics`` name.

  Args:
    outer: the outer decision over ``[G, S, E_o]``.
    inner: the inner decision over ``[N, C1, E_i]``, ``N = E_o * G`` inner
      groups, outer-group major.
    mask: <float32>[G, S] real tokens; inner_mask: <float32>[N, C1] filled
      outer slots (the inner router's tokens).
  """
  n, c1 = inner_mask.shape
  ei = inner.slot_token.shape[1]
  # The inner aux loss is a mean over all E_o*G inner groups; average over
  # the non-empty ones instead (an empty group has no load to balance).
  nonempty = jnp.sum(jnp.max(inner_mask, axis=-1))
  aux_inner = inner.metrics[mm.AUX_LOSS] * n / jnp.maximum(nonempty, 1.0)
  aux_outer = outer.metrics[mm.AUX_LOSS]
  real = jnp.maximum(jnp.sum(mask) * k, 1.0)
  kept = jnp.sum((inner.slot_token < c1).astype(jnp.float32))
  chosen = jax.nn.one_hot(inner.expert_index, ei, dtype=jnp.float32)  # [N, C1, K, E_i]
  chosen = chosen * inner_mask[..., None, None]
  load = jnp.sum(chosen.reshape(eo, -1, ei), axis=1).reshape(eo * ei)
  return {mm.AUX_LOSS_OUTER: aux_outer, mm.AUX_LOSS_INNER: aux_inner,
          mm.AUX_LOSS: aux_outer + aux_inner,
          mm.Z_LOSS: outer.metrics[mm.Z_LOSS] + inner.metrics[mm.Z_LOSS],
          mm.DROPPED_FRACTION: 1.0 - kept / real,
          mm.EXPERT_LOAD: load / real,
          mm.ROUTER_CONFIDENCE: inner.metrics[mm.ROUTER_CONFIDENCE]}

"""Dense-to-sparse gate (DTS-Gate; Nie et al. 2021, "Dense-to-Sparse Gate for
Mixture-of-Experts", later EvoMoE, arXiv:2112.14397).

Training starts dense and becomes sparse as a temperature anneals:

    gate = softmax((logits + gumbel) / tau(step))          <float32>[G, S, E]
    token t reaches expert e  iff  gate[t, e] > threshold   (its best expert always)
    combine weight of (t, e) = gate[t, e]                   (no renormalisation)

With a high ``tau`` the Gumbel-softmax is nearly uniform, so every gate value
exceeds a small threshold and a token reaches (almost) every expert; as
``tau -> 0`` the distribution collapses onto one (noisy) expert. In eval (no
RNG) the router is plain top-k on ``softmax(logits)`` -- exactly
:class:`~moe_jax.layers.routing.TokensChooseRouter`.

The step comes from :func:`moe_jax.layers.schedule.current_step` (``None``,
outside a training step, means the end of the schedule).

Capacity: a token can reach up to ``E`` experts, so ``k * capacity_factor``
capacity is far too small early on. ``train_capacity="all_tokens"`` (default,
as the authors' released code) gives every expert room for every token of its
group (``C = S``): nothing is ever dropped, and the expert compute costs up to
``E`` dense MLPs per token -- the dense phase is dense by design.
``train_capacity="capacity_factor"`` keeps the capacity the layer computed
(``capacity_factor_train * k * S / E``): cheap, but assignments beyond it are
dropped (each token's highest gate claims first, GShard order).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax.layers import moe_metrics as mm
from moe_jax.layers import routing
from moe_jax.layers import schedule

Array = jax.Array

ANNEAL_SCHEDULES = ("linear", "exponential")
TRAIN_CAPACITIES = ("all_tokens", "capacity_factor")


def temperature(step: Optional[Array], tau_start: float, tau_end: float,
                anneal_steps: int, kind: str = "linear") -> Array:
  """Gumbel-softmax temperature at ``step`` (<float32>[]).

  ``frac = clip(step / anneal_steps, 0, 1)``;
  linear: ``tau_start + (tau_end - tau_start) * frac``;
  exponential: ``tau_start * (tau_end / tau_start) ** frac``.
  ``step=None`` (eval, or no training step published) gives ``tau_end``.
  """
  if kind not in ANNEAL_SCHEDULES:
    raise ValueError(f"Unknown anneal schedule {kind!r}; use one of {ANNEAL_SCHEDULES}.")
  if step is None:
    return jnp.asarray(tau_end, jnp.float32)
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(anneal_steps, 1), 0.0, 1.0)
  if kind == "linear":
    return tau_start + (tau_end - tau_start) * frac
  return tau_start * (tau_end / tau_start) ** frac


def gumbel_gates(logits: Array, gumbel: Array, tau: Array) -> Array:
  """``softmax((logits + gumbel) / tau)`` over experts; all <float32>[G, S, E]."""
  return jax.nn.softmax((logits + gumbel) / tau, axis=-1)


def select_experts(gates: Array, threshold: float) -> Array:
  """<bool>[G, S, E]: gate above ``threshold``, or the token's best expert."""
  best = jax.nn.one_hot(jnp.argmax(gates, axis=-1), gates.shape[-1], dtype=jnp.bool_)
  return (gates > threshold) | best


def experts_per_token(slot_token: Array, mask: Array) -> Array:
  """Mean number of experts a real token reaches (<float32>[]).

  Counts the filled slots (after capacity, so drops lower it): ``k`` minus
  drops for top-k, between 1 and ``E`` for this gate.

  Args:
    slot_token: <int32>[G, E, C] of a capacity-based decision.
    mask: <float>[G, S], 1 for real tokens; ``S`` is the empty-slot marker.
  """
  filled = jnp.sum((slot_token < mask.shape[1]).astype(jnp.float32))
  return filled / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


@dataclasses.dataclass(frozen=True)
class DtsOptions:
  """The gate's schedule and threshold; a base of ``MoeConfig`` (same names).

  Attributes:
    dts_tau_start, dts_tau_end, dts_anneal_steps, dts_anneal_schedule: see
      :func:`temperature`.
    dts_threshold: a token reaches every expert whose gate value exceeds this.
    dts_train_capacity: ``"all_tokens"`` or ``"capacity_factor"`` (module doc).
  """
  dts_tau_start: float = 5.0
  dts_tau_end: float = 0.01
  dts_anneal_steps: int = 50_000
  dts_anneal_schedule: str = "linear"
  dts_threshold: float = 0.02
  dts_train_capacity: str = "all_tokens"

  @classmethod
  def of(cls, config) -> "DtsOptions":
    """The options of a ``MoeConfig`` (or anything with these attributes)."""
    return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class DenseToSparseRouter:
  """Gumbel-softmax gate with an annealed temperature and a threshold.

  Attributes:
    num_selected_experts: ``k`` of the plain top-k routing used in eval.
    renormalize_top_k: eval top-k renormalises its gates (as tokens-choose).
    options: the schedule, threshold and training capacity (:class:`DtsOptions`).
  """
  num_selected_experts: int = 1
  renormalize_top_k: bool = True
  options: DtsOptions = DtsOptions()

  def rng_mode(self, train: bool) -> Optional[str]:
    """The Gumbel noise needs a fresh key in training; eval takes none."""
    return "stream" if train else None

  def route(self, logits: Array, padding_mask: Optional[Array], capacity: int,
            rng: Optional[Array] = None,
            selection_bias: Optional[Array] = None) -> routing.RoutingDecision:
    """See ``routing.Router``. ``rng`` given = training (Gumbel gate);
    ``rng=None`` = eval (plain top-k with ``capacity``)."""
    if selection_bias is not None:
      raise ValueError("The dense-to-sparse gate takes no selection bias; set "
                       "MoeConfig.expert_bias_update_rate=0.")
    g, s, _ = logits.shape
    mask = routing.as_mask(padding_mask, (g, s))
    if rng is None:
      decision = routing.TokensChooseRouter(
          num_selected_experts=self.num_selected_experts,
          renormalize_top_k=self.renormalize_top_k).route(logits, padding_mask, capacity)
      return decision.replace(metrics={
          **decision.metrics,
          mm.EXPERTS_PER_TOKEN: experts_per_token(decision.slot_token, mask)})
    logits = logits.astype(jnp.float32)
    e = logits.shape[-1]
    o = self.options
    tau = temperature(schedule.current_step(), o.dts_tau_start, o.dts_tau_end,
                      o.dts_anneal_steps, o.dts_anneal_schedule)
    gates = gumbel_gates(logits, jax.random.gumbel(rng, logits.shape, jnp.float32), tau)
    selected = select_experts(gates, o.dts_threshold) & (mask[..., None] > 0)
    cap = s if o.dts_train_capacity == "all_tokens" else capacity

    # Each token's experts in decreasing gate order; claims are made rank-major
    # (every token's best expert, then every token's second, ...), tokens in
    # position order within a rank.
    order = jnp.argsort(-gates, axis=-1).astype(jnp.int32)  # [G, S, E]
    sel_sorted = jnp.take_along_axis(selected, order, axis=-1)  # [G, S, J]
    gate_sorted = jnp.take_along_axis(gates, order, axis=-1) * sel_sorted
    claims = jax.nn.one_hot(order, e, dtype=jnp.int32) * sel_sorted[..., None]
    position = routing.queue_positions(jnp.swapaxes(claims, 1, 2))  # [G, S, J]
    keep = sel_sorted & (position < cap)  # [G, S, J]
    slot = jnp.where(keep, order * cap + position, e * cap)
    kept_gate = jnp.where(keep, gate_sorted, 0.0)
    slot_token, slot_weight = routing.slot_tables(slot, kept_gate, e * cap)

    probs = jax.nn.softmax(logits, axis=-1)
    selected_f = selected.astype(jnp.float32)
    n_selected = jnp.maximum(jnp.sum(selected_f), 1.0)
    kept_per_expert = jnp.sum(
        jax.nn.one_hot(order, e, dtype=jnp.float32) * keep[..., None], axis=(0, 1, 2))
    # Switch-style balance loss with f_e = share of real tokens that reach e
    # (sum_e f_e = experts per token); P_e = mean clean router probability.
    f = routing.masked_mean(selected_f, mask[..., None], axis=1)  # [G, E]
    p = routing.masked_mean(probs, mask[..., None], axis=1)  # [G, E]
    slot_token = slot_token.reshape(g, e, cap)
    metrics = routing.standard_metrics(
        probs, logits, mask, aux_loss=jnp.mean(jnp.sum(f * p, axis=-1)) * e,
        dropped_fraction=1.0 - jnp.sum(keep.astype(jnp.float32)) / n_selected,
        expert_load=kept_per_expert / jnp.maximum(jnp.sum(kept_per_expert), 1.0))
    metrics[mm.EXPERTS_PER_TOKEN] = experts_per_token(slot_token, mask)
    return routing.RoutingDecision(
        slot_token=slot_token, slot_weight=slot_weight.reshape(g, e, cap),
        expert_index=order, expert_weight=kept_gate, probs=probs, token_mask=mask,
        metrics=metrics, token_slot=slot.astype(jnp.int32))


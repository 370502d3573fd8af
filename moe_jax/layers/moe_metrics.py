"""The one registry of what MoE layers sow into ``"intermediates"``.

Every value a MoE layer (or a part of one: router, compute, CMR gate)
reports is named here once, with how the rest of the project treats it:

* losses (``loss_factor`` set): the training loss adds
  ``LossConfig.<loss_factor> * sum over layers`` of the value
  (:func:`moe_jax.models.losses.weighted_moe_losses`), logged as
  ``loss_key``;
* logged metrics: ``training/metrics.py`` flattens them per layer
  (``moe/<layer>/<name>``, per-expert vectors as their max load) and averages
  them over layers (``moe/mean/<name>``); the console shows ``short``.

Values are sown *unweighted*; a layer sows only the metrics its options
produce (e.g. ``cluster_loss`` only with expert clusters).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import jax

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MoeMetric:
  """One sown MoE value.

  Attributes:
    name: the name it is sown under.
    short: console short name.
    per_expert: a ``<float32>[E]`` vector of per-expert fractions (logged as
      ``E * max``: 1.0 = perfectly balanced), else a scalar.
    loss_factor: the ``LossConfig`` field that weights its sum over layers in
      the training loss; ``None`` for a pure metric.
    loss_key: the training-metric name of that weighted term.
    logged: whether ``training/metrics.py`` reports it per layer.
    param_update: the name of a non-trainable parameter of the same layer
      that the train step moves by this value after the optimizer update
      (``training/non_trainable.py``); ``None`` for others.
  """
  name: str
  short: str
  per_expert: bool = False
  loss_factor: Optional[str] = None
  loss_key: Optional[str] = None
  logged: bool = True
  param_update: Optional[str] = None


AUX_LOSS = "aux_loss"                  # Switch load-balancing loss
Z_LOSS = "z_loss"                      # router z-loss
DROPPED_FRACTION = "dropped_fraction"  # fraction of real assignments dropped
EXPERT_LOAD = "expert_load"            # [E] fraction of assignments per expert
ROUTER_CONFIDENCE = "router_confidence"  # mean top-1 router probability
CLUSTER_LOSS = "cluster_loss"          # MoEC variance loss (clusters only)
EXPERTS_PER_TOKEN = "experts_per_token"  # DTS-Gate: experts a real token reaches
CMR_BUDGET_LOSS = "cmr_budget_loss"    # NLLB CMR: |mean gate - target|
CMR_GATE_MEAN = "cmr_gate_mean"        # NLLB CMR: mean gate over real tokens
AUX_LOSS_OUTER = "aux_loss_outer"      # bi-level routing: outer-level loss
AUX_LOSS_INNER = "aux_loss_inner"      # bi-level routing: inner-level loss
GATING_DROPOUT_FIRED = "gating_dropout_fired"  # 1.0 when the draw fired
EXPERT_BIAS_UPDATE = "expert_bias_update"  # [E] aux-loss-free bias step (training)
SEQUENCE_AUX_LOSS = "sequence_aux_loss"  # DeepSeek-V3 sequence-wise balance loss

_ALL = (
    MoeMetric(AUX_LOSS, "aux", loss_factor="aux_loss_factor", loss_key="moe_aux_loss"),
    MoeMetric(Z_LOSS, "rz", loss_factor="router_z_loss_factor",
              loss_key="moe_router_z_loss"),
    MoeMetric(DROPPED_FRACTION, "drop"),
    MoeMetric(EXPERT_LOAD, "load_max", per_expert=True),
    MoeMetric(ROUTER_CONFIDENCE, "conf"),
    MoeMetric(CLUSTER_LOSS, "cluster", loss_factor="cluster_loss_factor",
              loss_key="moe_cluster_loss", logged=False),
    MoeMetric(EXPERTS_PER_TOKEN, "ept"),
    MoeMetric(CMR_BUDGET_LOSS, "cmr_budget", loss_factor="cmr_budget_loss_factor",
              loss_key="cmr_budget_loss", logged=False),
    MoeMetric(CMR_GATE_MEAN, "cmr_gate"),
    MoeMetric(AUX_LOSS_OUTER, "aux_outer"),
    MoeMetric(AUX_LOSS_INNER, "aux_inner"),
    MoeMetric(GATING_DROPOUT_FIRED, "gd_fired", logged=False),
    MoeMetric(EXPERT_BIAS_UPDATE, "bias_step", per_expert=True, logged=False,
              param_update="expert_bias"),
    MoeMetric(SEQUENCE_AUX_LOSS, "seq_aux", loss_factor="sequence_aux_loss_factor",
              loss_key="moe_sequence_aux_loss"),
)
REGISTRY: dict[str, MoeMetric] = {m.name: m for m in _ALL}


def register(metric: MoeMetric) -> MoeMetric:
  """Adds a metric (a new router's or compute's) to the registry."""
  if REGISTRY.get(metric.name, metric) != metric:
    raise ValueError(f"MoE metric {metric.name!r} is already registered differently.")
  REGISTRY[metric.name] = metric
  return metric


def loss_metrics() -> tuple[MoeMetric, ...]:
  """The registered metrics that are loss terms (``loss_factor`` set)."""
  return tuple(m for m in REGISTRY.values() if m.loss_factor)


def logged_names() -> tuple[str, ...]:
  """Names of the registered metrics reported per layer."""
  return tuple(m.name for m in REGISTRY.values() if m.logged)


def short_name(name: str) -> str:
  """Console short name of a sown metric (the name itself if unregistered)."""
  m = REGISTRY.get(name)
  return m.short if m else name


def sow_all(module, metrics: Mapping[str, Array]) -> None:
  """Sows every value of ``metrics`` into ``module``'s ``"intermediates"``.

  Raises:
    ValueError: for a name missing from the registry (register it, so that
      the loss and the logs know what it is).
  """
  for name, value in metrics.items():
    if name not in REGISTRY:
      raise ValueError(f"MoE metric {name!r} is not registered in "
                       "moe_jax/layers/moe_metrics.py; add a MoeMetric for it.")
    module.sow("intermediates", name, value)

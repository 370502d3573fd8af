"""Training losses and MoE metrics (T5X / flaxformer conventions).

Total loss = token cross-entropy (with optional label smoothing)
           + output z-loss ``z_loss * log(Z)^2`` per token (T5X, 1e-4)
           + ``aux_loss_factor``      * SUM over MoE layers of the load-balancing loss
           + ``router_z_loss_factor`` * SUM over MoE layers of the router z-loss
           + ``cluster_loss_factor``  * SUM over MoE layers of the MoEC variance
             loss (sown only when ``MoeConfig.num_expert_clusters > 0``)
           + ``cmr_budget_loss_factor`` * SUM over MoE layers of the NLLB
             conditional-routing budget loss (sown only when CMR is on).

:func:`weighted_moe_losses` is the one definition of the weighted MoE terms;
the train step (``moe_jax/training/train_step.py``) and :func:`compute_loss`
both call it.

The MoE terms are **summed over layers** (as T5X/flaxformer do: each layer
adds its weighted loss), so a deeper model with more sparse layers puts more
total weight on balancing; the per-layer values and their **mean** over layers
are reported as metrics. Token terms are averaged over real target tokens
(``weights``, default ``targets > 0``) unless ``loss_normalizing_factor`` is
given, in which case their sum is divided by it.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.layers import moe_config as mc

DEFAULT_Z_LOSS = 1e-4
DEFAULT_AUX_LOSS_FACTOR = 0.01
DEFAULT_ROUTER_Z_LOSS_FACTOR = 0.0
# MoEC (Xie et al. 2023) variance loss weight; the term exists only when the
# layer has expert clusters. 1e-2, the same scale as the Switch aux loss.
DEFAULT_CLUSTER_LOSS_FACTOR = 1e-2
# NLLB conditional MoE routing budget loss weight (Costa-jussà et al. 2022).
DEFAULT_CMR_BUDGET_LOSS_FACTOR = 0.1
CMR_BUDGET_LOSS = getattr(mc, "CMR_BUDGET_LOSS", "cmr_budget_loss")
CLUSTER_LOSS = getattr(mc, "CLUSTER_LOSS", "cluster_loss")


def token_cross_entropy(logits: jax.Array, targets: jax.Array,
                        label_smoothing: float = 0.0,
                        z_loss: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Per-token loss and z-loss.

  Args:
    logits: ``<float>[batch, length, vocab]``.
    targets: ``<int>[batch, length]``.
    label_smoothing: mass moved from the target to the other ``vocab - 1``
      classes uniformly (T5X). The loss is offset by the soft targets' entropy
      so that a perfect prediction scores 0.
    z_loss: coefficient of ``log(Z)**2``.

  Returns:
    ``(loss, z_term)`` both ``<float32>[batch, length]``; ``loss`` includes ``z_term``.
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z[..., None]
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1)
  soft = jax.nn.one_hot(targets, vocab, dtype=jnp.float32) * (confidence - low) + low
  loss = -jnp.sum(soft * log_probs, axis=-1)
  if label_smoothing > 0:
    entropy = -(confidence * np.log(confidence)
                + (vocab - 1) * low * np.log(low + 1e-20))
    loss = loss - entropy
  z_term = z_loss * jnp.square(log_z)
  return loss + z_term, z_term


def _layer_name(path: tuple[str, ...]) -> str:
  """``('encoder','layers','layers_3','moe')`` -> ``'encoder/layers_3'``."""
  keep = [p for p in path if p not in ("layers", "moe")]
  return "/".join(keep)


def collect_moe_metrics(intermediates: Mapping[str, Any],
                        config: Optional[Any] = None) -> dict[str, jax.Array]:
  """Per-layer MoE values from the ``intermediates`` collection.

  Returns ``{"<stack>/layers_<i>/<metric>": value}`` for every MoE layer and
  metric named in ``moe_config.METRIC_NAMES``. Scanned stacks (params under
  ``layers/layer_j`` with a leading block axis) are unstacked into layer
  indices ``block * period + j``; pass ``config`` (a ``T5Config``) for that,
  otherwise names are ``<stack>/block_<b>/layer_<j>``.
  """
  out = {}
  flat = jax.tree_util.tree_flatten_with_path(
      intermediates, is_leaf=lambda x: isinstance(x, tuple))[0]
  for key_path, value in flat:
    keys = tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in key_path)
    if not keys or keys[-1] not in mc.METRIC_NAMES:
      continue
    value = value[0] if isinstance(value, tuple) else value
    metric = keys[-1]
    scanned = [i for i, k in enumerate(keys[:-1]) if re.fullmatch(r"layer_\d+", k)]
    if not scanned:
      out[f"{_layer_name(keys[:-1])}/{metric}"] = value
      continue
    j = int(keys[scanned[-1]].split("_")[1])
    stack = keys[0]
    period = None
    if config is not None:
      layout = getattr(config, f"{stack}_layout")
      n = getattr(config, f"num_{stack}_layers")
      period = layout.scan_period(n, config.moe.num_experts if config.moe else 0)
    for b in range(value.shape[0]):
      name = (f"{stack}/layers_{b * period + j}" if period
              else f"{stack}/block_{b}/layer_{j}")
      out[f"{name}/{metric}"] = value[b]
  return dict(sorted(out.items()))


def summarize_moe_metrics(per_layer: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Mean over layers of each metric: ``{"moe/<metric>_mean": ...}``, plus
  ``"moe/num_layers"``; ``expert_load`` is averaged only when all layers have
  the same expert count."""
  by_metric: dict[str, list] = {}
  for name, value in per_layer.items():
    by_metric.setdefault(name.rsplit("/", 1)[1], []).append(value)
  out = {}
  for metric, values in by_metric.items():
    if len({jnp.shape(v) for v in values}) == 1:
      out[f"moe/{metric}_mean"] = jnp.mean(jnp.stack(values), axis=0)
  if by_metric:
    out["moe/num_layers"] = jnp.asarray(len(next(iter(by_metric.values()))))
  return out


def _sown_key(path) -> Optional[str]:
  """Name a leaf was sown under: the last dict key (tuple indices skipped)."""
  for entry in reversed(path):
    if hasattr(entry, "key"):
      return entry.key
  return None


def sum_sown(intermediates: Any, name: str) -> jax.Array:
  """``<float32>[]`` sum over MoE layers of a sown per-layer scalar ``name``.

  A layer's value is a scalar (in a 1-tuple, as ``sow`` stores it); under
  ``nn.scan`` it is stacked to ``[num_blocks]``, which is summed too, so
  scanned and unrolled stacks give the same total.
  """
  total = jnp.zeros((), jnp.float32)
  for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    if _sown_key(path) == name:
      total = total + jnp.sum(jnp.asarray(leaf, jnp.float32))
  return total


def has_sown(intermediates: Any, name: str) -> bool:
  """Whether any layer sowed ``name`` (a static, trace-time fact)."""
  return any(_sown_key(path) == name for path, _ in
             jax.tree_util.tree_flatten_with_path(intermediates)[0])


def weighted_moe_losses(intermediates: Any, *,
                        aux_loss_factor: float = DEFAULT_AUX_LOSS_FACTOR,
                        router_z_loss_factor: float = DEFAULT_ROUTER_Z_LOSS_FACTOR,
                        cluster_loss_factor: float = DEFAULT_CLUSTER_LOSS_FACTOR,
                        cmr_budget_loss_factor: float = DEFAULT_CMR_BUDGET_LOSS_FACTOR
                        ) -> dict[str, jax.Array]:
  """The weighted MoE loss terms that enter the training loss.

  Each is ``factor * sum over MoE layers`` of the per-layer value the layers
  sow (:func:`sum_sown`).

  Returns:
    ``{"aux_loss", "router_z_loss"}`` always, plus ``"cluster_loss"`` (MoEC)
    and ``"cmr_budget_loss"`` (NLLB CMR) when some layer sowed them; all
    ``<float32>[]``.
  """
  inter = intermediates or {}
  out = {"aux_loss": aux_loss_factor * sum_sown(inter, mc.AUX_LOSS),
         "router_z_loss": router_z_loss_factor * sum_sown(inter, mc.Z_LOSS)}
  for name, factor in ((CLUSTER_LOSS, cluster_loss_factor),
                       (CMR_BUDGET_LOSS, cmr_budget_loss_factor)):
    if has_sown(inter, name):
      out[name] = factor * sum_sown(inter, name)
  return out


def compute_loss(logits: jax.Array, targets: jax.Array,
                 weights: Optional[jax.Array] = None, *,
                 intermediates: Optional[Mapping[str, Any]] = None,
                 config: Optional[Any] = None,
                 label_smoothing: float = 0.0, z_loss: float = DEFAULT_Z_LOSS,
                 aux_loss_factor: float = DEFAULT_AUX_LOSS_FACTOR,
                 router_z_loss_factor: float = DEFAULT_ROUTER_Z_LOSS_FACTOR,
                 cluster_loss_factor: float = DEFAULT_CLUSTER_LOSS_FACTOR,
                 cmr_budget_loss_factor: float = DEFAULT_CMR_BUDGET_LOSS_FACTOR,
                 loss_normalizing_factor: Optional[float] = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total training loss and metrics (see the module docstring).

  Args:
    logits: ``<float>[batch, length, vocab]``; targets ``<int>[batch, length]``.
    weights: ``<float>[batch, length]``, default ``targets > 0``.
    intermediates: the model's ``"intermediates"`` collection (MoE sows).
    config: the ``T5Config`` (only to name layers of scanned stacks).

  Returns:
    ``(loss, metrics)``: scalar loss and a flat dict of scalars/vectors:
    ``cross_entropy``, ``z_loss``, ``num_tokens``, ``aux_loss`` /
    ``router_z_loss`` (and, when sown, ``cluster_loss`` / ``cmr_budget_loss``:
    the weighted sums entering the loss, :func:`weighted_moe_losses`), per-layer
    ``moe/<stack>/layers_<i>/<metric>`` and their means ``moe/<metric>_mean``.
  """
  if weights is None:
    weights = (targets > 0).astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  per_token, z_term = token_cross_entropy(logits, targets, label_smoothing, z_loss)
  num_tokens = jnp.sum(weights)
  denom = (jnp.maximum(num_tokens, 1.0) if loss_normalizing_factor is None
           else jnp.asarray(loss_normalizing_factor, jnp.float32))
  token_loss = jnp.sum(per_token * weights) / denom
  z_mean = jnp.sum(z_term * weights) / denom
  metrics = {"cross_entropy": token_loss - z_mean, "z_loss": z_mean,
             "num_tokens": num_tokens}
  loss = token_loss
  if intermediates:
    per_layer = collect_moe_metrics(intermediates, config)
    weighted = weighted_moe_losses(
        intermediates, aux_loss_factor=aux_loss_factor,
        router_z_loss_factor=router_z_loss_factor,
        cluster_loss_factor=cluster_loss_factor,
        cmr_budget_loss_factor=cmr_budget_loss_factor)
    metrics.update(weighted)
    for term in weighted.values():
      loss = loss + term
    metrics.update({f"moe/{k}": v for k, v in per_layer.items()})
    metrics.update(summarize_moe_metrics(per_layer))
  metrics["loss"] = loss
  return loss, metrics

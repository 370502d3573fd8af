"""Training losses (T5X / flaxformer conventions).

Total loss = token cross-entropy (with optional label smoothing)
           + output z-loss ``z_loss * log(Z)^2`` per token (T5X, 1e-4)
           + for every MoE loss term of the metric registry
             (``moe_jax/layers/moe_metrics.py``): ``LossConfig.<factor>`` *
             SUM over MoE layers of the sown value. Today: the load-balancing
             loss (``aux_loss_factor``), the router z-loss
             (``router_z_loss_factor``), the MoEC variance loss
             (``cluster_loss_factor``, only with expert clusters) and the NLLB
             conditional-routing budget loss (``cmr_budget_loss_factor``, only
             with CMR).

:func:`weighted_moe_losses` is the one definition of the weighted MoE terms
(the train step calls it). The MoE terms are **summed over layers** (as
T5X/flaxformer do: each layer adds its weighted loss), so a deeper model with
more sparse layers puts more total weight on balancing; per-layer values and
their mean over layers are reported by ``training/metrics.py``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.layers import moe_metrics as mm

DEFAULT_Z_LOSS = 1e-4
DEFAULT_AUX_LOSS_FACTOR = 0.01
DEFAULT_ROUTER_Z_LOSS_FACTOR = 0.0
# MoEC (Xie et al. 2023) variance loss weight; the term exists only when the
# layer has expert clusters. 1e-2, the same scale as the Switch aux loss.
DEFAULT_CLUSTER_LOSS_FACTOR = 1e-2
# NLLB conditional MoE routing budget loss weight (Costa-jussà et al. 2022).
DEFAULT_CMR_BUDGET_LOSS_FACTOR = 0.1
# DeepSeek-V3's complementary sequence-wise balance loss (its alpha).
DEFAULT_SEQUENCE_AUX_LOSS_FACTOR = 1e-4
# Loss terms reported even when no layer sowed them (0 for a dense model).
ALWAYS_REPORTED = (mm.AUX_LOSS, mm.Z_LOSS)


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


def weighted_moe_losses(intermediates: Any, factors: Mapping[str, float]
                        ) -> dict[str, jax.Array]:
  """The weighted MoE loss terms that enter the training loss.

  Args:
    intermediates: the model's ``"intermediates"`` collection.
    factors: ``{loss factor name: value}`` for the registry's loss terms
      (e.g. ``dataclasses.asdict(LossConfig())``); a missing name is an error.

  Returns:
    ``{metric.loss_key: factor * sum over MoE layers}`` (``<float32>[]``) for
    every registered loss term some layer sowed, plus ``moe_aux_loss`` and
    ``moe_router_z_loss`` always.
  """
  inter = intermediates or {}
  out = {}
  for metric in mm.loss_metrics():
    if metric.name in ALWAYS_REPORTED or has_sown(inter, metric.name):
      if metric.loss_factor not in factors:
        raise ValueError(f"No loss factor {metric.loss_factor!r} for the MoE loss "
                         f"{metric.name!r}; add it to LossConfig.")
      out[metric.loss_key] = factors[metric.loss_factor] * sum_sown(inter, metric.name)
  return out

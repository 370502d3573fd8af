"""Conditional MoE Routing (CMR; NLLB Team, Costa-jussà et al. 2022, and
Elbayad et al. 2022, "Fixing MoE Over-Fitting on Low-Resource Languages").

A sparse layer gets a shared dense FFN beside its MoE and a per-token binary
gate that decides how much of each token goes through the experts:

    g(h)  = sigmoid(h . w + b)                     <float32>[batch, length]
    y     = (1 - g) * FFN_shared(h) + g * MoE(h)

In training, dropout is applied to the gate *values* (inverted dropout as in
the NLLB fairseq code: a dropped token has ``g = 0`` and goes to the dense FFN
only; a kept one has ``g / (1 - p)``). A budget loss keeps the average share
of tokens sent to the MoE near a target:

    L_budget = | sum_t m_t g_t / sum_t m_t - target |     (m_t = 1 for real tokens)

computed on the gates actually used (after gate dropout) and sown unweighted
per layer as ``cmr_budget_loss``; the training loss multiplies the sum over
layers by ``LossConfig.cmr_budget_loss_factor`` (paper: 0.1). The mean gate
over real tokens is sown as ``cmr_gate_mean``.

This module holds the config, the pure formulas and the gate module; the
transformer layer (``models/blocks.py``) calls the dense FFN and the MoE.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.layers import moe_metrics as mm
from moe_jax.layers import routing

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ConditionalRoutingConfig:
  """Options of Conditional MoE Routing (set on a stack's ``SparseLayout``).

  Attributes:
    gate_dropout_rate: dropout on the gate values in training (NLLB: 0.2).
      ``0`` disables it.
    budget_target: the mean gate the budget loss pulls towards, i.e. the
      share of tokens (by weight) that should use the MoE (NLLB: 0.8).
    gate_init_bias: initial bias of the gate logit; ``0`` starts every token
      at ``g = 0.5``.
  """
  gate_dropout_rate: float = 0.2
  budget_target: float = 0.8
  gate_init_bias: float = 0.0

  def __post_init__(self):
    if not 0.0 <= self.gate_dropout_rate < 1.0:
      raise ValueError(
          f"ConditionalRoutingConfig.gate_dropout_rate={self.gate_dropout_rate} "
          "must be in [0, 1); the NLLB default is 0.2.")
    if not 0.0 <= self.budget_target <= 1.0:
      raise ValueError(
          f"ConditionalRoutingConfig.budget_target={self.budget_target} must be "
          "in [0, 1] (a share of tokens); the NLLB default is 0.8.")


def gate_dropout(gate: Array, rate: float, rng: Optional[Array]) -> Array:
  """Inverted dropout on gate values: ``g * keep / (1 - rate)``.

  Args:
    gate: <float>[batch, length].
    rate: drop probability; ``0`` or ``rng is None`` returns ``gate``.
    rng: PRNG key.
  """
  if rate <= 0.0 or rng is None:
    return gate
  keep = jax.random.bernoulli(rng, 1.0 - rate, gate.shape)
  return jnp.where(keep, gate / (1.0 - rate), jnp.zeros_like(gate))


def real_token_mean(values: Array, padding_mask: Optional[Array]) -> Array:
  """Mean of ``values <float>[batch, length]`` over real tokens (mask 1);
  a batch with no real token gives 0."""
  return routing.masked_mean(values.astype(jnp.float32),
                             routing.as_mask(padding_mask, values.shape), axis=None)


def budget_loss(gate: Array, padding_mask: Optional[Array], target: float) -> Array:
  """``|mean over real tokens of gate - target|`` (scalar float32)."""
  return jnp.abs(real_token_mean(gate, padding_mask) - target)


def mix(dense_out: Array, moe_out: Array, gate: Array) -> Array:
  """``(1 - g) * dense + g * moe``.

  Args:
    dense_out, moe_out: <float>[batch, length, embed].
    gate: <float>[batch, length].
  Returns:
    <float>[batch, length, embed] in ``moe_out``'s dtype.
  """
  g = gate[..., None].astype(jnp.float32)
  y = (1.0 - g) * dense_out.astype(jnp.float32) + g * moe_out.astype(jnp.float32)
  return y.astype(moe_out.dtype)


class ConditionalRoutingGate(nn.Module):
  """The CMR gate. ``<float>[b, l, embed] -> <float32>[b, l]`` (after dropout).

  Sows ``cmr_budget_loss`` (unweighted) and ``cmr_gate_mean`` into
  ``"intermediates"``. Gate dropout uses the ``"dropout"`` RNG stream.

  Attributes:
    config: ``ConditionalRoutingConfig``.
    param_dtype: dtype of the gate kernel and bias (computed in float32).
  """
  config: ConditionalRoutingConfig
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: Array, padding_mask: Optional[Array] = None, *,
               deterministic: bool = True) -> Array:
    c = self.config
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02),
                                     ("embed", "unmodeled")),
        (h.shape[-1], 1), self.param_dtype)
    bias = self.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.constant(c.gate_init_bias),
                                     ("unmodeled",)),
        (1,), self.param_dtype)
    logits = jnp.einsum("bld,do->blo", h.astype(jnp.float32),
                        jnp.asarray(kernel, jnp.float32))[..., 0]
    gate = jax.nn.sigmoid(logits + jnp.asarray(bias, jnp.float32)[0])
    if not deterministic and c.gate_dropout_rate > 0:
      gate = gate_dropout(gate, c.gate_dropout_rate, self.make_rng("dropout"))
    mm.sow_all(self, {mm.CMR_BUDGET_LOSS: budget_loss(gate, padding_mask, c.budget_target),
                      mm.CMR_GATE_MEAN: real_token_mean(gate, padding_mask)})
    return gate

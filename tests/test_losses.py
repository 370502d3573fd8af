"""Losses against hand-written NumPy formulas; MoE terms summed over layers."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.layers import moe_metrics as mm
from moe_jax.layers.moe_config import MoeConfig
from moe_jax.models import SparseLayout, T5Config
from moe_jax.models import losses
from moe_jax.training import metrics, train_step


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_label_smoothing_and_z_loss(smoothing):
  rng = np.random.RandomState(0)
  logits = rng.randn(2, 3, 5).astype(np.float32) * 3
  targets = np.array([[1, 4, 0], [2, 2, 3]])
  weights = (targets > 0).astype(np.float32)
  sums = train_step.token_losses(
      jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
      train_step.LossConfig(label_smoothing=smoothing, z_loss=1e-4))
  loss = (sums["cross_entropy_sum"] + sums["z_loss_sum"]) / sums["num_tokens"]
  # Reference: soft targets (1 - a on the label, a / (V - 1) elsewhere), minus the
  # soft targets' own entropy, plus 1e-4 * logsumexp^2, averaged over targets > 0.
  v = 5
  soft = np.full((2, 3, v), smoothing / (v - 1))
  for b in range(2):
    for t in range(3):
      soft[b, t, targets[b, t]] = 1 - smoothing
  ce = -(soft * _np_log_softmax(logits)).sum(-1)
  if smoothing:
    ce -= -((1 - smoothing) * np.log(1 - smoothing)
            + smoothing * np.log(smoothing / (v - 1)))
  log_z = np.log(np.exp(logits).sum(-1))
  w = targets > 0
  expected = ((ce + 1e-4 * log_z ** 2) * w).sum() / w.sum()
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(sums["z_loss_sum"] / sums["num_tokens"],
                             (1e-4 * log_z ** 2 * w).sum() / w.sum(), rtol=1e-5)
  assert sums["num_tokens"] == 5


def test_perfect_prediction_with_smoothing_scores_zero():
  v, a = 4, 0.2
  probs = np.full(v, a / (v - 1))
  probs[2] = 1 - a
  logits = jnp.asarray(np.log(probs))[None, None]
  loss, _ = losses.token_cross_entropy(logits, jnp.array([[2]]), label_smoothing=a)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)


def _sown(aux, z, load, other=0.1):
  return {mm.AUX_LOSS: (jnp.asarray(aux),), mm.Z_LOSS: (jnp.asarray(z),),
          mm.DROPPED_FRACTION: (jnp.asarray(other),),
          mm.EXPERT_LOAD: (jnp.asarray(load),),
          mm.ROUTER_CONFIDENCE: (jnp.asarray(other),)}


def test_moe_losses_are_summed_over_layers_metrics_averaged():
  inter = {"encoder": {"layers": {"layers_1": {"moe": _sown(2.0, 3.0, [0.5, 0.5])}}},
           "decoder": {"layers": {"layers_0": {"moe": _sown(4.0, 5.0, [1.0, 0.0])}}}}
  factors = dataclasses.asdict(train_step.LossConfig(aux_loss_factor=0.01,
                                                     router_z_loss_factor=0.001))
  weighted = losses.weighted_moe_losses(inter, factors)
  np.testing.assert_allclose(weighted["moe_aux_loss"], 0.01 * (2 + 4), rtol=1e-6)
  np.testing.assert_allclose(weighted["moe_router_z_loss"], 0.001 * (3 + 5), rtol=1e-6)
  m = metrics.moe_metrics(inter)
  np.testing.assert_allclose(m["moe/encoder/layers/layers_1/moe/aux_loss"], 2.0)
  np.testing.assert_allclose(m["moe/decoder/layers/layers_0/moe/z_loss"], 5.0)
  np.testing.assert_allclose(m["moe/mean/aux_loss"], 3.0)
  # expert_load_max = E * max(load): 1.0 (balanced) and 2.0 (one expert).
  np.testing.assert_allclose(m["moe/encoder/layers/layers_1/moe/expert_load_max"], 1.0)
  np.testing.assert_allclose(m["moe/mean/expert_load_max"], 1.5)
  # Defaults: aux 0.01, router z 0.
  default = losses.weighted_moe_losses(
      inter, dataclasses.asdict(train_step.LossConfig()))
  np.testing.assert_allclose(sum(default.values()), 0.06, rtol=1e-6)


def test_scanned_metrics_are_unstacked_to_layer_indices():
  config = T5Config(num_encoder_layers=4, num_decoder_layers=2, scan_layers=True,
                    moe=MoeConfig(num_experts=2),
                    encoder_layout=SparseLayout("every", every=2))
  inter = {"encoder": {"layers": {"layers": {"layer_1": {"moe": _sown(
      [1.0, 2.0], [0.0, 0.0], [[1.0, 0.0], [0.5, 0.5]], [0.1, 0.2])}}}}}
  per_layer = metrics.moe_metrics(inter, config)
  np.testing.assert_allclose(per_layer["moe/encoder/layers/layers_1/moe/aux_loss"], 1.0)
  np.testing.assert_allclose(per_layer["moe/encoder/layers/layers_3/moe/aux_loss"], 2.0)
  np.testing.assert_allclose(
      per_layer["moe/encoder/layers/layers_1/moe/expert_load_max"], 2.0)
  np.testing.assert_allclose(
      per_layer["moe/encoder/layers/layers_3/moe/expert_load_max"], 1.0)
  # Without the config the blocks are averaged under the scanned path.
  plain = metrics.moe_metrics(inter)
  np.testing.assert_allclose(plain["moe/encoder/layers/layers/layer_1/moe/aux_loss"], 1.5)

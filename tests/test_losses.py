"""Losses against hand-written NumPy formulas; MoE terms summed over layers."""

import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.layers import moe_config as mc
from moe_jax.models import SparseLayout, T5Config
from moe_jax.models import losses


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_label_smoothing_and_z_loss(smoothing):
  rng = np.random.RandomState(0)
  logits = rng.randn(2, 3, 5).astype(np.float32) * 3
  targets = np.array([[1, 4, 0], [2, 2, 3]])
  loss, metrics = losses.compute_loss(jnp.asarray(logits), jnp.asarray(targets),
                                      label_smoothing=smoothing, z_loss=1e-4)
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
  np.testing.assert_allclose(metrics["z_loss"], (1e-4 * log_z ** 2 * w).sum() / w.sum(),
                             rtol=1e-5)
  assert metrics["num_tokens"] == 5


def test_perfect_prediction_with_smoothing_scores_zero():
  v, a = 4, 0.2
  probs = np.full(v, a / (v - 1))
  probs[2] = 1 - a
  logits = jnp.asarray(np.log(probs))[None, None]
  loss, _ = losses.compute_loss(logits, jnp.array([[2]]), label_smoothing=a, z_loss=0.0)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)


def _sown(aux, z, load, other=0.1):
  return {mc.AUX_LOSS: (jnp.asarray(aux),), mc.Z_LOSS: (jnp.asarray(z),),
          mc.DROPPED_FRACTION: (jnp.asarray(other),),
          mc.EXPERT_LOAD: (jnp.asarray(load),),
          mc.ROUTER_CONFIDENCE: (jnp.asarray(other),)}


def test_moe_losses_are_summed_over_layers_metrics_averaged():
  inter = {"encoder": {"layers": {"layers_1": {"moe": _sown(2.0, 3.0, [0.5, 0.5])}}},
           "decoder": {"layers": {"layers_0": {"moe": _sown(4.0, 5.0, [1.0, 0.0])}}}}
  logits = jnp.zeros((1, 2, 3))
  targets = jnp.array([[1, 2]])
  base, _ = losses.compute_loss(logits, targets, z_loss=0.0)
  loss, m = losses.compute_loss(logits, targets, intermediates=inter, z_loss=0.0,
                                aux_loss_factor=0.01, router_z_loss_factor=0.001)
  np.testing.assert_allclose(loss - base, 0.01 * (2 + 4) + 0.001 * (3 + 5), rtol=1e-6)
  np.testing.assert_allclose(m["aux_loss"], 0.06, rtol=1e-6)
  np.testing.assert_allclose(m["moe/encoder/layers_1/aux_loss"], 2.0)
  np.testing.assert_allclose(m["moe/decoder/layers_0/z_loss"], 5.0)
  np.testing.assert_allclose(m["moe/aux_loss_mean"], 3.0)
  np.testing.assert_allclose(m["moe/expert_load_mean"], [0.75, 0.25])
  assert int(m["moe/num_layers"]) == 2
  # Defaults: aux 0.01, router z 0.
  loss_default, _ = losses.compute_loss(logits, targets, intermediates=inter, z_loss=0.0)
  np.testing.assert_allclose(loss_default - base, 0.06, rtol=1e-6)


def test_scanned_metrics_are_unstacked_to_layer_indices():
  config = T5Config(num_encoder_layers=4, num_decoder_layers=2, scan_layers=True,
                    moe=mc.MoeConfig(num_experts=2),
                    encoder_layout=SparseLayout("every", every=2))
  inter = {"encoder": {"layers": {"layers": {"layer_1": {"moe": _sown(
      [1.0, 2.0], [0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]], [0.1, 0.2])}}}}}
  per_layer = losses.collect_moe_metrics(inter, config)
  np.testing.assert_allclose(per_layer["encoder/layers_1/aux_loss"], 1.0)
  np.testing.assert_allclose(per_layer["encoder/layers_3/aux_loss"], 2.0)
  np.testing.assert_allclose(per_layer["encoder/layers_3/expert_load"], [0.0, 1.0])

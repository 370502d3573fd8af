"""MoEC cluster-loss and NLLB CMR budget-loss factors (the train step and
``losses.weighted_moe_losses`` agree), and the training step visible to the
model."""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_jax.layers import schedule
from moe_jax.layers.moe_config import MoeConfig
from moe_jax.models import SparseLayout, T5Config, build_model, losses
from moe_jax.training import train_state, train_step

VOCAB = 5


class _Layer(nn.Module):
  """Sows fixed per-layer values, like an MoE layer does."""
  values: Any

  @nn.compact
  def __call__(self):
    for name, value in self.values.items():
      self.sow("intermediates", name, jnp.asarray(value, jnp.float32))


class _Recorder:
  """Holds what the probe saw (a plain object: flax would freeze a list)."""

  def __init__(self):
    self.steps = []


class _Probe(nn.Module):
  """A T5-signature model: logits from one bias vector; its layers sow
  ``layer_values``; it records ``schedule.current_step()`` (-1 for None)."""
  layer_values: tuple = ()
  seen: Any = None

  @nn.compact
  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
               enable_dropout=False, **unused):
    for i, values in enumerate(self.layer_values):
      _Layer(dict(values), name=f"layers_{i}")()
    if self.seen is not None:
      step = schedule.current_step()
      value = jnp.int32(-1) if step is None else jnp.asarray(step, jnp.int32)
      jax.debug.callback(lambda s: self.seen.steps.append(int(s)), value)
    bias = self.param("bias", nn.initializers.normal(1.0), (VOCAB,))
    b, length = decoder_target_tokens.shape
    return jnp.broadcast_to(bias, (b, length, VOCAB))


def _batch(n=4, length=3):
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, VOCAB, (n, length)).astype(np.int32)
  return {"encoder_input_tokens": tokens, "decoder_input_tokens": tokens,
          "decoder_target_tokens": tokens,
          "decoder_loss_weights": np.ones((n, length), np.float32)}


# Two MoE layers: one plain, one scanned-style (values stacked over 2 blocks).
LAYERS = ({"aux_loss": 0.5, "cluster_loss": 0.3, "cmr_budget_loss": 0.2},
          {"aux_loss": [0.25, 0.25], "cluster_loss": [0.4, 0.1],
           "cmr_budget_loss": [0.05, 0.15]})
CLUSTER_SUM = 0.3 + 0.4 + 0.1
CMR_SUM = 0.2 + 0.05 + 0.15


def _forward(layer_values, cfg, num_microbatches=1):
  model = _Probe(layer_values=layer_values)
  batch = _batch()
  params = model.init(jax.random.PRNGKey(0), *train_state.model_inputs(batch)[0])["params"]
  _, m = train_step.loss_and_grads(model, params, batch, cfg, jax.random.PRNGKey(1),
                                   num_microbatches)
  return {k: float(v) for k, v in m.items()}


@pytest.mark.parametrize("num_microbatches", [1, 2])
def test_train_step_adds_factor_times_sum_over_layers(num_microbatches):
  cfg = train_step.LossConfig(z_loss=0.0, aux_loss_factor=0.0,
                              cluster_loss_factor=0.05, cmr_budget_loss_factor=0.1)
  m = _forward(LAYERS, cfg, num_microbatches)
  assert m["moe_cluster_loss"] == pytest.approx(0.05 * CLUSTER_SUM, rel=1e-6)
  assert m["cmr_budget_loss"] == pytest.approx(0.1 * CMR_SUM, rel=1e-6)
  assert m["loss"] == pytest.approx(m["cross_entropy"] + 0.05 * CLUSTER_SUM
                                    + 0.1 * CMR_SUM, rel=1e-6)


def test_weighted_moe_losses_is_factor_times_sum_over_layers():
  inter = {"encoder": {f"layers_{i}": {"moe": {k: (jnp.asarray(v, jnp.float32),)
                                               for k, v in values.items()}}
                       for i, values in enumerate(LAYERS)}}
  factors = dataclasses.asdict(train_step.LossConfig(
      aux_loss_factor=0.0, cluster_loss_factor=0.05, cmr_budget_loss_factor=0.1))
  m = losses.weighted_moe_losses(inter, factors)
  assert float(m["moe_cluster_loss"]) == pytest.approx(0.05 * CLUSTER_SUM, rel=1e-6)
  assert float(m["cmr_budget_loss"]) == pytest.approx(0.1 * CMR_SUM, rel=1e-6)
  assert float(m["moe_aux_loss"]) == 0.0
  with pytest.raises(ValueError, match="cluster_loss_factor"):
    losses.weighted_moe_losses(inter, {"aux_loss_factor": 1.0, "router_z_loss_factor": 1.0})
  # Defaults: cluster 1e-2 (MoEC), CMR 0.1 (NLLB).
  assert losses.DEFAULT_CLUSTER_LOSS_FACTOR == 1e-2
  assert train_step.LossConfig().cmr_budget_loss_factor == 0.1


def test_terms_absent_and_zero_when_features_are_off():
  plain = ({"aux_loss": 0.5},)
  cfg = train_step.LossConfig(z_loss=0.0, aux_loss_factor=0.0,
                              cluster_loss_factor=123.0, cmr_budget_loss_factor=456.0)
  m = _forward(plain, cfg)
  assert "moe_cluster_loss" not in m and "cmr_budget_loss" not in m
  assert m["loss"] == pytest.approx(m["cross_entropy"], rel=1e-6)
  weighted = losses.weighted_moe_losses({}, dataclasses.asdict(train_step.LossConfig()))
  assert set(weighted) == {"moe_aux_loss", "moe_router_z_loss"}


def test_moec_model_sows_cluster_loss_that_the_step_weights():
  """A real MoEC layer: the step's term is factor x the sown per-layer values."""
  moe = MoeConfig(num_experts=4, num_selected_experts=1, d_ff=16, group_size=4,
                  num_expert_clusters=2, capacity_factor_train=4.0, min_expert_capacity=4)
  model = build_model(T5Config(
      vocab_size=16, d_model=8, num_heads=1, d_kv=8, d_ff=16, num_encoder_layers=1,
      num_decoder_layers=1, dropout_rate=0.0, moe=moe,
      encoder_layout=SparseLayout(kind="all"), decoder_layout=SparseLayout(kind="all")))
  batch = _batch(2, 4)
  batch = {k: np.minimum(v, 15) for k, v in batch.items()}
  args, kwargs = train_state.model_inputs(batch)
  params = jax.jit(lambda k: model.init(k, *args, enable_dropout=False))(
      jax.random.PRNGKey(0))["params"]
  cfg = train_step.LossConfig(cluster_loss_factor=0.5)

  @jax.jit
  def both(p, b):
    _, inter = model.apply({"params": p}, *train_state.model_inputs(b)[0],
                           enable_dropout=False, mutable=["intermediates"])
    sums, _ = train_step.forward(model, p, b, cfg, None, enable_dropout=False)
    return inter, sums

  inter, sums = both(params, batch)
  sown = [float(np.sum(leaf)) for path, leaf in
          jax.tree_util.tree_flatten_with_path(inter["intermediates"])[0]
          if "cluster_loss" in jax.tree_util.keystr(path)]
  assert len(sown) == 2 and all(v > 0 for v in sown)   # one per MoE layer
  assert float(sums["moe_cluster_loss"]) == pytest.approx(0.5 * sum(sown), rel=1e-5)


def test_model_sees_the_state_step_inside_the_train_step():
  seen = _Recorder()
  model = _Probe(seen=seen)
  batch = _batch()
  params = model.init(jax.random.PRNGKey(0), *train_state.model_inputs(batch)[0])["params"]
  jax.effects_barrier()
  seen.steps.clear()
  tx = optax.sgd(0.1)
  state = train_state.TrainState(step=jnp.int32(7), params=params, opt_state=tx.init(params),
                                 rng=jax.random.PRNGKey(0), tx=tx)
  step = jax.jit(train_step.make_train_step(model, train_step.LossConfig(),
                                            num_microbatches=2))
  state, _ = step(state, batch)
  state, _ = step(state, batch)
  jax.effects_barrier()
  assert seen.steps == [7, 7, 8, 8]   # both microbatches of steps 7 and 8
  seen.steps.clear()
  train_step.make_eval_step(model, train_step.LossConfig())(state.params, batch)
  jax.effects_barrier()
  assert seen.steps == [-1]           # no schedule outside the train step

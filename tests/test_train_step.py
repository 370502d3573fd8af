"""Train step pieces: losses vs NumPy, MoE metrics, microbatching, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import partitioning
from moe_jax.layers.moe_config import MoeConfig
from moe_jax.models import SparseLayout, T5Config, build_model
from moe_jax.models import losses
from moe_jax.training import metrics, optimizers, train_state, train_step


def test_token_losses_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 3, 5)).astype(np.float32) * 3
  targets = rng.integers(0, 5, (2, 3))
  weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  cfg = train_step.LossConfig(z_loss=1e-2)
  out = {k: float(v) for k, v in train_step.token_losses(
      jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), cfg).items()}
  log_z = np.log(np.exp(logits).sum(-1))
  ce = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  assert out["cross_entropy_sum"] == pytest.approx((ce * weights).sum(), rel=1e-5)
  assert out["z_loss_sum"] == pytest.approx(1e-2 * (log_z ** 2 * weights).sum(), rel=1e-5)
  assert out["correct_sum"] == pytest.approx(
      ((logits.argmax(-1) == targets) * weights).sum())
  assert out["num_tokens"] == 3.0


def test_label_smoothing_optimum_is_zero():
  vocab, eps = 4, 0.1
  target = np.array([[2]])
  soft = np.full(vocab, eps / (vocab - 1))
  soft[2] = 1 - eps
  logits = jnp.asarray(np.log(soft)[None, None])   # the smoothed distribution itself
  out = train_step.token_losses(logits, jnp.asarray(target), jnp.ones((1, 1)),
                                train_step.LossConfig(z_loss=0.0, label_smoothing=eps))
  assert float(out["cross_entropy_sum"]) == pytest.approx(0.0, abs=1e-5)


def test_moe_metrics_are_named_per_layer():
  inter = {"encoder": {"layers_1": {"moe": {
      "aux_loss": (jnp.float32(1.5),), "z_loss": (jnp.float32(2.0),),
      "dropped_fraction": (jnp.float32(0.25),),
      "expert_load": (jnp.array([0.5, 0.25, 0.25, 0.0]),),
      "router_confidence": (jnp.float32(0.7),)}}},
           "decoder": {"layers_0": {"moe": {"aux_loss": (jnp.float32(0.5),)}}}}
  out = {k: float(v) for k, v in metrics.moe_metrics(inter).items()}
  assert out["moe/encoder/layers_1/moe/aux_loss"] == 1.5
  assert out["moe/encoder/layers_1/moe/expert_load_max"] == 2.0   # 4 experts * 0.5
  assert out["moe/encoder/layers_1/moe/dropped_fraction"] == 0.25
  assert out["moe/mean/aux_loss"] == 1.0
  assert float(losses.sum_sown(inter, "aux_loss")) == 2.0


def _tiny_moe_model():
  # Group size == sequence length: every group is one example, so the MoE
  # groups (and the per-group aux losses) are the same with or without
  # microbatches; capacity 8 == group size, so nothing is dropped.
  moe = MoeConfig(num_experts=4, num_selected_experts=1, d_ff=32, group_size=8,
                  capacity_factor_train=4.0, min_expert_capacity=8)
  return build_model(T5Config(
      vocab_size=64, d_model=16, num_heads=2, d_kv=8, d_ff=32, num_encoder_layers=1,
      num_decoder_layers=1, dropout_rate=0.0, moe=moe,
      encoder_layout=SparseLayout(kind="all"), decoder_layout=SparseLayout(kind="all")))


def _batch(n=16, length=8, vocab=64, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, (n, length)).astype(np.int32)
  weights = (rng.random((n, length)) > 0.2).astype(np.float32)
  return {"encoder_input_tokens": tokens[:, ::-1].copy(),
          "decoder_input_tokens": np.concatenate([np.zeros((n, 1), np.int32),
                                                  tokens[:, :-1]], 1),
          "decoder_target_tokens": tokens, "decoder_loss_weights": weights}


def _grads(model, params, batch, mesh, num_microbatches):
  partitioner = partitioning.Partitioner(mesh, partitioning.standard_logical_rules())

  def f(p, b):
    return train_step.loss_and_grads(model, p, b, train_step.LossConfig(),
                                     jax.random.PRNGKey(1), num_microbatches, mesh)

  with partitioner.activate():
    batch = partitioner.global_batch(batch)
    grads, m = jax.jit(f)(params, batch)
  return jax.device_get(grads), {k: float(v) for k, v in m.items()}


@pytest.fixture(scope="module")
def full_batch_reference():
  """Params (seed 3) and full-batch grads on ONE device: the reference."""
  model = _tiny_moe_model()
  one = partitioning.Partitioner.create({"data": 1}, devices=jax.devices()[:1])
  tx = optimizers.make_optimizer("adamw")
  shapes = train_state.dummy_batch(16, {"inputs": 8, "targets": 8})
  state, _ = train_state.init_train_state(model, tx, one, shapes, seed=3)
  params = jax.device_get(state.params)
  grads, m = _grads(model, params, _batch(), one.mesh, 1)
  return model, params, grads, m


def test_microbatched_sharded_grads_equal_full_batch_unsharded(full_batch_reference):
  model, params, g_full, m_full = full_batch_reference
  batch = _batch()
  eight = partitioning.make_mesh({"data": 2, "expert": 4})
  g_micro, m_micro = _grads(model, params, batch, eight, 2)

  assert m_full["num_tokens"] == pytest.approx(batch["decoder_loss_weights"].sum())
  for key in ("loss", "cross_entropy", "moe_aux_loss", "moe_router_z_loss", "accuracy"):
    assert m_micro[key] == pytest.approx(m_full[key], rel=1e-5, abs=1e-7), key
  assert m_full["moe_aux_loss"] > 0
  flat_full = jax.tree_util.tree_leaves_with_path(g_full)
  flat_micro = jax.tree_util.tree_leaves(g_micro)
  assert len(flat_full) == len(flat_micro)
  for (path, a), b in zip(flat_full, flat_micro):
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  # Gradients reach the experts and the router.
  enc_moe = g_full["encoder"]["layers"]["layers_0"]["moe"]
  assert np.abs(enc_moe["router_kernel"]).max() > 0
  assert np.abs(enc_moe["experts"]["wi_0"]).max() > 0


def test_train_step_applies_optimizer_and_reports_metrics(full_batch_reference):
  """One jitted, donated step on data=2 x expert=4 equals a hand Adam update
  of the one-device full-batch gradients."""
  model, ref_params, grads, _ = full_batch_reference
  partitioner = partitioning.Partitioner.create({"data": 2, "expert": 4})
  lr = 1e-3
  schedule = optimizers.make_schedule("constant", lr, warmup_steps=0)
  tx = optimizers.make_optimizer("adamw", schedule, weight_decay=0.0, eps=1e-8)
  shapes = train_state.dummy_batch(16, {"inputs": 8, "targets": 8})
  state, layout = train_state.init_train_state(model, tx, partitioner, shapes, seed=3)
  before = jax.device_get(state.params)
  for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(ref_params)):
    np.testing.assert_array_equal(a, b)   # same init on 8 devices as on 1
  wi = state.params["encoder"]["layers"]["layers_0"]["moe"]["experts"]["wi_0"]
  assert wi.sharding.spec[0] == "expert"   # created sharded, expert dim over 'expert'
  step = train_step.jitted_train_step(layout, train_step.LossConfig(), schedule)
  with partitioner.activate():
    new_state, m = step(state, partitioner.global_batch(_batch()))
  assert state.step.is_deleted()   # donated
  assert int(new_state.step) == 1
  assert float(m["learning_rate"]) == pytest.approx(lr)
  after = jax.device_get(new_state.params)
  # Adam's first step: -lr * g / (|g| + eps) (bias corrections cancel).
  for a, b, g in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after),
                     jax.tree_util.tree_leaves(grads)):
    np.testing.assert_allclose(b, a - lr * g / (np.abs(g) + 1e-8), rtol=1e-4, atol=1e-6)
  assert float(m["grad_norm"]) == pytest.approx(
      np.sqrt(sum(float((g.astype(np.float64) ** 2).sum())
                  for g in jax.tree_util.tree_leaves(grads))), rel=1e-4)

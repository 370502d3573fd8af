"""Conditional MoE Routing (NLLB): formulas vs NumPy, gate limits, scan, grads."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.layers import conditional
from moe_jax.layers import moe_metrics as mc
from moe_jax.layers.moe_config import MoeConfig
from moe_jax.models import SparseLayout, T5Config, build_model
from moe_jax.models import blocks

CMR = conditional.ConditionalRoutingConfig(gate_dropout_rate=0.2, budget_target=0.8)
MOE = MoeConfig(num_experts=4, num_selected_experts=2, d_ff=16, group_size=64,
                capacity_factor_eval=4.0)
BASE = T5Config(vocab_size=32, d_model=8, num_heads=2, d_kv=4, d_ff=16,
                num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0,
                relative_attention_num_buckets=4, relative_attention_max_distance=8,
                moe=MOE)


def _layout(cmr=CMR):
  return SparseLayout("every", every=2, conditional_routing=cmr)


def _cfg(cmr=CMR, **kw):
  return dataclasses.replace(BASE, encoder_layout=_layout(cmr),
                             decoder_layout=_layout(cmr), **kw)


def _batch(seed=0, b=2, length=6):
  rng = np.random.default_rng(seed)
  enc = rng.integers(1, 32, (b, length)).astype(np.int32)
  enc[0, 4:] = 0  # padding
  tgt = rng.integers(1, 32, (b, length)).astype(np.int32)
  dec_in = np.concatenate([np.zeros((b, 1), np.int32), tgt[:, :-1]], 1)
  return enc, dec_in, tgt


# --------------------------------------------------------------------------
# Formulas
# --------------------------------------------------------------------------
def test_mix_matches_numpy():
  rng = np.random.default_rng(0)
  dense = rng.normal(size=(2, 3, 4)).astype(np.float32)
  moe = rng.normal(size=(2, 3, 4)).astype(np.float32)
  g = rng.uniform(size=(2, 3)).astype(np.float32)
  want = (1 - g[..., None]) * dense + g[..., None] * moe
  np.testing.assert_allclose(conditional.mix(dense, moe, g), want, rtol=1e-6, atol=1e-6)


def test_budget_loss_hand_worked_with_padding():
  gate = np.array([[0.9, 0.5, 0.1], [1.0, 0.2, 0.7]], np.float32)
  mask = np.array([[1, 1, 0], [1, 0, 0]], np.int32)  # real: 0.9, 0.5, 1.0
  # mean over real tokens = 2.4 / 3 = 0.8 -> |0.8 - 0.8| = 0; target 0.5 -> 0.3
  assert float(conditional.budget_loss(gate, mask, 0.8)) == pytest.approx(0.0, abs=1e-6)
  assert float(conditional.budget_loss(gate, mask, 0.5)) == pytest.approx(0.3, abs=1e-6)
  # without a mask every position counts: mean 3.4 / 6
  assert float(conditional.budget_loss(gate, None, 0.8)) == pytest.approx(
      abs(3.4 / 6 - 0.8), abs=1e-6)
  # all padding: mean taken as 0, loss = target
  assert float(conditional.budget_loss(gate, np.zeros_like(mask), 0.8)) == pytest.approx(0.8)


def test_gate_dropout_is_inverted_dropout():
  g = jnp.full((200, 50), 0.6, jnp.float32)
  out = np.asarray(conditional.gate_dropout(g, 0.2, jax.random.PRNGKey(3)))
  kept = out != 0
  np.testing.assert_allclose(out[kept], 0.6 / 0.8, rtol=1e-6)
  assert abs(1 - kept.mean() - 0.2) < 0.02
  np.testing.assert_array_equal(conditional.gate_dropout(g, 0.0, jax.random.PRNGKey(3)), g)


def test_gate_module_matches_numpy_and_sows():
  rng = np.random.default_rng(1)
  h = rng.normal(size=(2, 5, 8)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
  gate_mod = conditional.ConditionalRoutingGate(CMR)
  params = {"kernel": rng.normal(size=(8, 1)).astype(np.float32),
            "bias": np.array([0.3], np.float32)}
  g, st = gate_mod.apply({"params": params}, h, mask, mutable=["intermediates"])
  want = 1 / (1 + np.exp(-(h @ params["kernel"][:, 0] + 0.3)))
  np.testing.assert_allclose(g, want, rtol=1e-5)
  mean = (want * mask).sum() / mask.sum()
  inter = st["intermediates"]
  assert float(inter[mc.CMR_GATE_MEAN][0]) == pytest.approx(mean, rel=1e-5)
  assert float(inter[mc.CMR_BUDGET_LOSS][0]) == pytest.approx(abs(mean - 0.8), rel=1e-5)
  # training: dropped gates are 0, kept ones g / (1 - p); the budget uses them.
  gd, st = gate_mod.apply({"params": params}, h, mask, deterministic=False,
                          rngs={"dropout": jax.random.PRNGKey(5)}, mutable=["intermediates"])
  gd = np.asarray(gd)
  kept = gd != 0
  np.testing.assert_allclose(gd[kept], want[kept] / 0.8, rtol=1e-5)
  mean_d = (gd * mask).sum() / mask.sum()
  assert float(st["intermediates"][mc.CMR_BUDGET_LOSS][0]) == pytest.approx(
      abs(mean_d - 0.8), rel=1e-5)


def test_config_errors_say_how_to_fix():
  with pytest.raises(ValueError, match="NLLB default is 0.2"):
    conditional.ConditionalRoutingConfig(gate_dropout_rate=1.0)
  with pytest.raises(ValueError, match="budget_target"):
    conditional.ConditionalRoutingConfig(budget_target=1.5)
  with pytest.raises(ValueError, match="enable only one"):
    SparseLayout("all", residual=True, conditional_routing=CMR)


# --------------------------------------------------------------------------
# In a transformer layer / the model
# --------------------------------------------------------------------------
def _set_gate_bias(params, value):
  """Zero CMR gate kernels and set their biases: every gate = sigmoid(value)."""
  def fix(path, x):
    keys = [getattr(k, "key", None) for k in path]
    if "cmr_gate" in keys:
      return np.full_like(x, value) if keys[-1] == "bias" else np.zeros_like(x)
    return x
  return jax.tree_util.tree_map_with_path(fix, params)


def _random_params(init_fn, seed=0):
  """Params shaped like ``init_fn()``'s, filled with N(0, 0.3^2) (cheaper than init)."""
  shapes = nn.unbox(jax.eval_shape(init_fn)["params"])
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: (0.3 * rng.normal(size=s.shape)).astype(s.dtype), shapes)


def _layer(layout, num_experts=4):
  return blocks.TransformerLayer(BASE, layout, num_experts)


def _layer_inputs():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 6, 8)).astype(np.float32)
  mask = np.ones((2, 6), bool)
  mask[0, 4:] = False
  return x, np.zeros((1, 2, 6, 6), np.float32), mask


def _layer_out(layer, params):
  x, bias, mask = _layer_inputs()
  return np.asarray(jax.jit(lambda p: layer.apply({"params": p}, x, bias,
                                                  padding_mask=mask))(params))


def test_gate_one_is_moe_only_and_gate_zero_is_dense():
  x, bias, mask = _layer_inputs()
  cmr_layer = _layer(_layout())
  params = _random_params(lambda: cmr_layer.init(jax.random.PRNGKey(0), x, bias,
                                                 padding_mask=mask))
  assert {"mlp", "moe", "cmr_gate"} <= set(params)
  rest = {k: v for k, v in params.items() if k not in ("mlp", "moe", "cmr_gate")}
  np.testing.assert_allclose(
      _layer_out(cmr_layer, _set_gate_bias(params, 40.0)),
      _layer_out(_layer(_layout(None)), dict(rest, moe=params["moe"])),
      rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      _layer_out(cmr_layer, _set_gate_bias(params, -40.0)),
      _layer_out(_layer(_layout(None), num_experts=0), dict(rest, mlp=params["mlp"])),
      rtol=1e-5, atol=1e-5)


def test_model_sows_per_sparse_layer_and_scan_matches_unrolled():
  cfg = _cfg()
  enc, dec_in, tgt = _batch()
  model = build_model(cfg)
  params = _random_params(lambda: model.init(jax.random.PRNGKey(0), enc, dec_in, tgt,
                                             enable_dropout=False))
  params = _set_gate_bias(params, np.log(3.0))  # gate = 0.75 everywhere
  run = jax.jit(lambda p: model.apply({"params": p}, enc, dec_in, tgt,
                                      enable_dropout=False, mutable=["intermediates"]))
  logits, st = run(params)
  inter = st["intermediates"]
  for stack in ("encoder", "decoder"):
    sown = inter[stack]["layers"]["layers_1"]["cmr_gate"]
    assert float(sown[mc.CMR_GATE_MEAN][0]) == pytest.approx(0.75, rel=1e-5)
    assert float(sown[mc.CMR_BUDGET_LOSS][0]) == pytest.approx(0.05, abs=1e-5)
    assert "cmr_gate" not in inter[stack]["layers"].get("layers_0", {})

  scanned_model = build_model(dataclasses.replace(cfg, scan_layers=True))
  scanned = dict(params)
  for stack in ("encoder", "decoder"):
    st_params = dict(params[stack])
    st_params["layers"] = blocks.unrolled_to_scanned(st_params["layers"], 2, 2)
    scanned[stack] = st_params
  out, st = jax.jit(lambda p: scanned_model.apply(
      {"params": p}, enc, dec_in, tgt, enable_dropout=False,
      mutable=["intermediates"]))(scanned)
  np.testing.assert_allclose(out, logits, rtol=1e-5, atol=1e-5)
  sown = st["intermediates"]["encoder"]["layers"]["layers"]["layer_1"]["cmr_gate"]
  np.testing.assert_allclose(sown[mc.CMR_BUDGET_LOSS][0], [0.05], atol=1e-5)


def test_gradients_finite_and_reach_the_gate():
  layer = _layer(_layout())
  x, bias, mask = _layer_inputs()
  params = _random_params(lambda: layer.init(jax.random.PRNGKey(0), x, bias,
                                             padding_mask=mask))
  train_layer = layer.clone(deterministic=False)

  def loss_fn(p):
    y, st = train_layer.apply({"params": p}, x, bias, padding_mask=mask,
                              rngs={"dropout": jax.random.PRNGKey(1)},
                              mutable=["intermediates"])
    budget = st["intermediates"]["cmr_gate"][mc.CMR_BUDGET_LOSS][0]
    return jnp.mean(jnp.square(y)) + 0.1 * budget

  grads = jax.jit(jax.grad(loss_fn))(params)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))
  for name in ("cmr_gate", "mlp", "moe"):
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree_util.tree_leaves(grads[name])), name

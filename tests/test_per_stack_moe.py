"""Per-stack MoE configs (T5Config.encoder_moe / decoder_moe).

The sparse-upcycling language recipe: experts-choose routing in the encoder,
top-2 tokens-choose in the decoder. Each stack must compute exactly what a
model with that config everywhere computes, train a step and decode.
"""

import dataclasses

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_jax import gin_utils, upcycle
from moe_jax.checkpoints import upcycling
from moe_jax.layers.moe_config import MoeConfig
from moe_jax.models import SparseLayout, T5Config, build_model, decoding

TOP2 = MoeConfig(num_experts=4, num_selected_experts=2, d_ff=16, group_size=64,
                 capacity_factor_train=1.0, capacity_factor_eval=1.0)
EC = dataclasses.replace(TOP2, router_type="experts_choose")
BASE = T5Config(vocab_size=32, d_model=8, num_heads=2, d_kv=4, d_ff=16,
                num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0,
                relative_attention_num_buckets=4, relative_attention_max_distance=8,
                moe=TOP2, encoder_layout=SparseLayout("all"),
                decoder_layout=SparseLayout("all"))
MIXED = dataclasses.replace(BASE, encoder_moe=EC)


def _batch(b=8, length=6, seed=0):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, 32, (b, length)).astype(np.int32)
  enc[0, 4:] = 0
  tgt = rng.integers(2, 32, (b, length)).astype(np.int32)
  dec_in = np.concatenate([np.zeros((b, 1), np.int32), tgt[:, :-1]], 1)
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
          "decoder_target_tokens": tgt}


def test_stack_moe_fallbacks_and_errors():
  assert MIXED.stack_moe("encoder") is EC and MIXED.stack_moe("decoder") is TOP2
  assert MIXED.moe_configs() == (EC, TOP2) and MIXED.has_moe
  only_own = dataclasses.replace(BASE, moe=None, encoder_moe=EC, decoder_moe=TOP2)
  assert only_own.moe is None and only_own.stack_moe("decoder") is TOP2
  assert BASE.moe_configs() == (TOP2,)
  assert not dataclasses.replace(
      BASE, encoder_layout=SparseLayout(), decoder_layout=SparseLayout()).has_moe
  bigger = MIXED.replace_moe(capacity_factor_eval=8.0)
  assert {m.capacity_factor_eval for m in bigger.moe_configs()} == {8.0}
  assert bigger.stack_moe("encoder").router_type == "experts_choose"
  with pytest.raises(ValueError, match="decoder_moe"):
    dataclasses.replace(BASE, moe=EC)  # experts-choose in the causal decoder
  with pytest.raises(ValueError, match="neither T5Config.decoder_moe nor T5Config.moe"):
    dataclasses.replace(BASE, moe=None, encoder_moe=EC)
  with pytest.raises(ValueError, match="'encoder' or 'decoder'"):
    MIXED.stack_moe("middle")


def _random_params(config, batch):
  model = build_model(config)
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), batch["encoder_input_tokens"], batch["decoder_input_tokens"],
      batch["decoder_target_tokens"], enable_dropout=False))["params"])
  rng = np.random.default_rng(1)
  return jax.tree_util.tree_map(
      lambda s: (0.5 * rng.normal(size=s.shape)).astype(s.dtype), shapes)


def test_each_stack_computes_with_its_own_config():
  batch = _batch(b=2)
  params = _random_params(MIXED, batch)
  enc_tokens = batch["encoder_input_tokens"]
  all_top2 = BASE
  ec_encoder = dataclasses.replace(BASE, moe=EC, decoder_layout=SparseLayout())

  @jax.jit
  def outputs(p):
    def encode(cfg):
      return build_model(cfg).apply({"params": p}, enc_tokens, enable_dropout=False,
                                    method="encode")

    def decode(cfg, encoded):
      return build_model(cfg).apply(
          {"params": p}, encoded, enc_tokens, batch["decoder_input_tokens"],
          batch["decoder_target_tokens"], enable_dropout=False, method="decode")
    encoded = encode(MIXED)
    return (encoded, encode(ec_encoder), encode(all_top2), decode(MIXED, encoded),
            decode(all_top2, encoded))

  mixed_enc, ec_enc, top2_enc, mixed_dec, top2_dec = map(np.asarray, outputs(params))
  np.testing.assert_allclose(mixed_enc, ec_enc, rtol=1e-6, atol=1e-6)
  assert np.max(np.abs(mixed_enc - top2_enc)) > 1e-3  # the routers really differ
  np.testing.assert_allclose(mixed_dec, top2_dec, rtol=1e-6, atol=1e-6)


def test_mixed_model_inits_trains_a_step_and_decodes():
  # Ample capacity in training and eval: teacher forcing then drops no token,
  # exactly like decoding (capacity_factor_decode=None).
  cfg = MIXED.replace_moe(capacity_factor_train=4.0, capacity_factor_eval=4.0)
  model = build_model(cfg)
  batch = _batch(b=2)
  params = _random_params(cfg, batch)  # init traced by jax.eval_shape
  enc = batch["encoder_input_tokens"]
  out = np.asarray(decoding.sample_decode(model, params, max_decode_length=6,
                                          encoder_input_tokens=enc, temperature=0.0,
                                          eos_id=-1))
  assert out.shape == (2, 6)
  dec_in = np.concatenate([np.zeros((2, 1), np.int32), out[:, :-1]], 1)
  tx = optax.adamw(1e-2)

  def loss_fn(p):
    logits = model.apply({"params": p}, enc, dec_in, np.ones_like(out),
                         enable_dropout=True, rngs={"dropout": jax.random.PRNGKey(1)})
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, out[..., None], -1)), logits

  @jax.jit
  def step(p, opt_state):
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), loss, grads, logits

  new_params, loss, grads, logits = step(params, tx.init(params))
  # Greedy decoding (KV cache) picks the teacher-forced argmax at every step.
  np.testing.assert_array_equal(np.argmax(logits, -1), out)
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves((grads, new_params)))
  for stack in ("encoder", "decoder"):
    router_grad = np.asarray(grads[stack]["layers"]["layers_0"]["moe"]["router_kernel"])
    assert np.any(router_grad != 0), stack


def test_sparse_upcycle_gin_is_the_paper_recipe_and_round_trips():
  gin_utils.parse_gin(["runs/sparse_upcycle.gin"], ["T5Config.d_ff = 2048"], finalize=False)
  try:
    cfg = gin_utils.register_configurables()["T5Config"]()
  finally:
    gin.clear_config()
  enc, dec = cfg.stack_moe("encoder"), cfg.stack_moe("decoder")
  assert enc.router_type == "experts_choose" and dec.router_type == "tokens_choose"
  assert dec.num_selected_experts == 2 and dec.renormalize_top_k
  # paper C = 2 (flaxformer convention) = k * capacity_factor here.
  for moe in (enc, dec):
    assert moe.num_experts == 32 and moe.num_selected_experts * moe.capacity_factor_train == 2
  assert upcycling.exact_expected(cfg)[0]
  text = upcycle.model_gin(cfg)
  gin.parse_config(text.replace("MODEL_CONFIG = @T5Config()\n", ""))
  try:
    rebuilt = gin_utils.register_configurables()["T5Config"]()
  finally:
    gin.clear_config()
  assert rebuilt == cfg

"""T5 v1.1 model behaviour: causality, padding, packing, scan, remat, sharding."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import partitioning
from moe_jax.layers.moe_config import MoeConfig
from moe_jax.models import SparseLayout, T5Config, build_model
from moe_jax.models import losses
from moe_jax.models.blocks import unrolled_to_scanned
from moe_jax.training import metrics, train_step

VOCAB = 32
# Capacity large enough that no token is ever dropped: every token's output
# then depends only on itself, as the equalities below require.
MOE = MoeConfig(num_experts=4, num_selected_experts=2, d_ff=16, group_size=64,
                capacity_factor_train=4.0, capacity_factor_eval=4.0)
BASE = T5Config(vocab_size=VOCAB, d_model=16, num_heads=2, d_kv=8, d_ff=24,
                num_encoder_layers=2, num_decoder_layers=1, dropout_rate=0.0,
                relative_attention_num_buckets=8, relative_attention_max_distance=16,
                moe=MOE, encoder_layout=SparseLayout("every", every=2),
                decoder_layout=SparseLayout("all"))


def _total_loss(logits, targets, intermediates):
  """Token CE (+ z-loss) averaged over targets > 0, plus the weighted MoE terms
  (the definitions the train step uses, default factors)."""
  per_token, _ = losses.token_cross_entropy(logits, targets, 0.0, 1e-4)
  w = (targets > 0).astype(jnp.float32)
  moe = losses.weighted_moe_losses(intermediates,
                                   dataclasses.asdict(train_step.LossConfig()))
  return jnp.sum(per_token * w) / jnp.sum(w) + sum(moe.values())


def _batch(batch=2, enc_len=8, dec_len=6, seed=0):
  rng = np.random.RandomState(seed)
  enc = rng.randint(2, VOCAB, (batch, enc_len)).astype(np.int32)
  tgt = rng.randint(2, VOCAB, (batch, dec_len)).astype(np.int32)
  dec = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
  return enc, dec, tgt


def _init(config, enc, dec, tgt, seed=0):
  model = build_model(config)
  variables = jax.jit(lambda k: model.init(k, enc, dec, tgt, enable_dropout=False))(
      jax.random.PRNGKey(seed))
  return model, nn.unbox(variables["params"])


@pytest.fixture(scope="module")
def tiny():
  enc, dec, tgt = _batch()
  model, params = _init(BASE, enc, dec, tgt)
  apply = jax.jit(lambda p, e, d, t: model.apply({"params": p}, e, d, t,
                                                 enable_dropout=False))
  return model, params, apply


def test_logits_shape_and_t5_v11_parameter_layout(tiny):
  model, params, apply = tiny
  enc, dec, tgt = _batch()
  logits = apply(params, enc, dec, tgt)
  assert logits.shape == (2, 6, VOCAB) and logits.dtype == jnp.float32
  dense_layer = params["encoder"]["layers"]["layers_0"]
  # No biases anywhere; RMS norms have a scale only; untied output projection.
  leaves = jax.tree_util.tree_leaves_with_path(params)
  assert not any("bias" in jax.tree_util.keystr(p) and "relpos" not in
                 jax.tree_util.keystr(p) for p, _ in leaves)
  assert set(dense_layer["pre_mlp_norm"]) == {"scale"}
  assert set(dense_layer["mlp"]) == {"wi_0", "wi_1", "wo"}
  assert params["decoder"]["logits_dense"]["kernel"].shape == (16, VOCAB)
  # One relative position table per stack (shared by its layers).
  assert params["encoder"]["relpos_bias"]["rel_embedding"].shape == (2, 8)
  assert "relpos_bias" not in dense_layer


def test_decoder_is_causal(tiny):
  model, params, apply = tiny
  enc, dec, tgt = _batch()
  base = np.asarray(apply(params, enc, dec, tgt))
  dec2, tgt2 = dec.copy(), tgt.copy()
  dec2[:, 4:] = (dec2[:, 4:] + 5) % (VOCAB - 2) + 2
  changed = np.asarray(apply(params, enc, dec2, tgt2))
  np.testing.assert_allclose(changed[:, :4], base[:, :4], atol=1e-5)
  assert np.abs(changed[:, 4:] - base[:, 4:]).max() > 1e-3


def test_padding_does_not_change_real_positions(tiny):
  model, params, apply = tiny
  enc, dec, tgt = _batch()
  enc[:, 6:] = 0
  tgt[:, 4:] = 0
  dec[:, 5:] = 0
  base = np.asarray(apply(params, enc, dec, tgt))
  # Garbage in the padded slots must not reach real positions.
  trimmed = jax.jit(lambda p, e, d, t: tiny[0].apply({"params": p}, e, d, t,
                                                    enable_dropout=False))
  other = np.asarray(trimmed(params, enc[:, :6], dec[:, :4], tgt[:, :4]))
  np.testing.assert_allclose(other, base[:, :4], atol=1e-5)


def _stack_to_scanned(params, config):
  out = {k: dict(v) if isinstance(v, dict) else v for k, v in params.items()}
  for stack in ("encoder", "decoder"):
    layout = getattr(config, f"{stack}_layout")
    n = getattr(config, f"num_{stack}_layers")
    period = layout.scan_period(n, config.moe.num_experts)
    out[stack]["layers"] = unrolled_to_scanned(params[stack]["layers"], n, period)
  return out


@pytest.mark.slow  # end-to-end; pytest -m slow
def test_scan_with_remat_equals_unrolled_incl_gradients_and_moe_metrics():
  config = dataclasses.replace(BASE, num_encoder_layers=4, num_decoder_layers=2,
                               decoder_layout=SparseLayout("explicit", layers=(0, 1)))
  enc, dec, tgt = _batch()
  model, params = _init(config, enc, dec, tgt)
  scan_cfg = dataclasses.replace(config, scan_layers=True, remat_policy="dots_saveable")
  scan_model = build_model(scan_cfg)
  scan_params = _stack_to_scanned(params, config)
  # The converted tree is exactly what the scanned model initialises.
  fresh = jax.eval_shape(lambda: scan_model.init(jax.random.PRNGKey(0), enc, dec, tgt,
                                                  enable_dropout=False))
  assert (jax.tree_util.tree_structure(nn.unbox(fresh["params"]))
          == jax.tree_util.tree_structure(scan_params))

  def run(m, p, cfg):
    def loss_fn(p):
      logits, state = m.apply({"params": p}, enc, dec, tgt, enable_dropout=False,
                              mutable=["intermediates"])
      return _total_loss(logits, tgt, state["intermediates"]), (
          logits, state["intermediates"])
    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(p)

  (loss, (logits, inter)), grads = run(model, params, config)
  (scan_loss, (scan_logits, scan_inter)), scan_grads = run(scan_model, scan_params,
                                                           scan_cfg)
  np.testing.assert_allclose(scan_logits, logits, atol=1e-5)
  np.testing.assert_allclose(scan_loss, loss, atol=1e-6)
  per_layer = metrics.moe_metrics(inter, config)
  scan_per_layer = metrics.moe_metrics(scan_inter, scan_cfg)
  assert sorted(per_layer) == sorted(scan_per_layer)
  assert {k.rsplit("/", 2)[0] for k in per_layer if not k.startswith("moe/mean/")} == {
      f"moe/{stack}/layers/layers_{i}"
      for stack, i in (("encoder", 1), ("encoder", 3), ("decoder", 0), ("decoder", 1))}
  for k, v in per_layer.items():
    np.testing.assert_allclose(scan_per_layer[k], v, atol=1e-5, err_msg=k)
  # Gradients (through remat, scan and the MoE aux losses) agree too.
  g_as_scan = _stack_to_scanned(grads, config)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_as_scan),
                          jax.tree_util.tree_leaves(scan_grads)):
    np.testing.assert_allclose(b, a, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_scanned_program_size_is_flat_in_depth():
  """Under scan the lowered program must not grow with the number of layers."""
  enc, dec, tgt = _batch()

  def hlo_size(n):
    cfg = dataclasses.replace(BASE, num_encoder_layers=n, num_decoder_layers=n,
                              scan_layers=True)
    m = build_model(cfg)
    abstract = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), enc, dec, tgt,
                                             enable_dropout=False))
    text = jax.jit(lambda v: m.apply(v, enc, dec, tgt, enable_dropout=False)).lower(
        abstract).as_text()
    return len(text)

  small, deep = hlo_size(2), hlo_size(8)
  assert deep < small * 1.05, (small, deep)


def test_packed_sequences_equal_separate_sequences():
  config = dataclasses.replace(BASE, num_encoder_layers=1,
                               encoder_layout=SparseLayout(),
                               decoder_layout=SparseLayout())
  rng = np.random.RandomState(3)
  a_enc, b_enc = rng.randint(2, VOCAB, 5), rng.randint(2, VOCAB, 3)
  a_tgt, b_tgt = rng.randint(2, VOCAB, 4), rng.randint(2, VOCAB, 3)
  shift = lambda t: np.concatenate([[0], t[:-1]])  # noqa: E731
  enc = np.concatenate([a_enc, b_enc])[None].astype(np.int32)
  tgt = np.concatenate([a_tgt, b_tgt])[None].astype(np.int32)
  dec = np.concatenate([shift(a_tgt), shift(b_tgt)])[None].astype(np.int32)
  enc_seg = np.array([[1] * 5 + [2] * 3], np.int32)
  dec_seg = np.array([[1] * 4 + [2] * 3], np.int32)
  enc_pos = np.array([list(range(5)) + list(range(3))], np.int32)
  dec_pos = np.array([list(range(4)) + list(range(3))], np.int32)
  model, params = _init(config, enc, dec, tgt)
  packed = jax.jit(lambda p: model.apply(
      {"params": p}, enc, dec, tgt, enc_seg, dec_seg, enc_pos, dec_pos,
      enable_dropout=False))(params)
  # Reference: the two examples run separately (padded to the same lengths).
  sep_enc = np.zeros((2, 8), np.int32)
  sep_enc[0, :5], sep_enc[1, :3] = a_enc, b_enc
  sep_tgt = np.zeros((2, 7), np.int32)
  sep_tgt[0, :4], sep_tgt[1, :3] = a_tgt, b_tgt
  sep_dec = np.zeros((2, 7), np.int32)
  sep_dec[0, :4], sep_dec[1, :3] = shift(a_tgt), shift(b_tgt)
  sep = jax.jit(lambda p: model.apply({"params": p}, sep_enc, sep_dec, sep_tgt,
                                      enable_dropout=False))(params)
  np.testing.assert_allclose(packed[0, :4], sep[0, :4], atol=1e-5)
  np.testing.assert_allclose(packed[0, 4:], sep[1, :3], atol=1e-5)


def test_sharded_equals_unsharded_on_data_x_expert_mesh():
  enc, dec, tgt = _batch(batch=8, enc_len=4, dec_len=4, seed=5)
  enc[1, 2:] = 0
  tgt[2, 3:] = 0
  # 4-token groups: 8 groups whether or not the batch is sharded 8 ways, so
  # the per-group aux loss is the same computation in both runs.
  config = dataclasses.replace(BASE, moe=dataclasses.replace(MOE, group_size=4))
  model, params = _init(config, enc, dec, tgt)

  def loss_and_logits(p):
    logits, state = model.apply({"params": p}, enc, dec, tgt, enable_dropout=False,
                                mutable=["intermediates"])
    return _total_loss(logits, tgt, state["intermediates"]), logits

  ref_loss, ref_logits = jax.jit(loss_and_logits)(params)
  mesh = partitioning.make_mesh({"data": 2, "expert": 4})
  rules = partitioning.standard_logical_rules()
  with partitioning.with_sharding(mesh, rules):
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), enc, dec, tgt,
                                                 enable_dropout=False))
    shardings = partitioning.params_shardings(mesh, abstract, rules)["params"]
    sharded_params = jax.device_put(params, shardings)
    loss, logits = jax.jit(loss_and_logits, in_shardings=(shardings,))(sharded_params)
  wo = sharded_params["decoder"]["layers"]["layers_0"]["moe"]
  expert_leaf = jax.tree_util.tree_leaves(wo)
  assert any(len(x.sharding.device_set) == 8 and x.ndim == 3 for x in expert_leaf)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
  np.testing.assert_allclose(loss, ref_loss, atol=1e-6)


def test_tied_embeddings_and_dropout():
  config = dataclasses.replace(BASE, logits_via_embedding=True, dropout_rate=0.5,
                               num_encoder_layers=1, encoder_layout=SparseLayout(),
                               decoder_layout=SparseLayout())
  enc, dec, tgt = _batch()
  model, params = _init(config, enc, dec, tgt)
  assert "logits_dense" not in params["decoder"]
  run = jax.jit(lambda p, key: model.apply(
      {"params": p}, enc, dec, tgt, enable_dropout=True, rngs={"dropout": key}))
  a = run(params, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, run(params, jax.random.PRNGKey(1)))
  assert np.abs(np.asarray(a) - np.asarray(run(params, jax.random.PRNGKey(2)))).max() > 1e-3


def test_decoder_only_causal_and_prefix_lm():
  config = dataclasses.replace(BASE, decoder_only=True, prefix_lm=True,
                               decoder_layout=SparseLayout("bottom", count=1))
  rng = np.random.RandomState(7)
  tgt = rng.randint(2, VOCAB, (2, 6)).astype(np.int32)
  dec = np.concatenate([np.zeros((2, 1), np.int32), tgt[:, :-1]], axis=1)
  prefix = np.zeros((2, 6), np.int32)
  prefix[:, :3] = 1
  model = build_model(config)
  params = nn.unbox(jax.jit(lambda k: model.init(k, dec, tgt, enable_dropout=False))(
      jax.random.PRNGKey(0))["params"])
  assert set(params) == {"token_embedder", "decoder"}
  assert "moe" in params["decoder"]["layers"]["layers_0"]
  run = jax.jit(lambda d, ca: model.apply({"params": params}, d, tgt,
                                          decoder_causal_attention=ca,
                                          enable_dropout=False))
  base = np.asarray(run(dec, prefix))
  changed_dec = dec.copy()
  changed_dec[:, 2] = (changed_dec[:, 2] + 1) % (VOCAB - 2) + 2
  changed = np.asarray(run(changed_dec, prefix))
  # Inside the prefix, position 1 sees position 2 (bidirectional) ...
  assert np.abs(changed[:, 1] - base[:, 1]).max() > 1e-4
  # ... but with no prefix (causal LM) it does not.
  none = np.zeros_like(prefix)
  np.testing.assert_allclose(run(changed_dec, none)[:, :2], run(dec, none)[:, :2],
                             atol=1e-5)

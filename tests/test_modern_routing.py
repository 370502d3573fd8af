"""The routing of today's MoE models (issue 17) against NumPy references.

Sigmoid scores and the routed scaling factor, the aux-loss-free selection
bias (selection only, the bias step, out of the optimizer, exact resume),
device-limited routing (no token reaches more than M groups), the global-batch
balance loss (equal to the loss of the concatenated batch), DeepSeek-V3's
sequence-wise loss, shared experts, and sharded == unsharded for each.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from np_reference import gelu_tanh as np_gelu, softmax as np_softmax
from sharded_step import compile_on_mesh

from moe_jax import partitioning
from moe_jax.layers import routing, selection
from moe_jax.layers.moe import MoeConfig, MoeLayer
from moe_jax.training import non_trainable

D, F, E = 16, 32, 8


def _logits(g=2, s=8, e=E, seed=0):
  return jax.random.normal(jax.random.key(seed), (g, s, e), jnp.float32) * 2.0


def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _np_topk(x, k):
  return np.argsort(-x, axis=-1, kind="stable")[..., :k]


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_scores_gates_and_scaling_factor_match_numpy(score_function, renormalize):
  logits = _logits()
  router = routing.TokensChooseRouter(
      num_selected_experts=3, renormalize_top_k=renormalize,
      options=selection.SelectionOptions(score_function=score_function,
                                         routed_scaling_factor=2.5))
  d = router.route(logits, None, capacity=16)
  x = np.asarray(logits, np.float64)
  scores = np_softmax(x) if score_function == "softmax" else _np_sigmoid(x)
  top = _np_topk(scores, 3)
  gates = np.take_along_axis(scores, top, -1)
  if renormalize:
    gates = gates / gates.sum(-1, keepdims=True)
  np.testing.assert_array_equal(np.asarray(d.expert_index), top)
  np.testing.assert_allclose(np.asarray(d.expert_weight), 2.5 * gates, rtol=1e-5)
  # The losses and metrics read normalized scores (DeepSeek-V3's s').
  np.testing.assert_allclose(np.asarray(d.probs), scores / scores.sum(-1, keepdims=True),
                             rtol=1e-5)


def test_selection_bias_steers_the_choice_not_the_gate():
  logits = _logits()
  bias = jnp.zeros(E).at[5].set(100.0)  # expert 5 always selected
  router = routing.TokensChooseRouter(
      num_selected_experts=2, renormalize_top_k=False,
      options=selection.SelectionOptions(score_function="sigmoid",
                                         expert_bias_update_rate=0.01))
  d = router.route(logits, None, capacity=16, selection_bias=bias)
  x = np.asarray(logits, np.float64)
  scores = _np_sigmoid(x)
  want = _np_topk(scores + np.asarray(bias), 2)
  np.testing.assert_array_equal(np.asarray(d.expert_index), want)
  assert (np.asarray(d.expert_index)[..., 0] == 5).all()
  # Gates are the *unbiased* scores of the chosen experts.
  np.testing.assert_allclose(np.asarray(d.expert_weight),
                             np.take_along_axis(scores, want, -1), rtol=1e-5)
  # The bias step: rate * sign(mean load - load), from the choice load.
  load = np.bincount(want.reshape(-1), minlength=E) / want.size
  np.testing.assert_allclose(np.asarray(d.metrics["expert_bias_update"]),
                             0.01 * np.sign(load.mean() - load), atol=1e-7)


@pytest.mark.parametrize("group_score", ["max", "top2_sum"])
def test_device_limited_routing_reaches_at_most_m_groups(group_score):
  groups, m, k = 4, 2, 4
  logits = _logits(g=3, s=16, e=16, seed=1)
  router = routing.TokensChooseRouter(
      num_selected_experts=k, options=selection.SelectionOptions(
          routing_groups=groups, routing_groups_per_token=m,
          routing_group_score=group_score))
  d = router.route(logits, None, capacity=64)
  chosen = np.asarray(d.expert_index)
  per_group = 16 // groups
  reached = np.array([[len(set(chosen[g, t] // per_group)) for t in range(16)]
                      for g in range(3)])
  assert reached.max() <= m and reached.min() >= 1
  # NumPy reference: best M groups by the group score, then top-k inside.
  probs = np_softmax(np.asarray(logits, np.float64)).reshape(3, 16, groups, per_group)
  if group_score == "max":
    rank = probs.max(-1)
  else:
    rank = np.sort(probs, -1)[..., -2:].sum(-1)
  best = _np_topk(rank, m)
  allowed = np.zeros((3, 16, groups), bool)
  np.put_along_axis(allowed, best, True, -1)
  masked = np.where(np.repeat(allowed, per_group, -1), probs.reshape(3, 16, 16), -np.inf)
  np.testing.assert_array_equal(chosen, _np_topk(masked, k))


def test_global_balance_loss_equals_the_loss_of_the_concatenated_batch():
  logits = _logits(g=4, s=8)
  mask = jnp.ones((4, 8)).at[1, 5:].set(0.0)
  probs = jax.nn.softmax(logits, -1)
  index = selection.top_k(probs, 2)[1]
  glob = routing.load_balancing_loss(probs, index, mask, "global")
  concat = routing.load_balancing_loss(probs.reshape(1, 32, E), index.reshape(1, 32, 2),
                                       mask.reshape(1, 32), "group")
  np.testing.assert_allclose(float(glob), float(concat), rtol=1e-6)
  per_group = routing.load_balancing_loss(probs, index, mask, "group")
  assert abs(float(per_group) - float(glob)) > 1e-4  # a different statistic


def test_sequence_balance_loss_matches_numpy():
  probs = np.asarray(jax.nn.softmax(_logits(g=3, s=6), -1), np.float64)
  index = _np_topk(probs, 2)
  mask = np.ones((3, 6))
  mask[2, 4:] = 0
  got = float(selection.sequence_balance_loss(jnp.asarray(probs, jnp.float32),
                                              jnp.asarray(index), jnp.asarray(mask)))
  want = []
  for b in range(3):
    real = mask[b] > 0
    t = real.sum()
    counts = np.bincount(index[b][real].reshape(-1), minlength=E)
    f = E / (2 * t) * counts
    p = probs[b][real].mean(0)
    want.append((f * p).sum())
  np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)


def make(**kw):
  base = dict(num_experts=E, num_selected_experts=2, d_ff=F, group_size=8,
              capacity_factor_train=4.0, capacity_factor_eval=4.0)
  base.update(kw)
  return MoeLayer(MoeConfig(**base))


def test_shared_experts_add_a_dense_mlp_to_the_routed_output():
  x = jax.random.normal(jax.random.key(0), (2, 8, D))
  layer = make(num_shared_experts=2, shared_expert_d_ff=12)
  params = nn.unbox(layer.init(jax.random.key(1), x))
  sh = {k: np.asarray(v["kernel"], np.float64)
        for k, v in params["params"]["shared_experts"].items()}
  assert sh["wi_0"].shape == (D, 24) and sh["wo"].shape == (24, D)
  routed_only = make()
  routed_params = {"params": {k: v for k, v in params["params"].items()
                              if k != "shared_experts"}}
  xn = np.asarray(x, np.float64)
  shared = (np_gelu(xn @ sh["wi_0"]) * (xn @ sh["wi_1"])) @ sh["wo"]
  np.testing.assert_allclose(np.asarray(layer.apply(params, x)),
                             np.asarray(routed_only.apply(routed_params, x)) + shared,
                             rtol=1e-4, atol=1e-5)


VARIANTS = {
    "sigmoid_scaled": dict(score_function="sigmoid", routed_scaling_factor=2.0),
    "aux_free": dict(expert_bias_update_rate=0.01),
    "device_limited": dict(routing_groups=4, routing_groups_per_token=2),
    "global_balance": dict(balance_loss_scope="global", sequence_balance_loss=True),
    "shared_fine_grained": dict(num_experts=16, num_selected_experts=4, d_ff=8,
                                num_shared_experts=1),
    "dropless_device_limited": dict(dropless=True, routing_groups=4,
                                    routing_groups_per_token=2, num_selected_experts=3),
}


def _loss(layer):
  # The dropless layer routes all of a device's tokens as one group, so its
  # per-group balance losses depend on the mesh (as before this issue); its
  # outputs do not.
  with_losses = not layer.config.dropless

  def f(params, x):
    y, st = layer.apply(params, x, deterministic=False, mutable=["intermediates"])
    inter = st["intermediates"]
    extra = sum(jnp.sum(v[0]) for k, v in inter.items() if k.endswith("loss"))
    return jnp.sum(jnp.sin(y)) + (0.1 * extra if with_losses else 0.0)
  return f


@pytest.mark.parametrize("spec", [dict(data=1, expert=8), dict(data=2, expert=4)],
                         ids=["1x8", "2x4"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_sharded_equals_unsharded(variant, spec):
  kw = dict(VARIANTS[variant])
  if kw.get("routing_groups"):
    kw["routing_groups"] = spec["expert"] if variant == "device_limited" else 4
  layer = make(**kw)
  x = jax.random.normal(jax.random.key(0), (8, 8, D))
  boxed = layer.init(jax.random.key(1), x)
  params = nn.unbox(boxed)
  step = jax.value_and_grad(_loss(layer), argnums=(0, 1))
  ref_loss, ref_grads = step(params, x)
  compiled, ps, xs = compile_on_mesh(step, boxed, params, x, spec)
  loss, grads = compiled(ps, xs)
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5, abs=1e-4)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  assert " all-to-all(" in compiled.as_text()


def test_bias_is_out_of_the_optimizer_and_moves_by_the_rule():
  """A real train step: AdamW with weight decay leaves the bias to the rule."""
  from moe_jax.models import SparseLayout, T5Config, build_model  # pylint: disable=g-import-not-at-top
  from moe_jax.training import train_state, train_step  # pylint: disable=g-import-not-at-top
  moe = MoeConfig(num_experts=4, num_selected_experts=1, d_ff=16, group_size=16,
                  expert_bias_update_rate=0.05, score_function="sigmoid")
  model = build_model(T5Config(
      vocab_size=32, d_model=8, num_heads=1, d_kv=8, d_ff=16, num_encoder_layers=1,
      num_decoder_layers=1, dropout_rate=0.0, moe=moe,
      encoder_layout=SparseLayout(kind="all"), decoder_layout=SparseLayout(kind="all")))
  tx = optax.adamw(1e-2, weight_decay=0.5)
  partitioner = partitioning.Partitioner(partitioning.make_mesh({"data": 1}, devices=jax.devices()[:1]),
                                         partitioning.standard_logical_rules())
  shapes = train_state.dummy_batch(4, {"inputs": 8, "targets": 8})
  state, layout = train_state.init_train_state(model, tx, partitioner, shapes, seed=0)
  bias_paths = [(p, np.asarray(v))  # copies: the step donates the state
                for p, v in jax.tree_util.tree_flatten_with_path(state.params)[0]
                if "expert_bias" in jax.tree_util.keystr(p)]
  assert len(bias_paths) == 2  # encoder and decoder layer
  # No optimizer state holds a bias-shaped moment for it: every [4] leaf of the
  # opt state would be one (the model has no other [4] params).
  opt_shapes = [l.shape for l in jax.tree.leaves(state.opt_state)]
  assert (4,) not in opt_shapes
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(1, 32, v.shape).astype(np.int32) for k, v in shapes.items()}
  batch["decoder_loss_weights"] = np.ones_like(batch["decoder_loss_weights"])
  step = train_step.jitted_train_step(layout, train_step.LossConfig(aux_loss_factor=0.0))
  with partitioner.activate():
    new_state, metrics = step(state, partitioner.global_batch(batch))
  assert not any(k.startswith(non_trainable.UPDATE_PREFIX) for k in metrics)
  for path, before in bias_paths:
    after = new_state.params
    for key in path:
      after = after[key.key]
    step_taken = np.asarray(after) - np.asarray(before)
    # +-rate per expert (or 0 at the mean), never a decay or a gradient step.
    assert all(min(abs(v), abs(v - 0.05)) < 1e-7 for v in np.abs(step_taken)), step_taken
    assert np.abs(step_taken).max() == pytest.approx(0.05)

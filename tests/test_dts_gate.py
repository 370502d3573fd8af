"""Dense-to-sparse gate: schedule, threshold selection and capacity vs NumPy,
eval == top-k, experts per token over training, traced step under jit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from np_reference import softmax as np_softmax

from moe_jax.layers import dts_gate, schedule
from moe_jax.layers.moe import MoeConfig, MoeLayer

D, F, E = 8, 16, 4


def dts_config(**kw):
  base = dict(num_experts=E, num_selected_experts=1, d_ff=F, group_size=16,
              router_type="dense_to_sparse", capacity_factor_train=2.0,
              capacity_factor_eval=4.0, min_expert_capacity=1,
              dts_tau_start=5.0, dts_tau_end=0.01, dts_anneal_steps=1000,
              router_init_stddev=0.5)
  base.update(kw)
  return MoeConfig(**base)


@pytest.mark.parametrize("kind,expected", [
    ("linear", [2.0, 1.625, 1.25, 0.5, 0.5]),
    ("exponential", [2.0, 2.0 * 0.25 ** 0.25, 1.0, 0.5, 0.5]),
])
def test_temperature_matches_hand_formula(kind, expected):
  steps = [0, 250, 500, 1000, 3000]
  got = [float(dts_gate.temperature(s, 2.0, 0.5, 1000, kind)) for s in steps]
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  traced = jax.jit(lambda s: dts_gate.temperature(s, 2.0, 0.5, 1000, kind))
  np.testing.assert_allclose([float(traced(jnp.int32(s))) for s in steps], expected,
                             rtol=1e-6)
  assert float(dts_gate.temperature(None, 2.0, 0.5, 1000, kind)) == 0.5


def _router_inputs(g=2, s=6, seed=0):
  logits = jax.random.normal(jax.random.key(seed), (g, s, E), jnp.float32) * 2.0
  mask = np.ones((g, s), np.float32)
  mask[1, -2:] = 0.0  # two padding tokens
  return logits, mask


def _jit_route(router, step, logits, mask, capacity, key):
  def route(logits, mask, key):
    with schedule.training_step(step):
      return router.route(logits, mask, capacity, key)
  return jax.jit(route)(logits, jnp.asarray(mask), key)


def _np_selection(logits, key, tau, threshold, mask):
  """NumPy reference: Gumbel-softmax gates, threshold, best expert always."""
  gumbel = np.asarray(jax.random.gumbel(key, logits.shape, jnp.float32), np.float64)
  gates = np_softmax((np.asarray(logits, np.float64) + gumbel) / tau)
  best = np.eye(E, dtype=bool)[gates.argmax(-1)]
  selected = ((gates > threshold) | best) & (mask[..., None] > 0)
  return gates, selected


def _combine_matrix(decision, g, s):
  """Dense <float>[G, S, E] combine weights read back from the slots."""
  w = np.zeros((g, s + 1, E))
  tok = np.asarray(decision.slot_token)
  wt = np.asarray(decision.slot_weight)
  for gi in range(g):
    for e in range(E):
      for c in range(tok.shape[-1]):
        w[gi, tok[gi, e, c], e] += wt[gi, e, c]
  return w[:, :s]


@pytest.mark.parametrize("step,threshold", [(300, 0.02), (700, 0.1)])
def test_threshold_selection_matches_numpy(step, threshold):
  logits, mask = _router_inputs()
  key = jax.random.key(7)
  router = dts_gate.DenseToSparseRouter(options=dts_gate.DtsOptions(
      dts_tau_start=5.0, dts_tau_end=0.01, dts_anneal_steps=1000, dts_threshold=threshold))
  decision = _jit_route(router, step, logits, mask, 1, key)
  tau = 5.0 + (0.01 - 5.0) * step / 1000
  gates, selected = _np_selection(logits, key, tau, threshold, mask)
  # all_tokens: capacity is the group size, nothing is dropped.
  assert decision.slot_token.shape == (2, E, 6)
  np.testing.assert_allclose(_combine_matrix(decision, 2, 6), gates * selected,
                             rtol=1e-5, atol=1e-7)
  assert float(decision.metrics["dropped_fraction"]) == 0.0
  n_real = mask.sum()
  np.testing.assert_allclose(
      float(dts_gate.experts_per_token(decision.slot_token, jnp.asarray(mask))),
      selected.sum() / n_real, rtol=1e-6)
  # Balance loss: E * sum_e f_e P_e, f_e = share of real tokens reaching e.
  probs = np_softmax(np.asarray(logits, np.float64))
  f = selected.sum(1) / mask.sum(1)[:, None]
  p = (probs * mask[..., None]).sum(1) / mask.sum(1)[:, None]
  np.testing.assert_allclose(float(decision.metrics["aux_loss"]), E * np.mean((f * p).sum(-1)),
                             rtol=1e-5)


def test_capacity_factor_mode_drops_in_rank_major_order():
  logits, mask = _router_inputs(seed=3)
  key = jax.random.key(11)
  cap = 2
  router = dts_gate.DenseToSparseRouter(options=dts_gate.DtsOptions(
      dts_tau_start=5.0, dts_tau_end=0.01, dts_anneal_steps=1000, dts_threshold=0.1,
      dts_train_capacity="capacity_factor"))
  decision = _jit_route(router, 100, logits, mask, cap, key)
  gates, selected = _np_selection(logits, key, 5.0 + (0.01 - 5.0) * 0.1, 0.1, mask)
  # NumPy reference: every token's best expert claims first, then its 2nd, ...
  expected = np.zeros_like(gates)
  for gi in range(2):
    count = np.zeros(E, int)
    order = np.argsort(-gates[gi], axis=-1, kind="stable")
    for j in range(E):
      for t in range(6):
        e = order[t, j]
        if selected[gi, t, e] and count[e] < cap:
          count[e] += 1
          expected[gi, t, e] = gates[gi, t, e]
  assert decision.slot_token.shape == (2, E, cap)
  np.testing.assert_allclose(_combine_matrix(decision, 2, 6), expected, rtol=1e-5,
                             atol=1e-7)
  kept, chosen = (expected > 0).sum(), selected.sum()
  assert kept < chosen  # the case really drops
  np.testing.assert_allclose(float(decision.metrics["dropped_fraction"]), 1 - kept / chosen,
                             rtol=1e-6)


def _x(b=4, l=8, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, l, D), jnp.float32)


@pytest.mark.parametrize("k", [1, 2])
def test_eval_is_plain_top_k(k):
  """No RNG (eval): NumPy top-k of softmax(logits), renormalized, no noise."""
  logits, mask = _router_inputs(seed=5)
  router = dts_gate.DenseToSparseRouter(num_selected_experts=k)
  decision = jax.jit(lambda l, m: router.route(l, m, 6, None))(logits, jnp.asarray(mask))
  probs = np_softmax(np.asarray(logits, np.float64))
  top = np.argsort(-probs, -1)[..., :k]
  expected = np.zeros_like(probs)
  for gi, t in np.ndindex(2, 6):
    if mask[gi, t]:
      expected[gi, t, top[gi, t]] = probs[gi, t, top[gi, t]] / (
          probs[gi, t, top[gi, t]].sum() if k > 1 else 1.0)
  np.testing.assert_allclose(_combine_matrix(decision, 2, 6), expected, rtol=1e-5,
                             atol=1e-7)
  assert float(dts_gate.experts_per_token(decision.slot_token, jnp.asarray(mask))) == k


def _train_forward(layer, params, x, key):
  return layer.apply(params, x, deterministic=False, rngs={"routing": key},
                     mutable=["intermediates"])


def test_traced_step_in_jitted_train_step_and_experts_per_token_falls():
  layer = MoeLayer(dts_config())
  x = _x(seed=4)
  params = nn.unbox(jax.jit(layer.init)(jax.random.key(0), x))

  @jax.jit
  def train_step(params, step):
    def loss_fn(p):
      with schedule.training_step(step):
        y, state = _train_forward(layer, p, x, jax.random.key(3))
      return jnp.mean(y ** 2), state["intermediates"]["experts_per_token"][0]
    (loss, ept), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, ept, grads

  per_step = []
  for step in (0, 500, 900, 1000):
    _, ept, grads = train_step(params, jnp.int32(step))
    per_step.append(float(ept))
    router_grad = np.asarray(grads["params"]["router_kernel"])
    assert np.all(np.isfinite(router_grad)) and np.abs(router_grad).sum() > 0
  assert train_step._cache_size() == 1  # one program for every step
  assert per_step[0] == pytest.approx(E)  # tau = 5: every gate > 0.02, dense
  assert all(a > b for a, b in zip(per_step, per_step[1:])), per_step
  assert 1.0 <= per_step[-1] < 1.1  # tau = 0.01: one expert (rare near-ties keep two)
  # Eval (deterministic) through the layer: top-k, k = num_selected_experts = 1.
  _, state = jax.jit(lambda p: layer.apply(p, x, mutable=["intermediates"]))(params)
  assert float(state["intermediates"]["experts_per_token"][0]) == pytest.approx(1.0)


def test_bad_options_say_what_to_fix():
  with pytest.raises(ValueError, match="dts_anneal_schedule"):
    dts_config(dts_anneal_schedule="cosine")
  with pytest.raises(ValueError, match="dts_train_capacity"):
    dts_config(dts_train_capacity="auto")
  with pytest.raises(ValueError, match="dropless=True needs"):
    dts_config(dropless=True)


def test_sharded_2x4_training_step_equals_unsharded():
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from moe_jax import partitioning  # pylint: disable=g-import-not-at-top
  layer = MoeLayer(dts_config(num_experts=8, group_size=8))
  x = _x(b=8, seed=6)
  boxed = jax.jit(layer.init)(jax.random.key(0), x)
  params = nn.unbox(boxed)

  def step_fn(params, x):
    with schedule.training_step(jnp.int32(400)):
      y, state = _train_forward(layer, params, x, jax.random.key(9))
    return y, state["intermediates"]["experts_per_token"][0]

  ref_y, ref_ept = jax.jit(step_fn)(params, x)
  mesh = partitioning.make_mesh(dict(data=2, expert=4))
  rules = partitioning.standard_logical_rules()
  with partitioning.with_sharding(mesh, rules):
    ps = jax.device_put(params, partitioning.params_shardings(mesh, boxed, rules))
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp", "expert"))))
    y, ept = jax.jit(step_fn)(ps, xs)
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), rtol=1e-5, atol=1e-6)
  assert float(ept) == pytest.approx(float(ref_ept))
  assert 1.0 < float(ept) < 8.0  # mid-anneal: between sparse and dense

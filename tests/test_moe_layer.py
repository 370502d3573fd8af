"""MoeLayer: NumPy dense references, sharded == unsharded, HLO collectives, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from np_reference import gelu_tanh as np_gelu, softmax as np_softmax
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import partitioning
from moe_jax.layers.grouping import choose_num_groups
from moe_jax.layers.moe import MoeConfig, MoeLayer

D, F, E = 16, 32, 8




def make(**kw):
  base = dict(num_experts=E, num_selected_experts=2, d_ff=F, group_size=32,
              capacity_factor_train=8.0, capacity_factor_eval=8.0,
              dropless_block_size=8)
  base.update(kw)
  return MoeLayer(MoeConfig(**base))


def x_input(b=8, l=8, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, l, D), jnp.float32)


def identical_experts(params):
  ex = params["params"]["experts"]
  return {"params": dict(params["params"], experts={
      k: jnp.broadcast_to(v[:1], v.shape) for k, v in ex.items()})}


@pytest.mark.parametrize("renormalize", [True, False])
def test_identical_experts_equal_dense_mlp(renormalize):
  layer = make(renormalize_top_k=renormalize)
  x = x_input()
  params = identical_experts(nn.unbox(layer.init(jax.random.key(1), x)))
  y = np.asarray(layer.apply(params, x))
  ex = {k: np.asarray(v[0], np.float64) for k, v in params["params"]["experts"].items()}
  xn = np.asarray(x, np.float64)
  dense = (np_gelu(xn @ ex["wi_0"]) * (xn @ ex["wi_1"])) @ ex["wo"]
  if renormalize:
    np.testing.assert_allclose(y, dense, rtol=2e-4, atol=2e-5)
  else:
    probs = np_softmax(xn @ np.asarray(params["params"]["router_kernel"], np.float64))
    top2 = np.sort(probs, -1)[..., -2:].sum(-1, keepdims=True)
    np.testing.assert_allclose(y, top2 * dense, rtol=2e-4, atol=2e-5)


def test_matches_numpy_moe_with_drops():
  """Full NumPy reference: routing with drops, distinct experts, combine."""
  layer = make(capacity_factor_eval=0.5, min_expert_capacity=1, group_size=16)
  x = x_input(4, 8, seed=3)
  params = nn.unbox(layer.init(jax.random.key(2), x))
  y, state = layer.apply(params, x, mutable=["intermediates"])
  p = {k: np.asarray(v, np.float64) for k, v in params["params"]["experts"].items()}
  xn = np.asarray(x, np.float64).reshape(2, 16, D)  # 2 groups of 16 tokens
  probs = np_softmax(xn @ np.asarray(params["params"]["router_kernel"], np.float64))
  cap = int(np.ceil(0.5 * 2 * 16 / E))
  ref = np.zeros_like(xn)
  dropped = 0
  for g in range(2):
    top = np.argsort(-probs[g], -1, kind="stable")[:, :2]
    gate = np.take_along_axis(probs[g], top, -1)
    gate = gate / gate.sum(-1, keepdims=True)
    fill = np.zeros(E, int)
    for j in range(2):
      for t in range(16):
        e = top[t, j]
        if fill[e] >= cap:
          dropped += 1
          continue
        fill[e] += 1
        h = np_gelu(xn[g, t] @ p["wi_0"][e]) * (xn[g, t] @ p["wi_1"][e])
        ref[g, t] += gate[t, j] * (h @ p["wo"][e])
  np.testing.assert_allclose(np.asarray(y).reshape(2, 16, D), ref, rtol=2e-4, atol=2e-5)
  assert dropped > 0
  frac = float(state["intermediates"]["dropped_fraction"][0])
  assert frac == pytest.approx(dropped / 64)


def test_padding_takes_no_capacity():
  layer = make(capacity_factor_eval=1.0, min_expert_capacity=1)
  x = x_input()
  mask = np.ones((8, 8), np.int32)
  mask[:, 5:] = 0
  params = nn.unbox(layer.init(jax.random.key(1), x))
  y1 = layer.apply(params, x, jnp.asarray(mask))
  # Changing the padding tokens' content changes nothing for real tokens.
  x2 = x.at[:, 5:].set(100.0)
  y2 = layer.apply(params, x2, jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(y1)[:, :5], np.asarray(y2)[:, :5], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(y2)[:, 5:], 0.0)


def _loss(layer):
  def f(params, x):
    y = layer.apply(params, x)
    return jnp.sum(jnp.sin(y))
  return f


MESHES = [dict(data=1, expert=8), dict(data=2, expert=4), dict(data=4, expert=2),
          dict(data=2, expert=2, model=2)]


CASES = [(m, False) for m in MESHES] + [(MESHES[1], True), (MESHES[3], True)]


@pytest.mark.parametrize(
    "spec,dropless", CASES,
    ids=lambda v: (",".join(f"{k}={n}" for k, n in v.items()) if isinstance(v, dict)
                   else ("dropless" if v else "capacity")))
def test_sharded_equals_unsharded(spec, dropless):
  # group_size 8 -> 8 groups of one sequence: the same groups on every mesh,
  # and capacity factor 1.0 makes tokens drop (identically).
  layer = make(dropless=dropless, capacity_factor_eval=1.0, group_size=8)
  x = x_input()
  params = nn.unbox(layer.init(jax.random.key(1), x))
  ref_loss, ref_grads = jax.value_and_grad(_loss(layer), argnums=(0, 1))(params, x)
  mesh = partitioning.make_mesh(spec)
  rules = partitioning.standard_logical_rules()
  boxed = layer.init(jax.random.key(1), x)
  with partitioning.with_sharding(mesh, rules):
    shardings = partitioning.params_shardings(mesh, boxed, rules)
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp", "expert"))))
    ps = jax.device_put(params, shardings)
    step = jax.jit(jax.value_and_grad(_loss(layer), argnums=(0, 1)))
    compiled = step.lower(ps, xs).compile()
    loss, grads = compiled(ps, xs)
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  # Expert weights stay sharded over 'expert' on the parameters.
  wo = ps["params"]["experts"]["wo"]
  assert wo.sharding.spec[0] == "expert"
  hlo = compiled.as_text()
  if not dropless:
    assert ("all-to-all(" in hlo) == (spec.get("expert", 1) > 1)
  # The full expert weights are never all-gathered.
  for line in hlo.splitlines():
    if " all-gather(" in line:
      assert f"[{E},{D},{F}]" not in line and f"[{E},{F},{D}]" not in line, line


def test_dropless_equals_capacity_path():
  x = x_input()
  cap = make()
  dl = make(dropless=True)
  params = nn.unbox(cap.init(jax.random.key(1), x))
  lc, gc = jax.value_and_grad(_loss(cap), argnums=(0, 1))(params, x)
  ld, gd = jax.jit(jax.value_and_grad(_loss(dl), argnums=(0, 1)))(params, x)
  assert float(ld) == pytest.approx(float(lc), rel=1e-5)
  for a, b in zip(jax.tree.leaves(gd), jax.tree.leaves(gc)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_experts_choose_runs_and_sows_metrics():
  layer = make(router_type="experts_choose", num_selected_experts=2,
               capacity_factor_eval=1.0)
  x = x_input()
  params = nn.unbox(layer.init(jax.random.key(1), x))
  y, st = layer.apply(params, x, mutable=["intermediates"])
  assert y.shape == x.shape
  load = np.asarray(st["intermediates"]["expert_load"][0])
  np.testing.assert_allclose(load, np.full(E, 1 / E))  # balanced by design
  with pytest.raises(ValueError, match="causal"):
    layer.apply(params, x, causal=True)


def test_jitter_and_expert_dropout_use_rngs():
  layer = make(jitter_noise=0.1, expert_dropout_rate=0.5)
  x = x_input()
  params = nn.unbox(layer.init(jax.random.key(1), x))
  det = layer.apply(params, x)
  a = layer.apply(params, x, deterministic=False,
                  rngs={"jitter": jax.random.key(0), "dropout": jax.random.key(1)})
  b = layer.apply(params, x, deterministic=False,
                  rngs={"jitter": jax.random.key(0), "dropout": jax.random.key(2)})
  assert not np.allclose(a, det) and not np.allclose(a, b)


def test_bfloat16_activations_keep_float32_router():
  layer = MoeLayer(MoeConfig(num_experts=E, d_ff=F, group_size=32), dtype=jnp.bfloat16)
  x = x_input().astype(jnp.bfloat16)
  params = nn.unbox(layer.init(jax.random.key(1), x))
  assert params["params"]["router_kernel"].dtype == jnp.float32
  y, st = layer.apply(params, x, mutable=["intermediates"])
  assert y.dtype == jnp.bfloat16
  assert st["intermediates"]["z_loss"][0].dtype == jnp.float32


def test_bad_inputs_raise_with_fix():
  with pytest.raises(ValueError, match="multiple of 8"):
    choose_num_groups(batch=4, length=16, group_size=64, num_batch_shards=8)
  with pytest.raises(ValueError, match="group_size"):
    choose_num_groups(batch=8, length=7, group_size=0, num_batch_shards=8)
  # 7-token sequences split into 1-token groups rather than failing.
  assert choose_num_groups(batch=8, length=7, group_size=3, num_batch_shards=8) == 56
  assert choose_num_groups(batch=16, length=512, group_size=512, num_batch_shards=8) == 16
  assert choose_num_groups(batch=8, length=512, group_size=256, num_batch_shards=8) == 16
  # Mesh-independent when possible: 2 groups of 32 on one device and on 2.
  assert choose_num_groups(batch=8, length=8, group_size=32, num_batch_shards=1) == 2
  assert choose_num_groups(batch=8, length=8, group_size=32, num_batch_shards=2) == 2
  # Decode-sized input on 8 shards falls back to one group per shard.
  assert choose_num_groups(batch=8, length=1, group_size=32, num_batch_shards=8) == 8
  layer = make(num_experts=6)
  x = x_input()
  mesh = partitioning.make_mesh(dict(data=2, expert=4))
  with partitioning.with_sharding(mesh, partitioning.standard_logical_rules()):
    with pytest.raises(ValueError, match="not divisible by the 'expert' mesh axis size 4"):
      jax.eval_shape(layer.init, jax.random.key(0), x)


def test_decode_never_drops_by_default():
  # 8 sequences x 1 token, all preferring the same expert: eval capacity drops
  # some, decode mode (capacity = tokens per group) drops none.
  layer = make(capacity_factor_eval=0.5, min_expert_capacity=1, group_size=64)
  x = jnp.tile(x_input(1, 1), (8, 1, 1))
  params = nn.unbox(layer.init(jax.random.key(1), x))
  _, st = layer.apply(params, x, mutable=["intermediates"])
  assert float(st["intermediates"]["dropped_fraction"][0]) > 0
  y, st = layer.apply(params, x, decode=True, mutable=["intermediates"])
  assert float(st["intermediates"]["dropped_fraction"][0]) == 0
  big = make(capacity_factor_eval=100.0, group_size=64)
  np.testing.assert_allclose(y, big.apply(params, x), rtol=1e-6)


def test_dropless_reports_no_drops():
  # The same overloaded batch that drops tokens with capacity: dropless keeps
  # every token, and its output equals the capacity layer with ample room.
  layer = make(capacity_factor_eval=0.5, min_expert_capacity=1, group_size=64,
               dropless=True)
  x = jnp.tile(x_input(1, 1), (8, 1, 1))
  params = nn.unbox(layer.init(jax.random.key(1), x))
  y, st = layer.apply(params, x, mutable=["intermediates"])
  assert float(st["intermediates"]["dropped_fraction"][0]) == 0
  big = make(capacity_factor_eval=100.0, group_size=64)
  np.testing.assert_allclose(y, big.apply(params, x), rtol=1e-5, atol=1e-6)

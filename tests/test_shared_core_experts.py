"""Shared-core (MPOE) experts: NumPy references on every expert path,
sharded == unsharded, parameter counts, pruning keeps the shared core."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from np_reference import gelu_tanh as np_gelu, softmax as np_softmax
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import partitioning
from moe_jax.evaluation import pruning
from moe_jax.layers import shared_core
from moe_jax.layers.moe import MoeConfig, MoeLayer

D, F, E, R = 16, 32, 8, 2


def config(**kw):
  base = dict(num_experts=E, num_selected_experts=2, d_ff=F, group_size=32,
              capacity_factor_train=8.0, capacity_factor_eval=8.0,
              dropless_block_size=8, shared_core_rank=R)
  base.update(kw)
  return MoeConfig(**base)


def x_input(b=4, l=8, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, l, D), jnp.float32)


def np_expert_kernels(experts):
  """``W_e = shared + a_e @ b_e`` for every kernel, float64."""
  out = {}
  for name in ("wi_0", "wi_1", "wo"):
    shared, a, b = (np.asarray(experts[name + s], np.float64) for s in ("_shared", "_a", "_b"))
    out[name] = shared[None] + np.einsum("eir,ero->eio", a, b)
  return out


def np_moe(x, params, k=2):
  """NumPy top-k MoE with ample capacity (no drops), renormalized gates."""
  xn = np.asarray(x, np.float64).reshape(-1, D)
  w = np_expert_kernels(params["params"]["experts"])
  probs = np_softmax(xn @ np.asarray(params["params"]["router_kernel"], np.float64))
  top = np.argsort(-probs, -1)[:, :k]
  y = np.zeros_like(xn)
  for t in range(xn.shape[0]):
    gates = probs[t, top[t]] / probs[t, top[t]].sum()
    for g, e in zip(gates, top[t]):
      h = np_gelu(xn[t] @ w["wi_0"][e]) * (xn[t] @ w["wi_1"][e])
      y[t] += g * (h @ w["wo"][e])
  return y.reshape(np.shape(x))


def test_zero_deltas_every_expert_is_the_shared_mlp():
  layer = MoeLayer(config())
  x = x_input()
  params = nn.unbox(jax.jit(layer.init)(jax.random.key(1), x))
  ex = params["params"]["experts"]
  # b is zero-initialised: every expert is the shared MLP at step 0.
  assert all(float(jnp.abs(ex[n + "_b"]).max()) == 0.0 for n in ("wi_0", "wi_1", "wo"))
  assert float(jnp.abs(ex["wi_0_a"]).max()) > 0
  y = np.asarray(jax.jit(layer.apply)(params, x))
  xn = np.asarray(x, np.float64)
  s = {n: np.asarray(ex[n + "_shared"], np.float64) for n in ("wi_0", "wi_1", "wo")}
  dense = (np_gelu(xn @ s["wi_0"]) * (xn @ s["wi_1"])) @ s["wo"]
  np.testing.assert_allclose(y, dense, rtol=2e-4, atol=2e-5)  # top-2 gates sum to 1


def _random_deltas(params, seed=5):
  ex = dict(params["params"]["experts"])
  keys = iter(jax.random.split(jax.random.key(seed), 3))
  for n in ("wi_0", "wi_1", "wo"):
    ex[n + "_b"] = 0.3 * jax.random.normal(next(keys), ex[n + "_b"].shape)
  return {"params": dict(params["params"], experts=ex)}


@pytest.mark.parametrize("path", ["capacity", "dropless", "gating_dropout"])
def test_rank2_output_matches_numpy(path):
  cfg = config(dropless=path == "dropless",
               gating_dropout_rate=1.0 if path == "gating_dropout" else 0.0)
  layer = MoeLayer(cfg)
  x = x_input(seed=2)
  params = _random_deltas(nn.unbox(jax.jit(layer.init)(jax.random.key(3), x)))
  if path == "gating_dropout":  # training step whose gating dropout always fires
    apply = lambda p, x: layer.apply(p, x, deterministic=False,
                                     rngs={"routing": jax.random.key(0)})
  else:
    apply = layer.apply
  y = np.asarray(jax.jit(apply)(params, x))
  np.testing.assert_allclose(y, np_moe(x, params), rtol=2e-4, atol=2e-5)


def _loss(layer):
  def f(params, x):
    return jnp.sum(jnp.sin(layer.apply(params, x)))
  return f


def test_sharded_2x4_equals_unsharded():
  layer = MoeLayer(config(capacity_factor_eval=1.0, group_size=8))  # drops happen
  x = x_input(b=8)
  boxed = jax.jit(layer.init)(jax.random.key(1), x)
  params = _random_deltas(nn.unbox(boxed))
  grad_fn = jax.jit(jax.value_and_grad(_loss(layer), argnums=(0, 1)))
  ref_loss, ref_grads = grad_fn(params, x)
  mesh = partitioning.make_mesh(dict(data=2, expert=4))
  rules = partitioning.standard_logical_rules()
  with partitioning.with_sharding(mesh, rules):
    shardings = partitioning.params_shardings(mesh, boxed, rules)
    ps = jax.device_put(params, shardings)
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp", "expert"))))
    loss, grads = jax.jit(jax.value_and_grad(_loss(layer), argnums=(0, 1)))(ps, xs)
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  ex = ps["params"]["experts"]
  assert ex["wi_0_a"].sharding.spec[0] == "expert"  # deltas: expert-sharded
  assert ex["wo_b"].sharding.spec[0] == "expert"
  assert "expert" not in jax.tree.leaves(tuple(ex["wi_0_shared"].sharding.spec))


@pytest.mark.parametrize("activations,n_in", [(("gelu", "linear"), 2), (("relu",), 1)])
def test_parameter_count_and_ratio(activations, n_in):
  # Hand count, E=8, d=16, f=32, r=2, per kernel: shared 16*32 = 512,
  # deltas 8*2*(16+32) = 768 -> 1280 vs plain 8*16*32 = 4096.
  kernels = n_in + 1
  assert shared_core.expert_param_counts(E, D, F, R, n_in) == (1280 * kernels,
                                                               4096 * kernels)
  assert shared_core.shared_core_param_ratio(E, D, F, R, n_in) == pytest.approx(0.3125)
  x = jnp.zeros((2, 4, D))
  counts = []
  for rank in (R, 0):
    layer = MoeLayer(config(shared_core_rank=rank, activations=activations))
    shapes = jax.eval_shape(layer.init, jax.random.key(0), x)
    counts.append(sum(int(np.prod(v.shape)) for v in
                      jax.tree.leaves(nn.unbox(shapes)["params"]["experts"])))
  assert counts == [1280 * kernels, 4096 * kernels]


def test_pruning_keeps_the_shared_core():
  layer = MoeLayer(config())
  params = nn.unbox(jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros((2, 4, D))))
  params = jax.tree.map(lambda s: np.ones(s.shape, np.float32), params)
  tree = {"encoder": {"layers": {"layers_1": {"moe": params["params"]}}}}
  keep = np.array([0, 3, 5])
  out = pruning.prune_params(tree, {"encoder/layers/layers_1/moe": keep})
  ex = out["encoder"]["layers"]["layers_1"]["moe"]["experts"]
  assert ex["wi_0_shared"].shape == (D, F) and ex["wo_shared"].shape == (F, D)
  assert ex["wi_0_a"].shape == (3, D, R) and ex["wo_b"].shape == (3, R, D)


def test_negative_rank_is_refused():
  with pytest.raises(ValueError, match="shared_core_rank"):
    dataclasses.replace(config(), shared_core_rank=-1)

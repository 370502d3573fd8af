"""Dispatch strategies: the same outputs, gradients and collectives.

Every strategy of ``moe_jax/layers/dispatch.py`` is checked: its forward
against a NumPy MoE with drops; its gradients (w.r.t. the input and every
parameter, router included) against the ``"scatter"`` strategy's autodiff
gradients (whose forward the same NumPy reference pins); sharded equals
unsharded on a 2x4 mesh with the same all-to-all count as ``"scatter"``; and
the expert weights are never all-gathered.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from np_reference import gelu_tanh as np_gelu, softmax as np_softmax
from sharded_step import compile_on_mesh

from moe_jax.layers import dispatch as dispatch_lib
from moe_jax.layers import moe_config
from moe_jax.layers.moe import MoeConfig, MoeLayer

D, F, E = 16, 32, 8
STRATEGIES = ("scatter", "gather", "einsum", "sort")


def make(dispatch, **kw):
  base = dict(num_experts=E, num_selected_experts=2, d_ff=F, group_size=16,
              capacity_factor_train=0.5, capacity_factor_eval=0.5,
              min_expert_capacity=1, dispatch=dispatch)
  base.update(kw)
  return MoeLayer(MoeConfig(**base))


def inputs(b=4, l=8, seed=3):
  x = jax.random.normal(jax.random.key(seed), (b, l, D), jnp.float32)
  mask = np.ones((b, l), np.int32)
  mask[1, 5:] = 0
  return x, jnp.asarray(mask)


def numpy_moe(params, x, mask, k, capacity_factor):
  """Tokens-choose top-k with GShard capacity, position priority, drops."""
  p = {n: np.asarray(v, np.float64) for n, v in params["params"]["experts"].items()}
  xn = np.asarray(x, np.float64).reshape(-1, 16, D)  # groups of 16 tokens
  mn = np.asarray(mask).reshape(-1, 16)
  probs = np_softmax(xn @ np.asarray(params["params"]["router_kernel"], np.float64))
  cap = max(1, int(np.ceil(capacity_factor * k * 16 / E)))
  out = np.zeros_like(xn)
  for g in range(xn.shape[0]):
    top = np.argsort(-probs[g], -1, kind="stable")[:, :k]
    gate = np.take_along_axis(probs[g], top, -1)
    if k > 1:  # top-k gates are renormalized; Switch's top-1 keeps its probability
      gate = gate / gate.sum(-1, keepdims=True)
    fill = np.zeros(E, int)
    for j in range(k):
      for t in range(16):
        e = top[t, j]
        if not mn[g, t] or fill[e] >= cap:
          continue
        fill[e] += 1
        h = np_gelu(xn[g, t] @ p["wi_0"][e]) * (xn[g, t] @ p["wi_1"][e])
        out[g, t] += gate[t, j] * (h @ p["wo"][e])
  return out.reshape(np.asarray(x).shape)


def test_registry_matches_the_config_list():
  assert set(dispatch_lib.DISPATCH_STRATEGIES) | {"auto"} == set(
      moe_config.DISPATCH_STRATEGIES)
  with pytest.raises(ValueError, match="dispatch"):
    MoeConfig(dispatch="onehot")


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("dispatch", STRATEGIES)
def test_forward_matches_numpy_with_drops(dispatch, k):
  layer = make(dispatch, num_selected_experts=k)
  x, mask = inputs()
  params = nn.unbox(layer.init(jax.random.key(2), x, mask))
  y = np.asarray(layer.apply(params, x, mask))
  np.testing.assert_allclose(y, numpy_moe(params, x, mask, k, 0.5), rtol=2e-4, atol=2e-5)


def _loss(layer, mask):
  def f(params, x):
    y = layer.apply(params, x, mask)
    return jnp.sum(jnp.sin(y) * jnp.arange(y.shape[-1]))
  return f


@pytest.mark.parametrize("router", ["tokens_choose", "experts_choose"])
@pytest.mark.parametrize("dispatch", STRATEGIES[1:])
def test_gradients_equal_the_scatter_strategy(dispatch, router):
  x, mask = inputs()
  kw = dict(router_type=router)
  ref_layer, layer = make("scatter", **kw), make(dispatch, **kw)
  params = nn.unbox(ref_layer.init(jax.random.key(2), x, mask))
  ref = jax.value_and_grad(_loss(ref_layer, mask), argnums=(0, 1))(params, x)
  got = jax.jit(jax.value_and_grad(_loss(layer, mask), argnums=(0, 1)))(params, x)
  assert float(got[0]) == pytest.approx(float(ref[0]), rel=1e-5)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  # The router kernel is trained through the combine weights.
  assert np.abs(np.asarray(got[1][0]["params"]["router_kernel"])).max() > 0


_ALL_TO_ALLS = {}


@pytest.mark.parametrize("dispatch", STRATEGIES)
def test_sharded_equals_unsharded_with_the_same_all_to_alls(dispatch):
  hlo = _sharded_step_hlo(dispatch)
  if "scatter" not in _ALL_TO_ALLS:
    _sharded_step_hlo("scatter")
  assert hlo.count(" all-to-all(") == _ALL_TO_ALLS["scatter"] > 0
  for line in hlo.splitlines():
    if " all-gather(" in line:
      assert f"[{E},{D},{F}]" not in line and f"[{E},{F},{D}]" not in line, line


def _sharded_step_hlo(dispatch):
  layer = make(dispatch, group_size=8)
  x, mask = inputs(b=8)
  boxed = layer.init(jax.random.key(1), x, mask)
  params = nn.unbox(boxed)
  step = jax.value_and_grad(_loss(layer, mask), argnums=(0, 1))
  ref_loss, ref_grads = step(params, x)
  compiled, ps, xs = compile_on_mesh(step, boxed, params, x, {"data": 2, "expert": 4})
  loss, grads = compiled(ps, xs)
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  hlo = compiled.as_text()
  _ALL_TO_ALLS[dispatch] = hlo.count(" all-to-all(")
  return hlo

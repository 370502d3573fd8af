"""Gating dropout, expert/final output masking, expert clusters: formulas and HLO."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from np_reference import gelu_tanh as np_gelu, softmax as np_softmax
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import partitioning
from moe_jax.layers import regularization
from moe_jax.layers.moe import MoeConfig, MoeLayer

D, F, E = 16, 32, 8
RNGS = lambda seed: {n: jax.random.key(seed + i) for i, n in
                     enumerate(("dropout", "jitter", "routing"))}


def make(**kw):
  base = dict(num_experts=E, num_selected_experts=2, d_ff=F, group_size=8,
              capacity_factor_train=8.0, capacity_factor_eval=8.0,
              dropless_block_size=8)
  base.update(kw)
  return MoeLayer(MoeConfig(**base))


def x_input(b=8, l=8, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, l, D), jnp.float32)




def test_output_mask_formula():
  v = jnp.ones((20000,))
  np.testing.assert_allclose(regularization.output_mask(v, 0.3, True, None), 0.7)
  m = np.asarray(regularization.output_mask(v, 0.3, False, jax.random.key(0)))
  assert set(np.unique(m)) <= {0.0, 1.0}
  assert abs(m.mean() - 0.7) < 0.02


@pytest.mark.parametrize("kind", ["eom", "fom"])
def test_output_masking_in_layer(kind):
  rate = 0.4
  field = "expert_output_masking_rate" if kind == "eom" else "final_output_masking_rate"
  # k=1 makes EOM per token all-or-nothing too; FOM is per token for any k.
  layer = make(num_selected_experts=1 if kind == "eom" else 2, **{field: rate})
  plain = make(num_selected_experts=1 if kind == "eom" else 2)
  x = x_input(16, 8)
  params = nn.unbox(plain.init(jax.random.key(1), x))
  ref = np.asarray(plain.apply(params, x))
  np.testing.assert_allclose(np.asarray(layer.apply(params, x)), (1 - rate) * ref,
                             rtol=1e-5, atol=1e-6)
  ref_train = np.asarray(plain.apply(params, x, deterministic=False, rngs=RNGS(0)))
  y = np.asarray(layer.apply(params, x, deterministic=False, rngs=RNGS(0)))
  zero = np.all(y == 0, axis=-1)
  np.testing.assert_allclose(y[~zero], ref_train[~zero], rtol=1e-5, atol=1e-6)
  assert abs(zero.mean() - rate) < 0.12


def test_cluster_variance_loss_matches_numpy():
  rng = np.random.default_rng(0)
  probs = np_softmax(rng.normal(size=(2, 5, 8)))
  mask = np.ones((2, 5))
  mask[1, 3:] = 0
  loss = float(regularization.cluster_variance_loss(
      jnp.asarray(probs, jnp.float32), jnp.asarray(mask, jnp.float32), 2))
  intra, inter = [], []
  for g in range(2):
    for s in range(5):
      if mask[g, s]:
        clusters = [probs[g, s, :4], probs[g, s, 4:]]
        intra.append(np.mean([np.var(c) for c in clusters]))
        inter.append(np.var([np.mean(c) for c in clusters]))
  assert loss == pytest.approx(np.mean(intra) / np.mean(inter), rel=1e-4)


def test_reroute_stays_in_cluster():
  idx = jnp.asarray(np.random.default_rng(0).integers(0, 8, size=(4000, 2)), jnp.int32)
  out = np.asarray(regularization.reroute_within_cluster(idx, 8, 2, 0.3, jax.random.key(0)))
  idx = np.asarray(idx)
  assert np.all(out // 4 == idx // 4)  # same cluster (4 experts each)
  moved = out != idx
  assert abs(moved.mean() - 0.3) < 0.03  # a moved one always changes expert


def test_clusters_sow_loss_and_reroute_in_training():
  layer = make(num_expert_clusters=2, cluster_expert_dropout_rate=0.5)
  x = x_input()
  params = nn.unbox(layer.init(jax.random.key(1), x))
  _, st = layer.apply(params, x, mutable=["intermediates"])
  assert float(st["intermediates"]["cluster_loss"][0]) > 0
  a = layer.apply(params, x, deterministic=False, rngs=RNGS(0))
  b = layer.apply(params, x, deterministic=False, rngs=RNGS(5))
  assert not np.allclose(a, b)  # re-routing is random in training
  np.testing.assert_array_equal(layer.apply(params, x), layer.apply(params, x))


def test_gate_expert_drop_returns_zero_when_fired():
  layer = make(gating_dropout_rate=1.0, gating_dropout_mode="gate_expert_drop")
  x = x_input()
  params = nn.unbox(layer.init(jax.random.key(1), x))
  y, st = layer.apply(params, x, deterministic=False, rngs=RNGS(0),
                      mutable=["intermediates"])
  np.testing.assert_array_equal(np.asarray(y), 0.0)
  assert float(st["intermediates"]["gating_dropout_fired"][0]) == 1.0
  assert not np.allclose(layer.apply(params, x), 0.0)  # eval never drops


def test_gate_drop_serves_tokens_with_local_experts():
  """Mesh data=2, expert=4: batch shard i lives on expert index i % 4 and may
  only use experts 2*(i%4), 2*(i%4)+1. NumPy reference per shard."""
  layer = make(gating_dropout_rate=1.0, gating_dropout_mode="gate_drop")
  x = x_input(8, 4)
  params = nn.unbox(layer.init(jax.random.key(1), x))
  mesh = partitioning.make_mesh(dict(data=2, expert=4))
  with partitioning.with_sharding(mesh, partitioning.standard_logical_rules()):
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp", "expert"))))
    y = jax.jit(lambda p, x: layer.apply(p, x, deterministic=False, rngs=RNGS(0)))(params, xs)
  w = {k: np.asarray(v, np.float64) for k, v in params["params"]["experts"].items()}
  router = np.asarray(params["params"]["router_kernel"], np.float64)
  ref = np.zeros((8, 4, D))
  for i in range(8):  # one sequence per batch shard
    local = [2 * (i % 4), 2 * (i % 4) + 1]
    for t in range(4):
      xt = np.asarray(x[i, t], np.float64)
      p = np_softmax(xt @ router)[local]
      gate = p / p.sum()  # top-2 of 2 local experts, renormalized
      for e, gt in zip(local, gate):
        ref[i, t] += gt * ((np_gelu(xt @ w["wi_0"][e]) * (xt @ w["wi_1"][e])) @ w["wo"][e])
  np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-4, atol=2e-5)


def _computations(hlo):
  comps, name, body = {}, None, []
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m and not line.startswith(" "):
      name, body = m.group(1), []
      comps[name] = body
    elif name is not None:
      body.append(line)
  return {k: "\n".join(v) for k, v in comps.items()}


def _closure_has(comps, root, op, seen=None):
  seen = seen if seen is not None else set()
  if root in seen or root not in comps:
    return False
  seen.add(root)
  text = comps[root]
  if f" {op}(" in text:
    return True
  called = re.findall(r"(?:calls|to_apply|body|condition|branch_computations)=\{?([^}\s,]+(?:, ?%[^}\s,]+)*)", text)
  names = [n.strip().lstrip("%") for group in called for n in group.split(",")]
  return any(_closure_has(comps, n, op, seen) for n in names)


def test_gate_drop_branch_has_no_all_to_all():
  layer = make(gating_dropout_rate=0.5, capacity_factor_train=1.0)
  x = x_input()
  params = nn.unbox(layer.init(jax.random.key(1), x))
  mesh = partitioning.make_mesh(dict(data=2, expert=4))
  with partitioning.with_sharding(mesh, partitioning.standard_logical_rules()):
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp", "expert"))))
    f = jax.jit(jax.grad(lambda p, x: jnp.sum(
        layer.apply(p, x, deterministic=False, rngs=RNGS(0)) ** 2)))
    hlo = f.lower(params, xs).compile().as_text()
  comps = _computations(hlo)
  conds = re.findall(r"conditional\(.*branch_computations=\{%?([\w.\-]+), %?([\w.\-]+)\}", hlo)
  assert conds, "expected a conditional for the gating-dropout draw"
  with_a2a = 0
  for normal, dropped in conds:  # branch 0 = not fired, branch 1 = fired
    assert not _closure_has(comps, dropped, "all-to-all"), dropped
    with_a2a += _closure_has(comps, normal, "all-to-all")
  assert with_a2a >= 1  # the routed branch does the all-to-all

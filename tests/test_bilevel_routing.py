"""Bi-level (SMILE) routing: HLO collectives per level, flat equivalence,
sharded == unsharded, NumPy reference of routing, outputs and per-level losses."""

import itertools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from np_reference import softmax as np_softmax

from moe_jax import partitioning
from moe_jax.layers import bilevel
from moe_jax.layers.moe import MoeConfig, MoeLayer

D, F = 16, 32


def make(**kw):
  base = dict(num_experts=8, num_selected_experts=2, d_ff=F, group_size=8,
              capacity_factor_train=1.0, capacity_factor_eval=1.0,
              min_expert_capacity=1, activations=("relu",))
  base.update(kw)
  cfg = MoeConfig(**base)
  return bilevel.BilevelMoeLayer(cfg) if cfg.bilevel_outer_size else MoeLayer(cfg)


def x_input(b=8, l=8, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, l, D), jnp.float32)


def padding(b, l):
  """Real tokens 1, the tail of every other sequence padded."""
  m = np.ones((b, l), np.int32)
  m[1::2, l - 3:] = 0
  return jnp.asarray(m)


def sown(state, name):
  return state["intermediates"][name][0]


# --------------------------------------------------------------------------
# HLO: parse replica groups of every all-to-all.
# --------------------------------------------------------------------------
def _iota_ids(dims, perm, total):
  ids = np.arange(total).reshape(dims)
  return ids.transpose(perm) if perm is not None else ids


def _parse_int_list(text):
  return [int(v) for v in text.split(",") if v.strip()]


def parse_replica_groups(line):
  """Replica groups of one HLO collective as a set of frozensets of ids.

  Handles the three spellings XLA prints: explicit ``{{0,4},{1,5}}``, iota
  ``[4,2]<=[2,4]T(1,0)`` and mesh-axes ``mesh['axis_0'=2,...],
  device_ids=([4,2]T(1,0)) {'axis_0'}``.
  """
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]"
                r"(?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?\s*\{([^}]*)\}",
                line)
  if m:
    names_sizes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
    names = [n for n, _ in names_sizes]
    sizes = [int(s) for _, s in names_sizes]
    total = int(np.prod(sizes))
    if m.group(2):
      perm = _parse_int_list(m.group(3)) if m.group(3) else None
      ids = _iota_ids(_parse_int_list(m.group(2)), perm, total).reshape(sizes)
    else:
      ids = np.arange(total).reshape(sizes)
    over = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(4))]
    rest = [i for i in range(len(sizes)) if i not in over]
    ids = ids.transpose(rest + over).reshape(-1, int(np.prod([sizes[i] for i in over])))
    return {frozenset(int(v) for v in row) for row in ids}
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
  if m:
    n, k = int(m.group(1)), int(m.group(2))
    perm = _parse_int_list(m.group(4)) if m.group(4) else None
    ids = _iota_ids(_parse_int_list(m.group(3)), perm, n * k).reshape(n, k)
    return {frozenset(int(v) for v in row) for row in ids}
  m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", line)
  if m:
    return {frozenset(_parse_int_list(g)) for g in re.findall(r"\{([\d,]*)\}", m.group(1))}
  raise AssertionError(f"Cannot parse replica_groups in: {line[:300]}")


def test_parse_replica_groups_spellings():
  expect = {frozenset({0, 4}), frozenset({1, 5}), frozenset({2, 6}), frozenset({3, 7})}
  assert parse_replica_groups("x replica_groups={{0,4},{1,5},{2,6},{3,7}}, y") == expect
  assert parse_replica_groups("replica_groups=[4,2]<=[2,4]T(1,0), y") == expect
  assert parse_replica_groups(
      "replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, m") == expect
  assert parse_replica_groups(
      "replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) "
      "{'axis_1'}, m") == expect


def _sub_axis_groups(mesh, axis):
  """Device-id groups along one mesh axis (all other coordinates fixed)."""
  devs = np.vectorize(lambda dv: dv.id)(mesh.devices)
  ax = mesh.axis_names.index(axis)
  moved = np.moveaxis(devs, ax, -1).reshape(-1, devs.shape[ax])
  return {frozenset(int(v) for v in row) for row in moved}


def _loss_fn(layer, mask):
  def f(params, x):
    y, st = layer.apply(params, x, padding_mask=mask, mutable=["intermediates"])
    aux = st["intermediates"]
    return jnp.sum(jnp.sin(y)) + 0.1 * aux["aux_loss"][0], (
        aux["aux_loss_outer"][0], aux["aux_loss_inner"][0])
  return f


def test_two_level_all_to_alls_on_2x4_mesh_and_sharded_equals_unsharded():
  layer = make(bilevel_outer_size=2)
  x = x_input()
  mask = padding(8, 8)
  boxed = jax.jit(layer.init)(jax.random.key(1), x)
  params = nn.unbox(boxed)
  step = jax.value_and_grad(_loss_fn(layer, mask), argnums=(0, 1), has_aux=True)
  (ref_loss, ref_aux), ref_grads = jax.jit(step)(params, x)

  mesh = partitioning.make_mesh(dict(data=2, expert=4))
  rules = partitioning.standard_logical_rules()
  with partitioning.with_sharding(mesh, rules):
    shardings = partitioning.params_shardings(mesh, boxed, rules)
    batch = NamedSharding(mesh, P(("data", "fsdp", "expert")))
    xs, ps = jax.device_put(x, batch), jax.device_put(params, shardings)
    compiled = jax.jit(step).lower(ps, xs).compile()
    (loss, aux), grads = compiled(ps, xs)

  # Sharded == unsharded: loss, both level losses and every gradient.
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
  np.testing.assert_allclose(np.asarray(aux), np.asarray(ref_aux), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)

  # Expert weights: outer level on 'data', inner level on 'expert'.
  assert ps["params"]["experts"]["wo"].sharding.spec[:2] == ("data", "expert")

  # Every all-to-all runs over exactly one level's sub-axis groups: the outer
  # groups (same expert coordinate, data varies) or the inner groups (same
  # data coordinate, expert varies); both levels appear; no flat all-to-all.
  outer = _sub_axis_groups(mesh, "data")
  inner = _sub_axis_groups(mesh, "expert")
  assert outer == {frozenset({0, 4}), frozenset({1, 5}), frozenset({2, 6}), frozenset({3, 7})}
  assert inner == {frozenset({0, 1, 2, 3}), frozenset({4, 5, 6, 7})}
  part_to_device = [dv.id for dv in mesh.devices.flat]  # partition id -> device id
  hlo = compiled.as_text()
  seen = []
  for line in hlo.splitlines():
    if " all-to-all(" in line or " all-to-all-start(" in line:
      groups = {frozenset(part_to_device[p] for p in g) for g in parse_replica_groups(line)}
      assert groups in (outer, inner), line[:300]
      seen.append("outer" if groups == outer else "inner")
  # Forward: tokens (+ slot mask) out, in, back in, back out; and the backward.
  assert seen.count("outer") >= 3 and seen.count("inner") >= 2, seen
  assert "collective-permute(" not in hlo  # pure sub-axis exchanges


def _flat_params_to_bilevel(flat, outer_kernel):
  p = flat["params"]
  return {"params": {
      "router_outer_kernel": outer_kernel,
      "router_inner_kernel": p["router_kernel"][None],
      "experts": {k: v[None] for k, v in p["experts"].items()}}}


def test_outer_size_one_equals_flat_routing():
  train = True
  kw = dict(activations=("gelu", "linear"), priority="batch_prioritized")
  flat, bi = make(**kw), make(bilevel_outer_size=1, **kw)
  x = x_input(4, 8, seed=2)
  mask = padding(4, 8)
  flat_params = nn.unbox(jax.jit(flat.init)(jax.random.key(3), x))
  outer_kernel = jax.random.normal(jax.random.key(4), (D, 1))
  bi_params = _flat_params_to_bilevel(flat_params, outer_kernel)
  assert (jax.tree.map(jnp.shape, bi_params)
          == jax.tree.map(jnp.shape, nn.unbox(jax.eval_shape(bi.init, jax.random.key(3), x))))

  def run(layer):
    def f(params, x):
      y, st = layer.apply(params, x, padding_mask=mask, deterministic=not train,
                          mutable=["intermediates"])
      return jnp.sum(jnp.sin(y)), (y, st["intermediates"])
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

  (_, (y_f, st_f)), (gp_f, gx_f) = run(flat)(flat_params, x)
  (_, (y_b, st_b)), (gp_b, gx_b) = run(bi)(bi_params, x)
  np.testing.assert_allclose(y_b, y_f, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gx_b, gx_f, rtol=1e-5, atol=1e-6)
  mapped = _flat_params_to_bilevel(gp_f, np.zeros((D, 1), np.float32))
  for path, a in jax.tree_util.tree_flatten_with_path(gp_b)[0]:
    b = dict(jax.tree_util.tree_flatten_with_path(mapped)[0])[path]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=str(path))
  assert float(st_f["dropped_fraction"][0]) > 0  # the test exercises drops
  for name in ("dropped_fraction", "expert_load", "router_confidence"):
    np.testing.assert_allclose(st_b[name][0], st_f[name][0], rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(st_b["aux_loss_inner"][0], st_f["aux_loss"][0], rtol=1e-5)
  # One outer group: its Switch loss is E_o * f * P = 1 * 1 * 1.
  np.testing.assert_allclose(st_b["aux_loss_outer"][0], 1.0, rtol=1e-6)


# --------------------------------------------------------------------------
# NumPy reference of the whole bi-level layer (position priority).
# --------------------------------------------------------------------------
def _switch_loss(probs, chosen):
  """E * sum_e f_e * P_e over one group's real tokens (probs [T, E], chosen [T, E])."""
  return probs.shape[-1] * np.sum(chosen.mean(0) * probs.mean(0))


def numpy_bilevel(x, mask, params, eo, k, g, c1, c2):
  """Returns (y [B, L, D], aux_outer, aux_inner, dropped_fraction)."""
  p = {n: np.asarray(v, np.float64) for n, v in params["params"]["experts"].items()}
  w_o = np.asarray(params["params"]["router_outer_kernel"], np.float64)
  w_i = np.asarray(params["params"]["router_inner_kernel"], np.float64)
  b, l, d = x.shape
  xs = np.asarray(x, np.float64).reshape(g, -1, d)
  ms = np.asarray(mask).reshape(g, -1)
  y = np.zeros_like(xs)
  outer_losses, inner_losses, kept = [], [], 0
  for gi in range(g):
    real = [t for t in range(xs.shape[1]) if ms[gi, t]]
    po = np_softmax(xs[gi] @ w_o)
    choice = po.argmax(-1)
    outer_losses.append(_switch_loss(po[real], np.eye(eo)[choice[real]]))
    for o in range(eo):
      tokens = [t for t in real if choice[t] == o][:c1]  # outer capacity, in order
      if not tokens:
        continue
      pi = np_softmax(xs[gi, tokens] @ w_i[o])
      top = np.argsort(-pi, axis=-1)[:, :k]
      gates = np.take_along_axis(pi, top, -1)
      gates = gates / gates.sum(-1, keepdims=True)
      inner_losses.append(_switch_loss(pi, np.eye(pi.shape[-1])[top].max(1)))
      fill = np.zeros(pi.shape[-1], int)
      for j in range(k):  # every first choice before any second choice
        for n, t in enumerate(tokens):
          e = top[n, j]
          if fill[e] < c2:
            fill[e] += 1
            kept += 1
            h = np.maximum(xs[gi, t] @ p["wi"][o, e], 0.0)
            y[gi, t] += po[t, o] * gates[n, j] * (h @ p["wo"][o, e])
  dropped = 1 - kept / (k * np.asarray(mask).sum())
  return y.reshape(b, l, d), np.mean(outer_losses), np.mean(inner_losses), dropped


def test_matches_numpy_reference_with_per_level_losses():
  layer = make(bilevel_outer_size=2)
  x = x_input(4, 8, seed=5)
  mask = padding(4, 8)
  params = nn.unbox(jax.jit(layer.init)(jax.random.key(6), x))
  # Sharper routers than the 0.02 init, so routing is decisive and uneven.
  params["params"]["router_outer_kernel"] = jax.random.normal(jax.random.key(7), (D, 2))
  params["params"]["router_inner_kernel"] = jax.random.normal(jax.random.key(8), (2, D, 4))
  y, st = jax.jit(lambda p, x: layer.apply(p, x, padding_mask=mask,
                                           mutable=["intermediates"]))(params, x)
  # group_size 8 -> G=4 groups of S=8; C1 = ceil(8/2) = 4; C2 = ceil(2*8/8) = 2.
  ref_y, ref_outer, ref_inner, ref_drop = numpy_bilevel(
      x, mask, params, eo=2, k=2, g=4, c1=4, c2=2)
  np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(sown(st, "aux_loss_outer"), ref_outer, rtol=1e-5)
  np.testing.assert_allclose(sown(st, "aux_loss_inner"), ref_inner, rtol=1e-5)
  np.testing.assert_allclose(sown(st, "aux_loss"), ref_outer + ref_inner, rtol=1e-5)
  np.testing.assert_allclose(sown(st, "dropped_fraction"), ref_drop, rtol=1e-5)
  assert 0 < ref_drop < 1
  load = sown(st, "expert_load")
  assert load.shape == (8,)
  np.testing.assert_allclose(load.sum(), 1 - _outer_dropped(x, mask, params, 4, 4),
                             rtol=1e-5)


def _outer_dropped(x, mask, params, g, c1):
  """Fraction of real tokens dropped at the outer level (NumPy)."""
  xs = np.asarray(x, np.float64).reshape(g, -1, x.shape[-1])
  ms = np.asarray(mask).reshape(g, -1)
  choice = (xs @ np.asarray(params["params"]["router_outer_kernel"])).argmax(-1)
  dropped = 0
  for gi, o in itertools.product(range(g), range(2)):
    n = int(np.sum((choice[gi] == o) & (ms[gi] > 0)))
    dropped += max(0, n - c1)
  return dropped / ms.sum()


def test_rngs_change_training_output():
  layer = make(bilevel_outer_size=2, jitter_noise=0.1, expert_dropout_rate=0.5,
               priority="random")
  x = x_input(4, 8)
  params = nn.unbox(jax.jit(layer.init)(jax.random.key(1), x))

  def train_apply(key):
    return layer.apply(params, x, deterministic=False,
                       rngs={"jitter": key, "dropout": key, "routing": key})

  run = jax.jit(train_apply)  # one compile, two keys
  a, b = run(jax.random.key(0)), run(jax.random.key(1))
  assert a.shape == x.shape and not np.allclose(a, b)


def test_capacities():
  cfg = MoeConfig(num_experts=8, num_selected_experts=2, bilevel_outer_size=2,
                  capacity_factor_train=1.25, capacity_factor_eval=2.0,
                  min_expert_capacity=1)
  # C1 = ceil(cf * S / E_o); C2 = min(C1, ceil(cf * k * S / E)).
  assert bilevel._capacities(cfg, 64, deterministic=False, decode=False) == (40, 20)
  assert bilevel._capacities(cfg, 64, deterministic=True, decode=False) == (64, 32)
  assert bilevel._capacities(cfg, 8, deterministic=True, decode=True) == (8, 8)  # no drops


def test_bad_configs_raise_with_fix():
  with pytest.raises(ValueError, match="divisor of num_experts"):
    MoeConfig(num_experts=8, bilevel_outer_size=3)
  with pytest.raises(ValueError, match="does not support dropless"):
    MoeConfig(num_experts=8, bilevel_outer_size=2, dropless=True)
  with pytest.raises(ValueError, match="experts_choose"):
    MoeConfig(num_experts=8, bilevel_outer_size=2, router_type="experts_choose")
  rules = partitioning.standard_logical_rules()
  mesh = partitioning.make_mesh(dict(data=4, expert=2))
  with pytest.raises(ValueError, match="multiple of 4 outer groups"):
    bilevel.validate_mesh(2, 4, mesh, rules)
  mesh = partitioning.make_mesh(dict(data=2, expert=4))
  with pytest.raises(ValueError, match="2 inner experts is not divisible"):
    bilevel.validate_mesh(4, 2, mesh, rules)
  bilevel.validate_mesh(2, 4, mesh, rules)  # the 2x4 layout of the HLO test


def test_level_mesh_axes_from_standard_rules():
  axes = bilevel.level_mesh_axes(partitioning.standard_logical_rules())
  assert axes["outer"] == ("data",) and axes["inner"] == ("expert",)
  assert axes["groups_after_outer"] == ("fsdp", "expert")
  assert axes["groups_after_both"] == ("fsdp",)


@pytest.mark.parametrize("option", ["expert_output_masking_rate",
                                    "final_output_masking_rate"])
def test_output_masking_in_eval_scales_the_bilevel_output(option):
  """EOM/FOM combine with bi-level routing: in eval both scale by 1 - p
  (NLLB), in training they drop some outputs."""
  x = x_input()
  plain = make(bilevel_outer_size=2)
  masked = make(bilevel_outer_size=2, **{option: 0.25})
  params = nn.unbox(plain.init(jax.random.key(1), x))
  want = 0.75 * np.asarray(plain.apply(params, x))
  np.testing.assert_allclose(np.asarray(masked.apply(params, x)), want, rtol=1e-5,
                             atol=1e-6)
  train = np.asarray(masked.apply(params, x, deterministic=False,
                                  rngs={"dropout": jax.random.key(3)}))
  assert not np.allclose(train, want / 0.75)


def test_flat_layer_refuses_a_bilevel_config():
  with pytest.raises(ValueError, match="BilevelMoeLayer"):
    MoeLayer(MoeConfig(num_experts=8, bilevel_outer_size=2)).init(
        jax.random.key(0), x_input())

"""Dropless expert-parallel exchanges (layers/ep_exchange.py, dropless.py).

* The index math of the ragged form against a NumPy model of
  ``ragged_all_to_all``'s documented semantics (XLA:CPU cannot run it).
* The fixed-size all_to_all form equals the all-gather form and the capacity
  path with ample capacity (forward and gradients, meshes 1x8, 2x4, 4x2).
* Overflow is counted and reported, never silent.
* A TPU compile of the ragged form has ragged-all-to-all and no all-gather
  of tokens.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sharded_step import compile_on_mesh
from moe_jax import partitioning
from moe_jax.layers import ep_exchange
from moe_jax.layers.moe import MoeConfig, MoeLayer

D, F, E = 16, 32, 8


# --- NumPy model of ragged_all_to_all (jax.lax.ragged_all_to_all docstring) ---
def np_ragged_all_to_all(operands, outputs, input_offsets, send_sizes, output_offsets,
                         recv_sizes):
  """All devices at once: lists indexed by device; one slice per peer."""
  n = len(operands)
  results = [o.copy() for o in outputs]
  for src in range(n):
    for dst in range(n):
      size = send_sizes[src][dst]
      assert size == recv_sizes[dst][src]
      rows = operands[src][input_offsets[src][dst]:input_offsets[src][dst] + size]
      at = output_offsets[src][dst]  # where src's slice lands on dst
      results[dst][at:at + size] = rows
  return results


def _routing(rng, ep, t, k, zero_rows=()):
  idx = np.stack([rng.permutation(E)[:k] for _ in range(ep * t)]).reshape(ep, t, k)
  wt = rng.uniform(0.1, 1.0, (ep, t, k)).astype(np.float32)
  for d, r in zero_rows:
    wt[d, r] = 0.0  # padding tokens: nothing sent
  return idx.astype(np.int32), wt


@pytest.mark.parametrize("capacity", [None, 5])
def test_ragged_index_math_against_numpy_ragged_all_to_all(capacity):
  ep, t, k = 4, 6, 3
  e_local = E // ep
  rng = np.random.default_rng(0)
  idx, wt = _routing(rng, ep, t, k, zero_rows=[(1, 2), (3, 5)])
  x = rng.normal(size=(ep, t, D)).astype(np.float32)
  plans = [ep_exchange.plan(jnp.asarray(idx[d]), jnp.asarray(wt[d]), e_local, ep)
           for d in range(ep)]
  # Routes: one per (token, shard) with an assignment there.
  for d, p in enumerate(plans):
    want = sum(len({int(e) // e_local for e, w in zip(idx[d, i], wt[d, i]) if w})
               for i in range(t))
    assert int(np.asarray(p.present).sum()) == int(np.asarray(p.counts).sum()) == want
  counts = np.stack([np.asarray(p.counts) for p in plans])  # [src, dst]
  default = capacity is None  # the default receive buffer never overflows here
  if default:
    capacity = ep_exchange.receive_rows(t, k, ep, MoeConfig().dropless_buffer_factor)
  offs = [{n: np.asarray(v) for n, v in ep_exchange.ragged_offsets(
      jnp.asarray(counts), d, capacity).items()} for d in range(ep)]
  starts = [np.asarray(p.starts) for p in plans]
  sent = [[np.asarray(a) for a in ep_exchange.gather_routes(jnp.asarray(x[d]), p, p.order)]
          for d, p in enumerate(plans)]
  args = ([o["send_sizes"] for o in offs], [o["output_offsets"] for o in offs],
          [o["recv_sizes"] for o in offs])
  recv_x = np_ragged_all_to_all([s_[0] for s_ in sent], [np.zeros((capacity, D))] * ep,
                                starts, *args)
  recv_e = np_ragged_all_to_all([s_[1] for s_ in sent], [np.full((capacity, k), -1)] * ep,
                                starts, *args)
  recv_w = np_ragged_all_to_all([s_[2] for s_ in sent], [np.zeros((capacity, k))] * ep,
                                starts, *args)
  # Shard d's "experts": row * (1 + global expert id), weighted and summed.
  results = [np.einsum("rk,rk,rd->rd", w, np.where(e >= 0, 1 + d * e_local + e, 0), r)
             for d, (r, e, w) in enumerate(zip(recv_x, recv_e, recv_w))]
  starts_matrix = np.stack(starts)
  back = np_ragged_all_to_all(results, [np.zeros((t * k, D))] * ep,
                              [o["recv_offsets"] for o in offs],
                              [o["recv_sizes"] for o in offs],
                              [starts_matrix[:, d] for d in range(ep)],
                              [o["send_sizes"] for o in offs])
  lost = 0
  for d, p in enumerate(plans):
    pos = ep_exchange.ragged_positions(p, jnp.asarray(offs[d]["send_sizes"]))
    y = np.asarray(ep_exchange.combine_routes(jnp.asarray(back[d], jnp.float32), pos, t))
    lost += float(ep_exchange.overflow_assignments(p, pos, t * k))
    # Which assignments were computed: those whose route got a row.
    computed = np.zeros((t, k), bool)
    route_ok = np.asarray(pos) < t * k
    dest = np.asarray(p.dest).reshape(t, k)
    for i in range(t):
      for j in range(k):
        shard = idx[d, i, j] // e_local
        computed[i, j] = wt[d, i, j] != 0 and any(
            route_ok[i * k + r] and dest[i, r] == shard for r in range(k))
    want = np.einsum("tk,tk,td->td", wt[d], (1 + idx[d]) * computed, x[d])
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    lost_here = int(((wt[d] != 0) & ~computed).sum())
    assert float(ep_exchange.overflow_assignments(p, pos, t * k)) == lost_here
  assert (lost == 0) == default


def make(**kw):
  base = dict(num_experts=E, num_selected_experts=2, d_ff=F, group_size=32,
              capacity_factor_train=8.0, capacity_factor_eval=8.0,
              dropless_block_size=8)
  base.update(kw)
  return MoeLayer(MoeConfig(**base))


def _loss(layer, mask):
  def f(params, x):
    y, st = layer.apply(params, x, mask, mutable=["intermediates"])
    return jnp.sum(jnp.sin(y)), st["intermediates"]["dropped_fraction"][0]
  return f


def _sharded(layer, params, x, mask, spec):
  step = jax.value_and_grad(_loss(layer, mask), argnums=(0, 1), has_aux=True)
  compiled, ps, xs = compile_on_mesh(step, layer.init(jax.random.key(1), x, mask),
                                     params, x, spec)
  return compiled(ps, xs), compiled.as_text()


MESHES = [dict(data=1, expert=8), dict(data=2, expert=4), dict(data=4, expert=2)]


@pytest.mark.parametrize("spec", MESHES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()))
def test_all_to_all_exchange_equals_all_gather_and_ample_capacity(spec):
  x = jax.random.normal(jax.random.key(0), (8, 8, D))
  mask = jnp.ones((8, 8), jnp.int32).at[2, 5:].set(0)
  ref_layer = make()  # capacity path, capacity factor 8: nothing dropped
  params = nn.unbox(ref_layer.init(jax.random.key(1), x, mask))
  (ref_loss, _), ref_grads = jax.value_and_grad(
      _loss(ref_layer, mask), argnums=(0, 1), has_aux=True)(params, x)
  for exchange in ("all_gather", "all_to_all"):
    layer = make(dropless=True, dropless_exchange=exchange)
    ((loss, dropped), grads), hlo = _sharded(layer, params, x, mask, spec)
    assert float(dropped) == 0.0
    assert float(loss) == pytest.approx(float(ref_loss), abs=1e-4), exchange
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    if exchange == "all_to_all":
      assert " all-to-all(" in hlo
      for line in hlo.splitlines():  # tokens never all-gathered
        if " all-gather(" in line:
          assert f",{D}]" not in line.split("all-gather(")[0], line


def test_overflow_is_counted_and_reported():
  """A router that sends every token to experts 0 and 1 overflows those two
  shards' buffers; the reported dropped fraction is exactly the overflow."""
  x = jax.random.normal(jax.random.key(0), (8, 8, D))
  mask = jnp.ones((8, 8), jnp.int32)
  layer = make(dropless=True, dropless_exchange="all_to_all", router_bias=True,
               dropless_buffer_factor=0.01)
  params = nn.unbox(layer.init(jax.random.key(1), x, mask))
  bias = jnp.zeros((E,)).at[0].set(30.0).at[1].set(20.0)
  params = {"params": {**params["params"], "router_bias": bias}}
  (_, dropped), _ = _sharded(layer, params, x, mask, dict(data=1, expert=8))[0]
  # Each device (one sequence: 8 tokens x 2 choices) sends 8 routes (one per
  # token) to each of shards 0 and 1, whose buffers hold B rows per peer; a
  # route that overflows loses its one assignment.
  rows = ep_exchange.buffer_rows(8, 2, 8, 0.01)
  assert rows < 8
  assert float(dropped) == pytest.approx(8 * 2 * (8 - rows) / 128, abs=1e-6)


def test_tpu_compile_of_the_ragged_form_has_ragged_all_to_all():
  topologies = pytest.importorskip("jax.experimental.topologies")
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"no TPU compiler (pip install -e '.[tpu]'): {e}")
  mesh = partitioning.make_mesh({"data": 1, "expert": 4}, devices=topo.devices)
  rules = partitioning.standard_logical_rules()
  layer = make(dropless=True, dropless_exchange="auto", num_experts=8)
  x = jax.ShapeDtypeStruct((8, 16, D), jnp.float32)
  params = partitioning.abstract_params(layer, mesh, rules, x)
  xs = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
      mesh, P(("data", "fsdp", "expert"))))
  with partitioning.with_sharding(mesh, rules):

    def loss(p, x):
      return jnp.sum(jnp.sin(layer.apply(p, x)))

    hlo = jax.jit(jax.grad(loss)).lower(params, xs).compile().as_text()
  assert "ragged-all-to-all" in hlo
  for line in hlo.splitlines():
    if " all-gather(" in line or " all-gather-start(" in line:
      assert f",{D}]" not in line.split("all-gather")[0], line


def test_kernels_are_chosen_by_the_mesh_platform_not_the_default_backend():
  from moe_jax.layers import dropless  # pylint: disable=g-import-not-at-top
  assert jax.default_backend() == "cpu"
  assert dropless.kernel_for(partitioning.make_mesh({"expert": 8})) == "cpu"
  topologies = pytest.importorskip("jax.experimental.topologies")
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"no TPU compiler (pip install -e '.[tpu]'): {e}")
  tpu_mesh = partitioning.make_mesh({"expert": 4}, devices=topo.devices)
  assert dropless.kernel_for(tpu_mesh) == "ragged"
  from moe_jax.layers import computes  # pylint: disable=g-import-not-at-top
  assert computes.DroplessCompute(MoeConfig(dropless=True), mesh=tpu_mesh).exchange == "ragged"
  assert computes.DroplessCompute(MoeConfig(dropless=True),
                                  mesh=partitioning.make_mesh({"expert": 8})
                                  ).exchange == "all_to_all"

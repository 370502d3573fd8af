"""The router registry, the compute choice and the layer's plug-in contract.

``test_docs_example_router_plugs_in`` runs the "Adding a router" example of
docs/moe_layer.md: a new router registered beside the others works in the
unchanged layer.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from moe_jax.layers import computes, moe_config, moe_metrics, routers, routing
from moe_jax.layers.moe import MoeConfig, MoeLayer


def test_registry_matches_the_config_list():
  assert sorted(routers.registered()) == sorted(moe_config.ROUTER_TYPES)
  for name in moe_config.ROUTER_TYPES:
    router = routers.make_router(MoeConfig(router_type=name))
    assert router.rng_mode(False) in (None, "fixed")
    assert router.rng_mode(True) in (None, "stream")


@pytest.mark.parametrize("kw, train, want", [
    (dict(), True, computes.CapacityCompute),
    (dict(dropless=True), False, computes.DroplessCompute),
    (dict(gating_dropout_rate=0.3), False, computes.CapacityCompute),
    (dict(gating_dropout_rate=0.3), True, computes.GatingDropout),
])
def test_make_compute(kw, train, want):
  assert type(computes.make_compute(MoeConfig(**kw), train=train, mesh=None)) is want


def test_gating_dropout_draws_after_the_routed_keys_and_reads_the_routed_weights():
  c = MoeConfig(dropless=True, expert_dropout_rate=0.1, gating_dropout_rate=0.5,
                gating_dropout_mode="gate_expert_drop")
  gd = computes.make_compute(c, train=True, mesh=None)
  assert gd.rng_streams() == (("dropout", "dropout"), ("gating", "routing"))
  assert gd.weight_field == "expert_weight"
  assert float(gd.adjust_metrics({"dropped_fraction": 0.5})["dropped_fraction"]) == 0.0


def test_unregistered_metric_is_refused():
  class Sower(nn.Module):
    @nn.compact
    def __call__(self):
      moe_metrics.sow_all(self, {"my_new_metric": jnp.zeros(())})

  with pytest.raises(ValueError, match="not registered"):
    Sower().init(jax.random.key(0))


# --- the docs example -------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class UniformRouter:
  """Every token to expert (token index mod E), weight 1 (a toy)."""

  def rng_mode(self, train):
    return None

  def route(self, logits, padding_mask, capacity, rng=None, selection_bias=None):
    g, s, e = logits.shape
    mask = routing.as_mask(padding_mask, (g, s))
    index = (jnp.arange(s)[None, :, None] % e).repeat(g, 0)  # [G, S, 1]
    claims = jax.nn.one_hot(index, e, dtype=jnp.int32) * mask[..., None, None].astype(
        jnp.int32)
    position = routing.queue_positions(jnp.swapaxes(claims, 1, 2))
    keep = (position < capacity) & (mask[..., None] > 0)
    slot = jnp.where(keep, index * capacity + position, e * capacity)
    slot_token, slot_weight = routing.slot_tables(slot, keep.astype(jnp.float32),
                                                  e * capacity)
    probs = jax.nn.softmax(logits, -1)
    metrics = routing.standard_metrics(
        probs, logits, mask, aux_loss=jnp.zeros(()), expert_load=jnp.full((e,), 1 / e),
        dropped_fraction=1 - keep.sum() / jnp.maximum(mask.sum(), 1))
    return routing.RoutingDecision(slot_token.reshape(g, e, capacity),
                                   slot_weight.reshape(g, e, capacity), index,
                                   keep.astype(jnp.float32), probs, mask, metrics)


def test_docs_example_router_plugs_in(monkeypatch):
  monkeypatch.setattr(moe_config, "ROUTER_TYPES", moe_config.ROUTER_TYPES + ("uniform",))
  monkeypatch.setitem(routers._BUILDERS, "uniform", lambda c: UniformRouter())  # pylint: disable=protected-access
  e, d, f = 4, 8, 16
  layer = MoeLayer(MoeConfig(num_experts=e, num_selected_experts=1, d_ff=f,
                             router_type="uniform", group_size=8,
                             capacity_factor_eval=1.0, activations=("relu",)))
  x = jax.random.normal(jax.random.key(0), (2, 8, d))
  params = nn.unbox(layer.init(jax.random.key(1), x))
  y, state = layer.apply(params, x, mutable=["intermediates"])
  ex = {k: np.asarray(v) for k, v in params["params"]["experts"].items()}
  xn = np.asarray(x)
  want = np.stack([[np.maximum(xn[b, t] @ ex["wi"][t % e], 0) @ ex["wo"][t % e]
                    for t in range(8)] for b in range(2)])
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
  assert float(state["intermediates"]["dropped_fraction"][0]) == 0.0

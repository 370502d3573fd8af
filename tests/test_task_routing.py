"""Task-/language-level routing: the layer, the route-id data path, pruning."""

import flax.linen as nn
import jax
import numpy as np
import pytest
import tensorflow as tf

from moe_jax import models, partitioning
from moe_jax.data import pipeline
from moe_jax.data import route_ids
from moe_jax.evaluation import pruning
from moe_jax.layers import task_routing
from moe_jax.layers.moe import MoeLayer
from moe_jax.layers.moe_config import MoeConfig
from moe_jax.models import decoding
from moe_jax.models.config import SparseLayout, T5Config

E, K, D, F, N = 4, 2, 16, 8, 3


def _moe_config(**kw):
  base = dict(num_experts=E, num_selected_experts=K, d_ff=F, dropless=True,
              routing_level="task", num_route_ids=N, router_init_stddev=1.0)
  base.update(kw)
  return MoeConfig(**base)


def _single_mesh():
  return partitioning.make_mesh({"data": 1}, devices=jax.devices()[:1])


# ---------------------------------------------------------------------------
# Layer
# ---------------------------------------------------------------------------

def test_layer_routes_every_token_by_its_id_like_numpy():
  """Output = sum over the top-k experts of row ``id`` of the table (NumPy)."""
  cfg = _moe_config(activations=("relu",))
  layer = MoeLayer(cfg)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 5, D)).astype(np.float32)
  ids = rng.integers(1, N + 1, size=(4, 5)).astype(np.int32)
  mesh, rules = _single_mesh(), partitioning.standard_logical_rules()
  with partitioning.with_sharding(mesh, rules):
    params = jax.jit(lambda: nn.unbox(layer.init(jax.random.PRNGKey(0), x,
                                                 route_ids=ids)["params"]))()
    y = np.asarray(jax.jit(lambda p: layer.apply({"params": p}, x, route_ids=ids))(params))
  table = np.asarray(params["router_kernel"])
  assert table.shape == (N + 1, E)
  wi, wo = np.asarray(params["experts"]["wi"]), np.asarray(params["experts"]["wo"])
  want = np.zeros_like(x)
  for b in range(4):
    for t in range(5):
      row = table[ids[b, t]]
      top = np.argsort(-row)[:K]
      p = np.exp(row - row.max())
      p /= p.sum()
      w = p[top] / p[top].sum()  # renormalized top-k gates
      for e, we in zip(top, w):
        want[b, t] += we * (np.maximum(x[b, t] @ wi[e], 0.0) @ wo[e])
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_all_tokens_with_one_id_choose_the_same_experts():
  probe = task_routing.TaskRouterLogits(num_route_ids=N, num_experts=E, init_stddev=1.0)
  ids = np.array([[1, 1, 2, 0], [3, 3, 3, 2]], np.int32)
  x = np.zeros(ids.shape + (4,), np.float32)
  params = probe.init(jax.random.PRNGKey(1), x, route_ids=ids)["params"]
  logits = np.asarray(probe.apply({"params": params}, x, route_ids=ids)[0])
  table = np.asarray(nn.unbox(params)["router_kernel"])
  np.testing.assert_array_equal(logits, table[ids])
  chosen = np.asarray(jax.lax.top_k(logits, K)[1])
  for b in range(2):
    for t in range(4):
      np.testing.assert_array_equal(chosen[b, t], np.argsort(-table[ids[b, t]])[:K])


def test_config_validation_and_missing_ids_error(tiny):
  with pytest.raises(ValueError, match="num_route_ids"):
    MoeConfig(routing_level="task", num_route_ids=0)
  with pytest.raises(ValueError, match="routing_level"):
    MoeConfig(routing_level="sentence")
  _, model, params, batch, _ = tiny
  mesh, rules = _single_mesh(), partitioning.standard_logical_rules()
  with partitioning.with_sharding(mesh, rules):
    with pytest.raises(ValueError, match="encoder_route_ids"):  # raised while tracing
      jax.eval_shape(lambda p: model.apply({"params": p}, *batch, enable_dropout=False),
                     params)


# ---------------------------------------------------------------------------
# Model: sharded == unsharded, pruning to a language's experts
# ---------------------------------------------------------------------------

def _tiny_model():
  cfg = T5Config(vocab_size=32, d_model=D, num_heads=2, d_kv=8, d_ff=16,
                 num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0,
                 moe=_moe_config(), encoder_layout=SparseLayout("every"),
                 decoder_layout=SparseLayout("every"))
  model = models.build_model(cfg)
  rng = np.random.default_rng(0)
  batch = (rng.integers(2, 32, (8, 6)).astype(np.int32),
           rng.integers(2, 32, (8, 5)).astype(np.int32),
           rng.integers(2, 32, (8, 5)).astype(np.int32))
  route = {"encoder_route_ids": np.repeat(rng.integers(1, N + 1, (8, 1)), 6, 1).astype(np.int32),
           "decoder_route_ids": np.repeat(rng.integers(1, N + 1, (8, 1)), 5, 1).astype(np.int32)}
  mesh, rules = _single_mesh(), partitioning.standard_logical_rules()
  with partitioning.with_sharding(mesh, rules):
    params = jax.device_get(jax.jit(lambda: nn.unbox(model.init(
        jax.random.PRNGKey(0), *batch, enable_dropout=False)["params"]))())
  return cfg, model, params, batch, route


@pytest.fixture(scope="module")
def tiny():
  return _tiny_model()


_JITTED = {}


def _logits(model, params, batch, route, mesh):
  """Logits of a jitted forward, compiled once per (model, mesh) and shape."""
  key = (id(model), tuple(mesh.shape.items()))
  if key not in _JITTED:
    _JITTED[key] = (model, jax.jit(lambda p, b, r: model.apply(
        {"params": p}, *b, **r, enable_dropout=False)))
  rules = partitioning.standard_logical_rules()
  with partitioning.with_sharding(mesh, rules):
    return np.asarray(_JITTED[key][1](params, batch, route))


def test_sharded_forward_equals_unsharded(tiny):
  _, model, params, batch, route = tiny
  single = _logits(model, params, batch, route, _single_mesh())
  sharded = _logits(model, params, batch, route,
                    partitioning.make_mesh({"data": 2, "expert": 4}))
  np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)


def test_pruned_to_a_languages_experts_gives_the_same_outputs(tiny):
  cfg, model, params, batch, _ = tiny
  src, tgt = 2, 3  # e.g. a de -> fr direction
  selection = task_routing.experts_for_route_ids(params, K, encoder_route_id=src,
                                                 decoder_route_id=tgt)
  assert set(selection) == set(pruning.moe_layer_paths(params))
  assert all(len(v) == K for v in selection.values())
  pruned_params = pruning.prune_params(params, selection)
  pruned_cfg = pruning.pruned_config(cfg, selection)
  assert pruned_params["encoder"]["layers"]["layers_1"]["moe"]["router_kernel"].shape == (N + 1, K)
  route = {"encoder_route_ids": np.full(batch[0].shape, src, np.int32),
           "decoder_route_ids": np.full(batch[1].shape, tgt, np.int32)}
  mesh = _single_mesh()
  full = _logits(model, params, batch, route, mesh)
  small = _logits(models.build_model(pruned_cfg), pruned_params, batch, route, mesh)
  np.testing.assert_allclose(small, full, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(small.argmax(-1), full.argmax(-1))
  # Another language's examples need other experts: pruning is per language.
  other = task_routing.experts_for_route_ids(params, K, encoder_route_id=1,
                                             decoder_route_id=1)
  assert any(not np.array_equal(other[k], selection[k]) for k in selection)


def test_greedy_decode_uses_the_decoder_route_ids(tiny):
  """Decoded tokens are the teacher-forced argmax under the same route ids."""
  _, model, params, batch, route = tiny
  enc = batch[0]
  dec_ids = route["decoder_route_ids"][:, 0]
  mesh, rules = _single_mesh(), partitioning.standard_logical_rules()
  with partitioning.with_sharding(mesh, rules):
    out = np.asarray(jax.jit(lambda p: decoding.greedy_decode(
        model, p, max_decode_length=5, encoder_input_tokens=enc,
        encoder_route_ids=route["encoder_route_ids"], decoder_route_ids=dec_ids))(params))
  inputs = np.zeros_like(out)
  inputs[:, 1:] = out[:, :-1]
  forced = {"encoder_route_ids": route["encoder_route_ids"],
            "decoder_route_ids": np.repeat(dec_ids[:, None], 5, 1)}
  logits = _logits(model, params, (enc, inputs, np.maximum(out, 1)), forced, mesh)
  for b in range(out.shape[0]):
    n = int(np.argmax(out[b] == 1)) + 1 if (out[b] == 1).any() else out.shape[1]
    np.testing.assert_array_equal(out[b, :n], logits[b, :n].argmax(-1))


def test_eval_routing_counts_come_from_the_tables(tiny):
  """Per layer: every real token of id r counts once for each top-k expert of
  row r (hand count with NumPy)."""
  from moe_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  from moe_jax.evaluation import routing_stats as rs  # pylint: disable=g-import-not-at-top
  _, _, params, _, route = tiny
  route = {k: v.copy() for k, v in route.items()}
  route["decoder_route_ids"][:, -1] = 0  # padding is not counted
  counts = evaluator.task_routing_counts(params, route, K)
  for layer, c in counts.items():
    table = np.asarray(params[layer.split("/")[0]]["layers"][layer.split("/")[2]]["moe"]
                       ["router_kernel"])
    ids = route["encoder_route_ids" if layer.startswith("encoder") else "decoder_route_ids"]
    want = np.zeros(E)
    for r in ids[ids > 0]:
      want[np.argsort(-table[r])[:K]] += 1
    np.testing.assert_allclose(np.asarray(c[rs.TOPK]), want)
    assert float(c[rs.TOKENS]) == (ids > 0).sum()


# ---------------------------------------------------------------------------
# Data: route ids per task, through packing
# ---------------------------------------------------------------------------

def test_ids_survive_packing_hand_built_batch():
  examples = [{"inputs": [3, 4, 1], "targets": [7, 1]},
              {"inputs": [5, 1], "targets": [8, 9, 1]}]
  ids = [(2, 4), (3, 1)]
  parts = [route_ids.add_route_ids(tf.data.Dataset.from_tensors(
      {k: tf.constant(v, tf.int32) for k, v in ex.items()}), *i)
           for ex, i in zip(examples, ids)]
  ds = parts[0].concatenate(parts[1])
  conv = route_ids.RouteIdsEncDecFeatureConverter(pack=True)
  out = list(conv(ds, {"inputs": 8, "targets": 6}).as_numpy_iterator())
  assert len(out) == 1  # both examples packed into one row
  row = out[0]
  np.testing.assert_array_equal(row["encoder_input_tokens"], [3, 4, 1, 5, 1, 0, 0, 0])
  np.testing.assert_array_equal(row["encoder_route_ids"], [2, 2, 2, 3, 3, 0, 0, 0])
  np.testing.assert_array_equal(row["decoder_target_tokens"], [7, 1, 8, 9, 1, 0])
  np.testing.assert_array_equal(row["decoder_route_ids"], [4, 4, 1, 1, 1, 0])
  np.testing.assert_array_equal(row["decoder_segment_ids"], [1, 1, 2, 2, 2, 0])
  assert conv.get_model_feature_lengths({"inputs": 8, "targets": 6})["decoder_route_ids"] == 6


def test_route_id_table_languages_and_tasks():
  lang = route_ids.LANGUAGE_IDS
  assert route_ids.task_languages("multi30k_translate_en_de", lang) == ("en", "de")
  assert route_ids.task_languages("multi30k_span_corruption_cs", lang) == ("cs", "cs")
  with pytest.raises(ValueError, match="language_ids"):
    route_ids.task_languages("c4_span_corruption", lang)
  mix = pipeline.ensure_registered("synthetic_translate_mix")
  by_lang = route_ids.RouteIdTable(level="language").resolve(mix)
  assert by_lang["synthetic_translate_xb_xc"] == (lang["xb"], lang["xc"])
  by_task = route_ids.RouteIdTable(level="task").resolve(mix)
  assert sorted(v[0] for v in by_task.values()) == [1, 2, 3, 4, 5, 6]
  assert route_ids.RouteIdTable(level="task").num_route_ids(mix) == 6
  assert not route_ids.RouteIdTable().enabled  # off by default


def test_pipeline_mixture_batches_carry_each_examples_language():
  table = route_ids.RouteIdTable(level="language")
  ds = pipeline.build_dataset("synthetic_translate_mix", {"inputs": 32, "targets": 32},
                              per_host_batch_size=4, seed=0, route_table=table)
  batch = next(ds.as_numpy_iterator())
  valid = {v for v in (route_ids.LANGUAGE_IDS[c] for c in ("xa", "xb", "xc"))}
  for side, tokens in (("encoder", "encoder_input_tokens"),
                       ("decoder", "decoder_target_tokens")):
    ids, seg = batch[f"{side}_route_ids"], batch[f"{side}_segment_ids"]
    np.testing.assert_array_equal(ids > 0, batch[tokens] > 0)
    for r in range(ids.shape[0]):
      for s in set(seg[r].tolist()) - {0}:
        assert len(set(ids[r][seg[r] == s].tolist())) == 1  # one id per example
        assert ids[r][seg[r] == s][0] in valid
  # Each example: source id != target id (no xa->xa task); checked per segment.
  for r in range(4):
    for s in set(batch["encoder_segment_ids"][r].tolist()) - {0}:
      e = batch["encoder_route_ids"][r][batch["encoder_segment_ids"][r] == s][0]
      d = batch["decoder_route_ids"][r][batch["decoder_segment_ids"][r] == s][0]
      assert e != d

"""Routing statistics: counts vs a NumPy reference, merging across hosts, files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.evaluation import routing_stats as rs


def _numpy_counts(x, kernel, k, mask):
  logits = np.einsum("bld,de->ble", x, kernel).reshape(-1, kernel.shape[1])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  e = kernel.shape[1]
  top1, topk, gate = np.zeros(e), np.zeros(e), np.zeros(e)
  for p, m in zip(probs, mask.reshape(-1)):
    if not m:
      continue
    order = np.argsort(-p)[:k]
    top1[order[0]] += 1
    topk[order] += 1
    gate[order] += p[order]
  return top1, topk, gate, mask.sum()


@pytest.mark.parametrize("k", [1, 2])
def test_router_choices_match_numpy(k):
  rng = np.random.default_rng(k)
  x = rng.normal(size=(3, 5, 4)).astype(np.float32)
  kernel = rng.normal(size=(4, 6)).astype(np.float32)
  mask = rng.random((3, 5)) > 0.3
  got = jax.device_get(rs.router_choices(jnp.asarray(x), jnp.asarray(kernel), None, k,
                                         jnp.asarray(mask)))
  top1, topk, gate, n = _numpy_counts(x, kernel, k, mask)
  np.testing.assert_allclose(got[rs.TOP1], top1)
  np.testing.assert_allclose(got[rs.TOPK], topk)
  np.testing.assert_allclose(got[rs.GATE], gate, rtol=1e-5)
  assert float(got[rs.TOKENS]) == n


def _counts(top1, topk, gate, n):
  return {"encoder/layers/layers_1/moe": {rs.TOP1: np.asarray(top1, float),
                                          rs.TOPK: np.asarray(topk, float),
                                          rs.GATE: np.asarray(gate, float),
                                          rs.TOKENS: float(n)}}


def test_two_hosts_merge_to_the_whole(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 6, 4)).astype(np.float32)
  kernel = rng.normal(size=(4, 5)).astype(np.float32)
  mask = np.ones((4, 6), bool)
  files = []
  for host, rows in enumerate((slice(0, 2), slice(2, 4))):  # each host: its rows
    c = jax.device_get(rs.router_choices(jnp.asarray(x[rows]), jnp.asarray(kernel),
                                         None, 2, jnp.asarray(mask[rows])))
    stats = rs.RoutingStats()
    stats.add_counts("synthetic_translate_xa_xb", {"encoder/layers/layers_1/moe": c}, k=2)
    files.append(str(tmp_path / f"host{host}.json"))
    stats.save(files[-1])
  merged = rs.RoutingStats.load_and_merge(files)
  top1, topk, gate, n = _numpy_counts(x, kernel, 2, mask)
  layer = merged.pooled("encoder/layers/layers_1/moe")
  np.testing.assert_allclose(layer.top1_count, top1)
  np.testing.assert_allclose(layer.topk_count, topk)
  np.testing.assert_allclose(layer.gate_sum, gate, rtol=1e-5)
  assert layer.num_tokens == n == 24
  g = merged.groups["synthetic_translate_xa_xb"]
  assert (g.source_language, g.target_language) == ("xa", "xb")


def test_language_views_pool_by_source_for_encoder_and_target_for_decoder():
  stats = rs.RoutingStats()
  enc, dec = "encoder/layers/layers_1/moe", "decoder/layers/layers_1/moe"
  for task, top1 in (("t_translate_xa_xb", [1, 0]), ("t_translate_xa_xc", [0, 2]),
                     ("t_translate_xc_xb", [5, 0])):
    layer = _counts(top1, top1, top1, sum(top1))[enc]
    stats.add_counts(task, {enc: layer, dec: layer}, k=1)
  by_src = stats.by_language(enc)
  assert sorted(by_src) == ["xa", "xc"]
  np.testing.assert_allclose(by_src["xa"].top1_count, [1, 2])
  by_tgt = stats.by_language(dec)
  assert sorted(by_tgt) == ["xb", "xc"]
  np.testing.assert_allclose(by_tgt["xb"].top1_count, [6, 0])
  np.testing.assert_allclose(stats.pooled(enc).mean_confidence(), [1.0, 1.0])


def test_merge_refuses_different_expert_counts():
  a, b = rs.RoutingStats(), rs.RoutingStats()
  a.add_counts("t", _counts([1, 0], [1, 0], [0.5, 0], 1), k=1)
  b.add_counts("t", _counts([1, 0, 0], [1, 0, 0], [0.5, 0, 0], 1), k=1)
  with pytest.raises(ValueError, match="same model"):
    a.merge(b)


def test_load_rejects_foreign_json(tmp_path):
  path = tmp_path / "x.json"
  path.write_text('{"groups": {}}')
  with pytest.raises(ValueError, match="routing_stats.json"):
    rs.RoutingStats.load(str(path))


def test_languages_of_task_names():
  assert rs.languages_of("multi30k_translate_en_de") == ("en", "de")
  assert rs.languages_of("c4_span_corruption") == (None, None)

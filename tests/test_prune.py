"""Expert pruning: selection rules, sliced params, exact reproduction at 100%."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from moe_jax import models, partitioning
from moe_jax.checkpoints import restore, tree_paths
from moe_jax.evaluation import inference, pruning
from moe_jax.evaluation import routing_stats as rs
from moe_jax.layers.moe_config import MoeConfig
from moe_jax.models.config import SparseLayout, T5Config
from moe_jax.checkpoints.params_only import save_params_checkpoint

E, K, D, F = 4, 1, 16, 8


def _config():
  return T5Config(vocab_size=32, d_model=D, num_heads=2, d_kv=8, d_ff=16,
                  num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0,
                  moe=MoeConfig(num_experts=E, num_selected_experts=K, d_ff=F,
                                group_size=64, capacity_factor_eval=4.0),
                  encoder_layout=SparseLayout("every"), decoder_layout=SparseLayout("every"))


@pytest.fixture(scope="module")
def tiny():
  config = _config()
  model = models.build_model(config)
  rng = np.random.default_rng(0)
  batch = (rng.integers(2, 32, (8, 6)).astype(np.int32),
           rng.integers(2, 32, (8, 5)).astype(np.int32),
           rng.integers(2, 32, (8, 5)).astype(np.int32))
  mesh = partitioning.make_mesh({"data": 1}, devices=jax.devices()[:1])  # compiles fastest
  rules = partitioning.standard_logical_rules()
  with partitioning.with_sharding(mesh, rules):
    params = jax.jit(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), *batch,
                                                  enable_dropout=False)["params"]))()
  counts = jax.jit(lambda p, *b: rs.routing_counts(model, p, *b))(params, *batch)
  stats = rs.RoutingStats()
  stats.add_counts("toy_translate_xa_xb", counts, k=K)
  return config, model, jax.device_get(params), batch, stats, mesh, rules


def _logits(config, params, batch, mesh, rules):
  model = models.build_model(config)
  with partitioning.with_sharding(mesh, rules):
    return np.asarray(jax.jit(lambda p: model.apply({"params": p}, *batch,
                                                    enable_dropout=False))(params))


def test_select_fixed_keeps_the_top_fraction_in_original_order():
  scores = {"a": np.array([0.1, 0.4, 0.2, 0.3]), "b": np.array([0.7, 0.1, 0.1, 0.1])}
  got = pruning.select_fixed(scores, 0.5, {"a": 1, "b": 1})
  np.testing.assert_array_equal(got["a"], [1, 3])
  np.testing.assert_array_equal(got["b"], [0, 1])  # tie 0.1: lowest id first
  assert all(len(v) == 4 for v in pruning.select_fixed(scores, 1.0, {"a": 1, "b": 1}).values())


def test_select_threshold_is_global_with_a_floor():
  scores = {"a": np.array([0.05, 0.05, 0.45, 0.45]), "b": np.array([0.97, 0.01, 0.01, 0.01])}
  # 4 of 8 experts; by score*E: a2=a3=1.8, b0=3.88, then a0=a1=0.2 > b*=0.04.
  got = pruning.select_threshold(scores, 0.5, {"a": 1, "b": 1})
  np.testing.assert_array_equal(got["a"], [0, 2, 3])
  np.testing.assert_array_equal(got["b"], [0])
  got = pruning.select_threshold(scores, 0.25, {"a": 1, "b": 2})  # floor 2 in b
  assert len(got["b"]) == 2 and len(got["a"]) == 1


def test_scores_by_hand():
  s = rs.LayerStats(np.array([3.0, 1.0]), np.array([4.0, 4.0]), np.array([3.0, 1.0]), 4.0, 2)
  np.testing.assert_allclose(pruning.expert_scores(s, "activity"), [0.75, 0.25])
  np.testing.assert_allclose(pruning.expert_scores(s, "load"), [0.5, 0.5])
  np.testing.assert_allclose(pruning.expert_scores(s, "importance"), [0.75, 0.25])


def test_keep_all_reproduces_the_unpruned_model_exactly(tiny):
  config, _, params, batch, stats, mesh, rules = tiny
  spec = pruning.PruneSpec(keep=1.0, per_layer="threshold")
  sel = pruning.choose_experts(stats, spec)
  pruned = pruning.prune_params(params, sel)
  new_config = pruning.pruned_config(config, sel)
  np.testing.assert_array_equal(_logits(new_config, pruned, batch, mesh, rules),
                                _logits(config, params, batch, mesh, rules))


def test_pruned_params_shrink_as_asked_and_routing_stays_in_kept_experts(tiny, tmp_path):
  config, _, params, batch, stats, mesh, rules = tiny
  spec = pruning.PruneSpec(keep=0.5, granularity="language", pair=("xa", "xb"),
                           score="activity")
  sel = pruning.choose_experts(stats, spec)
  assert set(sel) == {"encoder/layers/layers_1/moe", "decoder/layers/layers_1/moe"}
  pruned = pruning.prune_params(params, sel)
  before = sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
  after = sum(np.size(x) for x in jax.tree_util.tree_leaves(pruned))
  per_expert = 3 * D * F + D  # wi_0, wi_1, wo and one router column
  assert before - after == 2 * (E // 2) * per_expert
  assert all(len(keep) == E // 2 for keep in sel.values())
  new_config = pruning.pruned_config(config, sel)
  assert new_config.encoder_layout.num_experts == (2,)
  # The pruned model loads from its checkpoint with the pruned config ...
  path = save_params_checkpoint(str(tmp_path / "ckpt"), pruned)
  model = models.build_model(new_config)
  abstract, shardings = inference.abstract_params(model, partitioning.Partitioner(mesh, rules))
  loaded = restore.restore_params(path, abstract, shardings)
  for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(pruned)):
    np.testing.assert_array_equal(np.asarray(a), b)
  # ... and its routers only see the kept experts: its router logits are the
  # original ones restricted to the kept columns, so every token's choice is
  # the original argmax over kept experts (a removed expert is never chosen).
  counts = jax.device_get(jax.jit(lambda p, *b: rs.routing_counts(model, p, *b))(
      loaded, *batch))
  for layer, keep in sel.items():
    assert counts[layer][rs.TOP1].shape == (len(keep),)
    assert counts[layer][rs.TOP1].sum() == counts[layer][rs.TOKENS]
    flat_orig = tree_paths.flatten_with_paths(params)
    np.testing.assert_array_equal(
        np.asarray(_get(loaded, layer)["router_kernel"]),
        flat_orig[layer + "/router_kernel"][:, keep])
    np.testing.assert_array_equal(np.asarray(_get(loaded, layer)["experts"]["wo"]),
                                  flat_orig[layer + "/experts/wo"][keep])
  assert "encoder/SparseLayout.num_experts = (2,)" in pruning.gin_bindings(new_config, path)


def _get(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def test_language_granularity_needs_stats_for_the_pair(tiny):
  stats = tiny[4]
  with pytest.raises(ValueError, match="--pair"):
    pruning.choose_experts(stats, pruning.PruneSpec(keep=0.5, granularity="pair",
                                                    pair=("xc", "xa")))


def test_bad_keep_is_refused():
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    pruning.PruneSpec(keep=0.0)


def test_moe_prune_binary_writes_a_loadable_checkpoint_per_pair(tmp_path, capsys):
  from moe_jax import prune as prune_bin
  from moe_jax.evaluation import gin_setup
  gin_setup.parse(["models/tiny_switch.gin"], [])
  config = gin_setup.model_config()
  model = models.build_model(config)
  ones = np.ones((1, 4), np.int32)
  mesh = partitioning.make_mesh({"data": 1}, devices=jax.devices()[:1])
  rules = partitioning.standard_logical_rules()
  with partitioning.with_sharding(mesh, rules):
    params = jax.jit(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), ones, ones, ones,
                                                 enable_dropout=False)["params"]))()
  ckpt = save_params_checkpoint(str(tmp_path / "ckpt"), jax.device_get(params))
  # Hand-made stats: language xa uses experts 0-3 most, xb experts 4-7 (as
  # the source in encoder layers, as the target in decoder layers).
  def layer(hot):
    top1 = np.zeros(8)
    top1[hot] = [4.0, 3.0, 2.0, 1.0]
    return {rs.TOP1: top1, rs.TOPK: top1, rs.GATE: top1 / 2, rs.TOKENS: 10.0}

  xa, xb = slice(0, 4), slice(4, 8)
  stats = rs.RoutingStats()
  for task, src, tgt in (("synthetic_translate_xa_xb", xa, xb),
                         ("synthetic_translate_xb_xa", xb, xa)):
    stats.add_counts(task, {"encoder/layers/layers_1/moe": layer(src),
                            "decoder/layers/layers_1/moe": layer(tgt)}, k=1)
  stats.save(str(tmp_path / "stats.json"))
  out = tmp_path / "pruned"
  rc = prune_bin.main(["--gin_file=models/tiny_switch.gin", f"--checkpoint={ckpt}",
                       f"--stats={tmp_path / 'stats.json'}", "--keep=0.25",
                       "--granularity=language", "--all_pairs", "--score=activity",
                       f"--output={out}"])
  assert rc == 0
  with open(out / "xa_xb" / "pruning.json") as f:
    summary = json.load(f)
  # Encoder by source xa (experts 0, 1), decoder by target xb (its stats: 4, 5).
  assert summary["kept"] == {"encoder/layers/layers_1/moe": [0, 1],
                             "decoder/layers/layers_1/moe": [4, 5]}
  # Without a model gin the model comes from the run's config.gin beside the
  # checkpoint (here: gin's operative config of tiny_switch, as moe-train writes).
  import gin  # pylint: disable=g-import-not-at-top
  from moe_jax import gin_utils  # pylint: disable=g-import-not-at-top
  gin_utils.parse_gin(["models/tiny_switch.gin"], [])
  (tmp_path / "config.gin").write_text(gin.config_str())
  gin.clear_config()
  rc = prune_bin.main([f"--checkpoint={ckpt}", f"--stats={tmp_path / 'stats.json'}",
                       "--keep=0.25", "--granularity=language", "--all_pairs",
                       "--score=activity", f"--output={tmp_path / 'pruned_from_run'}"])
  assert rc == 0
  assert f"model and data settings from {tmp_path / 'config.gin'}" in capsys.readouterr().out
  with open(tmp_path / "pruned_from_run" / "xa_xb" / "pruning.json") as f:
    assert json.load(f)["kept"] == summary["kept"]
  d, f_ = config.d_model, config.moe.d_ff
  assert summary["params_before"] - summary["params_after"] == 2 * 6 * (3 * d * f_ + d)
  gin_setup.parse(["models/tiny_switch.gin", str(out / "xb_xa" / "pruned.gin")], [])
  pruned_model = models.build_model(gin_setup.model_config())
  abstract, shardings = inference.abstract_params(pruned_model, partitioning.Partitioner(mesh, rules))
  loaded = restore.restore_params(gin_setup.required("CHECKPOINT_PATH"), abstract, shardings)
  np.testing.assert_array_equal(
      np.asarray(_get(loaded, "encoder/layers/layers_1/moe")["router_kernel"]),
      np.asarray(_get(params, "encoder/layers/layers_1/moe")["router_kernel"])[:, [4, 5]])

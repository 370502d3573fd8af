"""moe-upcycle on this project's Orbax format: values, verify, optimizer state, errors.

A tiny dense T5 v1.1 is trained a few Adafactor steps here and saved with
the CheckpointManager; the tests then run the command and check the written
checkpoint against the dense arrays with NumPy, and the upcycled model's
logits against the dense model's (computed here, not by ``--verify``).
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import models, partitioning, upcycle
from moe_jax.checkpoints import formats, manager, tree_paths, upcycling
from moe_jax.models import config as model_config_lib
from moe_jax.models.config import SparseLayout, T5Config
from moe_jax.layers.moe_config import MoeConfig
from moe_jax.training import optimizers, train_state, train_step

DENSE = T5Config(vocab_size=64, d_model=16, num_heads=2, d_kv=8, d_ff=32,
                 num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0,
                 relative_attention_num_buckets=8)
DENSE_STEPS = 3
# Adafactor factoring threshold lowered so the tiny [16, 32] kernels are factored.
FACTOR_MIN = 8
TINY_GIN = ["NUM_EXPERTS = 4", "MoeConfig.group_size = 64",
            "MoeConfig.capacity_factor_eval = 4.0",
            f"make_optimizer.min_dim_size_to_factor = {FACTOR_MIN}"]


def _tx():
  return optimizers.make_optimizer("adafactor", optimizers.make_schedule("rsqrt"),
                                   min_dim_size_to_factor=FACTOR_MIN)


def _batch(seed, b=8, length=6):
  rng = np.random.default_rng(seed)
  tgt = rng.integers(1, DENSE.vocab_size, (b, length)).astype(np.int32)
  return {"encoder_input_tokens": rng.integers(1, DENSE.vocab_size, (b, length)).astype(np.int32),
          "decoder_input_tokens": np.concatenate([np.zeros((b, 1), np.int32), tgt[:, :-1]], 1),
          "decoder_target_tokens": tgt,
          "decoder_loss_weights": np.ones((b, length), np.int32)}


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
  """A dense model trained DENSE_STEPS steps, saved as a moe_jax checkpoint."""
  partitioner = partitioning.Partitioner.create({"data": 8})
  model = models.build_model(DENSE)
  tx = _tx()
  shapes = {k: jax.ShapeDtypeStruct(v.shape, jnp.int32) for k, v in _batch(0).items()}
  state, layout = train_state.init_train_state(model, tx, partitioner, shapes)
  step = train_step.jitted_train_step(layout, train_step.LossConfig())
  with partitioner.activate():
    for i in range(DENSE_STEPS):
      state, _ = step(state, partitioner.global_batch(_batch(i)))
  path = str(tmp_path_factory.mktemp("dense"))
  with manager.CheckpointManager(path, async_save=False) as mgr:
    mgr.save(DENSE_STEPS, state, {}, force=True)
  host = jax.tree_util.tree_map(np.asarray, jax.device_get(state))
  return path, host


def _restore_upcycled(out_dir, sparse_config, tx=None):
  partitioner = partitioning.Partitioner.create({"data": 2, "expert": 4})
  shapes = {k: jax.ShapeDtypeStruct((8, 6), jnp.int32) for k in _batch(0)}
  layout = train_state.StateLayout.create(models.build_model(sparse_config),
                                          tx or _tx(), partitioner, shapes)
  mgr = manager.CheckpointManager(out_dir, async_save=False)
  try:
    state, _ = mgr.restore(mgr.latest_step(), layout.abstract, layout.shardings)
  finally:
    mgr.close()
  return jax.tree_util.tree_map(np.asarray, jax.device_get(state)), mgr.latest_step()


def _sparse_config(num_experts=4, k=2, renormalize=True):
  moe = MoeConfig(num_experts=num_experts, num_selected_experts=k, d_ff=DENSE.d_ff,
                  group_size=64, renormalize_top_k=renormalize,
                  capacity_factor_train=2.0, capacity_factor_eval=4.0)
  layout = SparseLayout(kind="every", every=2)
  return dataclasses.replace(DENSE, moe=moe, encoder_layout=layout, decoder_layout=layout)


def test_upcycle_verify_and_values(dense_run, tmp_path, capsys):
  path, dense = dense_run
  out = str(tmp_path / "moe")
  code = upcycle.main(["--dense_checkpoint", path, "--gin_file", "runs/sparse_upcycle.gin",
                       "--output", out, "--router_init", "zeros", "--verify",
                       "--mesh", "data=2,expert=4"] + [f"--gin.{b.replace(' ', '')}"
                                                       for b in TINY_GIN])
  printed = capsys.readouterr()
  assert code == 0, printed.err
  assert "verify PASS" in printed.out
  info = json.load(open(os.path.join(out, "upcycle.json")))
  assert info["format"] == "moe_jax" and info["step"] == DENSE_STEPS
  assert info["sparse_layers"] == {"encoder": [1], "decoder": [1]}
  assert info["verify"]["passed"] and info["verify"]["exact_expected"]
  assert not [p for p in os.listdir(tmp_path) if "upcycle-tmp" in p]

  cfg = _sparse_config()
  state, step = _restore_upcycled(out, cfg)
  assert step == DENSE_STEPS and int(state.step) == DENSE_STEPS
  d = tree_paths.flatten_with_paths(dense.params)
  s = tree_paths.flatten_with_paths(state.params)
  for stack in ("encoder", "decoder"):
    moe = f"{stack}/layers/layers_1/moe"
    for w in ("wi_0", "wi_1", "wo"):
      dense_w = d[f"{stack}/layers/layers_1/mlp/{w}/kernel"]
      assert s[f"{moe}/experts/{w}"].shape == (4,) + dense_w.shape
      for e in range(4):
        np.testing.assert_array_equal(s[f"{moe}/experts/{w}"][e], dense_w)
    np.testing.assert_array_equal(s[f"{moe}/router_kernel"], 0.0)
    assert f"{stack}/layers/layers_1/mlp/wi_0/kernel" not in s
  copied = [n for n in s if "/moe/" not in n]
  assert len(copied) == len(d) - 2 * 3
  for n in copied:
    np.testing.assert_array_equal(s[n], d[n])

  # reset: fresh Adafactor statistics, schedule counter continues at the dense step.
  opt = tree_paths.flatten_with_paths(state.opt_state)
  assert all(np.all(v == 0) for n, v in opt.items() if "/v_row/" in n or "/v_col/" in n)
  counts = {n: int(v) for n, v in opt.items() if n.endswith("count")}
  assert sorted(counts.values()) == [0, DENSE_STEPS], counts


def test_moe_jax_input_takes_shapeless_settings_from_its_run(dense_run, tmp_path, capsys):
  """Fields shapes cannot tell come from the dense run's model_config.json;
  a T5Config binding given explicitly still wins."""
  import shutil  # pylint: disable=g-import-not-at-top
  path, _ = dense_run
  run = str(tmp_path / "dense_run")
  shutil.copytree(path, run)
  written = dataclasses.replace(DENSE, layer_norm_epsilon=1e-5,
                                relative_attention_max_distance=40)
  model_config_lib.save_json(written, os.path.join(run, "model_config.json"))
  common = ["--dense_checkpoint", os.path.join(run, str(DENSE_STEPS)),
            "--gin_file", "runs/sparse_upcycle.gin", "--mesh", "data=2,expert=4"] + [
                f"--gin.{b.replace(' ', '')}" for b in TINY_GIN]
  assert upcycle.main(common + ["--output", str(tmp_path / "a")]) == 0
  assert f"from {os.path.join(run, 'model_config.json')}" in capsys.readouterr().out
  got = model_config_lib.load_json(str(tmp_path / "a" / "model_config.json"))
  assert (got.layer_norm_epsilon, got.relative_attention_max_distance) == (1e-5, 40)
  assert upcycle.main(common + ["--output", str(tmp_path / "b"),
                                "--gin.T5Config.layer_norm_epsilon=1e-4"]) == 0
  got = model_config_lib.load_json(str(tmp_path / "b" / "model_config.json"))
  assert (got.layer_norm_epsilon, got.relative_attention_max_distance) == (1e-4, 40)


def test_carry_broadcasts_factored_slots_to_experts(dense_run, tmp_path, capsys):
  path, dense = dense_run
  out = str(tmp_path / "moe_carry")
  code = upcycle.main(["--dense_checkpoint", path, "--format", "moe_jax",
                       "--gin_file", "runs/sparse_upcycle.gin", "--output", out,
                       "--optimizer_state", "carry",
                       "--gin.MoeConfig.num_selected_experts=1",
                       "--gin.MoeConfig.renormalize_top_k=False"]
                      + [f"--gin.{b.replace(' ', '')}" for b in TINY_GIN])
  assert code == 0, capsys.readouterr().err
  state, _ = _restore_upcycled(out, _sparse_config(k=1, renormalize=False))
  d_opt = tree_paths.flatten_with_paths(dense.opt_state)
  s_opt = tree_paths.flatten_with_paths(state.opt_state)
  checked = 0
  for n, v in s_opt.items():
    if "/moe/experts/" in n:
      src = n.replace("/moe/experts/", "/mlp/") + "/kernel"
      ref = d_opt[src]
      for e in range(4):
        np.testing.assert_array_equal(v[e] if v.shape != ref.shape else v, ref)
      checked += "/v_row/" in n or "/v_col/" in n
    elif "/moe/" not in n:
      np.testing.assert_array_equal(v, d_opt[n])
  assert checked == 2 * 3 * 2  # 2 stacks x 3 kernels x (v_row, v_col)
  assert any(np.any(v != 0) for n, v in s_opt.items() if "/moe/experts/" in n)
  assert int(state.step) == DENSE_STEPS


def test_contradicting_model_gin_is_an_error_naming_both(dense_run, tmp_path, capsys):
  path, _ = dense_run
  out = str(tmp_path / "bad")
  code = upcycle.main(["--dense_checkpoint", path, "--gin_file", "models/tiny_switch.gin",
                       "--output", out])
  err = capsys.readouterr().err
  assert code == 2
  assert "T5Config.vocab_size = 512" in err and "64" in err
  assert not os.path.exists(out)


def test_failed_write_leaves_no_output(tmp_path, monkeypatch):
  out = str(tmp_path / "atomic")

  def boom(*a, **k):
    raise RuntimeError("disk full")

  monkeypatch.setattr(manager.CheckpointManager, "save", boom)
  state = {"step": jnp.zeros((), jnp.int32), "w": jnp.ones((4, 2))}
  with pytest.raises(RuntimeError, match="disk full"):
    upcycle.write_atomically(out, state, 0, DENSE, {})
  assert os.listdir(tmp_path) == []
  monkeypatch.undo()
  upcycle.write_atomically(out, state, 5, DENSE, {"a": 1})
  assert sorted(os.listdir(out)) == ["5", "model_config.json", "upcycle.json",
                                     "upcycled_model.gin"]
  assert model_config_lib.load_json(os.path.join(out, "model_config.json")) == DENSE
  assert os.listdir(tmp_path) == ["atomic"]


def test_exactness_rules_and_verdicts():
  assert upcycling.exact_expected(_sparse_config(k=2))[0]
  assert not upcycling.exact_expected(_sparse_config(k=1, renormalize=False))[0]
  assert not upcycling.exact_expected(_sparse_config(k=2, renormalize=False))[0]
  assert upcycling.exact_expected(_sparse_config(k=4, renormalize=False))[0]
  ec = _sparse_config()
  ec = dataclasses.replace(ec, encoder_moe=dataclasses.replace(ec.moe,
                                                              router_type="experts_choose"))
  assert upcycling.exact_expected(ec)[0]  # experts-choose encoder, top-2 decoder
  ec_k1 = dataclasses.replace(ec, moe=dataclasses.replace(ec.moe, num_selected_experts=1,
                                                          renormalize_top_k=False))
  assert not upcycling.exact_expected(ec_k1)[0]  # every stack must be exact
  ok = upcycling.VerifyResult(1e-6, 0.5, 3.0, True, "r", 3e-4)
  assert ok.passed and "verify PASS" in ok.summary()
  bad = dataclasses.replace(ok, max_abs_diff=1e-2)
  assert not bad.passed and "verify FAIL" in bad.summary()
  informational = dataclasses.replace(bad, exact_expected=False)
  assert informational.passed and "a difference is expected" in informational.summary()
  assert not dataclasses.replace(informational, max_abs_diff=float("nan")).passed


def test_expert_copies_are_created_sharded_with_noise(dense_run):
  _, dense = dense_run
  partitioner = partitioning.Partitioner.create({"data": 2, "expert": 4})
  cfg = _sparse_config(num_experts=8)
  params = upcycling.upcycle_params(dense.params, DENSE, cfg, partitioner,
                                    router_init="normal", expert_noise=0.1, seed=3)
  wi = params["encoder"]["layers"]["layers_1"]["moe"]["experts"]["wi_0"]
  assert "expert" in str(wi.sharding.spec[0])
  assert {s.data.shape[0] for s in wi.addressable_shards} == {2}  # 8 experts / 4
  host = np.asarray(wi)
  ref = dense.params["encoder"]["layers"]["layers_1"]["mlp"]["wi_0"]["kernel"]
  ratio = host / ref[None]
  assert abs(np.std(ratio - 1.0) - 0.1) < 0.02  # multiplicative N(0, 0.1^2)
  assert not np.allclose(host[0], host[1])  # experts differ
  router = np.asarray(params["encoder"]["layers"]["layers_1"]["moe"]["router_kernel"])
  assert abs(router.std() - 0.02) < 0.006


def test_format_detection(dense_run, tmp_path):
  path, _ = dense_run
  assert formats.detect_format(path) == "moe_jax"
  assert formats.detect_format(os.path.join(path, str(DENSE_STEPS))) == "moe_jax"
  (tmp_path / "checkpoint").write_bytes(b"")
  assert formats.detect_format(str(tmp_path)) == "t5x"
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(formats.DenseFormatError, match="--format=hf"):
    formats.detect_format(str(empty))

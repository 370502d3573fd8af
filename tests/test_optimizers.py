"""Optimizers and schedules against hand formulas, NumPy and optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import partitioning
from moe_jax.training import optimizers


# ---------------------------------------------------------------- schedules
def test_rsqrt_schedule_is_t5s():
  f = optimizers.make_schedule("rsqrt", base_learning_rate=1.0, warmup_steps=100)
  for step in (0, 1, 50, 100, 400, 10_000):
    assert float(f(step)) == pytest.approx(1.0 / np.sqrt(max(step, 100)), rel=1e-6)


def test_rsqrt_linear_warmup():
  f = optimizers.make_schedule("rsqrt", 1.0, warmup_steps=100, linear_warmup=True)
  assert float(f(49)) == pytest.approx(0.5 * 0.1, rel=1e-6)
  assert float(f(400)) == pytest.approx(0.05, rel=1e-6)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_decay_schedules_with_warmup(name):
  f = optimizers.make_schedule(name, 2.0, warmup_steps=10, decay_steps=100,
                               end_learning_rate=0.2)
  assert float(f(0)) == pytest.approx(0.0)
  assert float(f(5)) == pytest.approx(1.0)
  assert float(f(10)) == pytest.approx(2.0)
  assert float(f(110)) == pytest.approx(0.2, rel=1e-5)
  t = 30 / 100
  want = (2.0 - 1.8 * t if name == "linear"
          else 0.2 + 0.5 * (2.0 - 0.2) * (1 + np.cos(np.pi * t)))
  assert float(f(40)) == pytest.approx(want, rel=1e-5)


def test_wsd_schedule_holds_the_peak_then_cools_down_linearly():
  # warmup 10, then 100 decay steps: flat at 2.0 for 80, linear to 0.2 over 20.
  f = optimizers.make_schedule("wsd", 2.0, warmup_steps=10, decay_steps=100,
                               end_learning_rate=0.2, cooldown_fraction=0.2)
  assert float(f(5)) == pytest.approx(1.0)
  for step in (10, 50, 90):
    assert float(f(step)) == pytest.approx(2.0)
  assert float(f(95)) == pytest.approx(2.0 - 1.8 * 5 / 20, rel=1e-6)
  assert float(f(110)) == pytest.approx(0.2, rel=1e-6)
  assert float(f(500)) == pytest.approx(0.2, rel=1e-6)


@pytest.mark.parametrize("name", ["linear", "cosine", "wsd"])
def test_total_steps_ends_the_decay_at_that_step(name):
  # Without total_steps a 3,000-step run with decay_steps=3000 ends at 3,200.
  f = optimizers.make_schedule(name, 1e-2, warmup_steps=200, decay_steps=12345,
                               end_learning_rate=3e-5, total_steps=3000)
  assert float(f(3000)) == pytest.approx(3e-5, rel=1e-4)
  assert float(f(2999)) > 3e-5



@pytest.mark.parametrize("name", ["linear", "cosine", "wsd"])
def test_a_run_shorter_than_the_warmup_warms_up_for_a_tenth_of_it(name, monkeypatch):
  warnings = []
  monkeypatch.setattr(optimizers.logger, "warning",
                      lambda msg, *args: warnings.append(msg % args))
  # A 50-step smoke run of a recipe with 200 warm-up steps: 5 warm-up steps
  # (0, 0.2, 0.4, 0.6, 0.8 of the peak), the peak at step 5, the end at 50.
  f = optimizers.make_schedule(name, 1e-2, warmup_steps=200, end_learning_rate=3e-5,
                               total_steps=50)
  assert [float(f(s)) for s in range(6)] == pytest.approx([0, 2e-3, 4e-3, 6e-3, 8e-3, 1e-2])
  assert float(f(50)) == pytest.approx(3e-5, rel=1e-4)
  assert len(warnings) == 1 and "warming up for 5 steps" in warnings[0]
  one = optimizers.make_schedule(name, 1e-2, warmup_steps=200, end_learning_rate=3e-5,
                                 total_steps=1)  # a one-step test run: no warm-up
  assert float(one(0)) == pytest.approx(1e-2) and float(one(1)) == pytest.approx(3e-5)
  with pytest.raises(ValueError, match="at least 1"):
    optimizers.make_schedule(name, 1e-2, warmup_steps=200, total_steps=0)


def test_constant_schedule_and_bad_name():
  assert float(optimizers.make_schedule("constant", 0.3, warmup_steps=0)(77)) == pytest.approx(0.3)
  with pytest.raises(ValueError, match="use one of"):
    optimizers.make_schedule("exponential")


# ---------------------------------------------------------------- adafactor
def test_factored_dims_never_factor_leading_dims():
  assert optimizers.factored_dims((64, 256, 512)) == (1, 2)   # expert weight
  assert optimizers.factored_dims((512, 256)) == (0, 1)
  assert optimizers.factored_dims((512, 64)) is None
  assert optimizers.factored_dims((512,)) is None


def _numpy_adafactor(params, grads_seq, lr, min_dim=128, decay_rate=0.8,
                     eps1=1e-30, eps2=1e-3, clip=1.0):
  """Independent NumPy Adafactor (T5, no momentum), last-two-dims factoring."""
  p = {k: np.array(v, np.float64) for k, v in params.items()}
  state = {}
  for t, grads in enumerate(grads_seq, start=1):
    decay = 1.0 - t ** (-decay_rate)
    for k, g in grads.items():
      g = np.asarray(g, np.float64)
      g2 = g * g + eps1
      factored = g.ndim >= 2 and g.shape[-1] >= min_dim and g.shape[-2] >= min_dim
      if factored:
        r, c = state.get(k, (np.zeros(g.shape[:-1]), np.zeros(g.shape[:-2] + g.shape[-1:])))
        r = decay * r + (1 - decay) * g2.mean(-1)
        c = decay * c + (1 - decay) * g2.mean(-2)
        state[k] = (r, c)
        vhat = r[..., :, None] * c[..., None, :] / r.mean(-1)[..., None, None]
      else:
        v = state.get(k, np.zeros(g.shape))
        v = decay * v + (1 - decay) * g2
        state[k] = v
        vhat = v
      u = g / np.sqrt(vhat)
      u = u / max(1.0, np.sqrt(np.mean(u * u)) / clip)
      scale = max(eps2, np.sqrt(np.mean(p[k] ** 2)))
      p[k] = p[k] - lr * scale * u
  return p


def _tree(rng, shapes):
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def test_adafactor_matches_numpy_reference_with_expert_weights():
  rng = np.random.default_rng(0)
  shapes = {"experts_wi": (4, 128, 160), "dense": (130, 128),
            "small": (8, 16), "bias": (33,)}
  params = _tree(rng, shapes)
  grads_seq = [_tree(rng, shapes) for _ in range(3)]
  tx = optimizers.adafactor(learning_rate=0.01)
  p = jax.tree_util.tree_map(jnp.asarray, params)
  state = tx.init(p)
  for g in grads_seq:
    upd, state = tx.update(jax.tree_util.tree_map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, upd)
  want = _numpy_adafactor(params, grads_seq, lr=0.01)
  for k in shapes:
    np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=2e-5, atol=1e-6)
  rms_state = state[0]
  assert rms_state.v_row["experts_wi"].shape == (4, 128)   # one row stat per expert
  assert rms_state.v_col["experts_wi"].shape == (4, 160)
  assert rms_state.v["bias"].shape == (33,)


def test_adafactor_matches_optax_on_matrices():
  # For 2-D weights "last two dims" == "two largest dims": optax agrees.
  rng = np.random.default_rng(1)
  shapes = {"w": (256, 128), "b": (40,), "s": (16, 8)}
  params = jax.tree_util.tree_map(jnp.asarray, _tree(rng, shapes))
  ours, ref = optimizers.adafactor(0.05), optax.adafactor(0.05)
  so, sr = ours.init(params), ref.init(params)
  po = pr = params
  for _ in range(3):
    g = jax.tree_util.tree_map(jnp.asarray, _tree(rng, shapes))
    uo, so = ours.update(g, so, po)
    ur, sr = ref.update(g, sr, pr)
    po, pr = optax.apply_updates(po, uo), optax.apply_updates(pr, ur)
  for k in shapes:
    np.testing.assert_allclose(np.asarray(po[k]), np.asarray(pr[k]), rtol=1e-5, atol=1e-7)


def test_global_norm_clipping_scales_gradients():
  # Adafactor's first step is invariant to gradient scale except through
  # eps1; AdamW's update depends on the norm only via eps, so check the
  # clipping stage directly on the chain's output for plain SGD-like use.
  tx = optimizers.make_optimizer("adamw", optimizers.make_schedule("constant", 1.0, 0),
                                 max_grad_norm=1.0, weight_decay=0.0, eps=1e3)
  p = {"w": jnp.zeros((4,))}
  g = {"w": jnp.array([30.0, 40.0, 0.0, 0.0])}   # norm 50 -> clipped to norm 1
  upd, _ = tx.update(g, tx.init(p), p)
  # With a huge eps Adam's first step is ~ -lr * g_clipped / eps.
  np.testing.assert_allclose(np.asarray(upd["w"]), -np.array([0.6, 0.8, 0, 0]) / 1e3,
                             rtol=1e-3)


def test_make_optimizer_rejects_unknown_and_misplaced_options():
  with pytest.raises(ValueError, match="use one of"):
    optimizers.make_optimizer("lamb")
  with pytest.raises(ValueError, match="adafactor only"):
    optimizers.make_optimizer("adamw", decay_rate=0.8)


def test_opt_state_shardings_follow_params():
  mesh = partitioning.make_mesh({"data": 2, "expert": 4})
  params = {"moe": {"wi": jax.ShapeDtypeStruct((4, 128, 256), jnp.float32)},
            "dense": {"kernel": jax.ShapeDtypeStruct((128, 256), jnp.float32)},
            "bias": jax.ShapeDtypeStruct((8,), jnp.float32)}
  param_sh = {"moe": {"wi": NamedSharding(mesh, P("expert", None, "model"))},
              "dense": {"kernel": NamedSharding(mesh, P("fsdp", "model"))},
              "bias": NamedSharding(mesh, P())}
  tx = optimizers.make_optimizer("adafactor", max_grad_norm=1.0)
  abstract = jax.eval_shape(tx.init, params)
  sh = optimizers.opt_state_shardings(abstract, params, param_sh, mesh)
  rms = sh[1][0]
  assert rms.v_row["moe"]["wi"].spec == P("expert", None)
  assert rms.v_col["moe"]["wi"].spec == P("expert", "model")
  assert rms.v_row["dense"]["kernel"].spec == P("fsdp")
  assert rms.v["bias"].is_fully_replicated
  adam = optimizers.make_optimizer("adamw")
  sh = optimizers.opt_state_shardings(jax.eval_shape(adam.init, params), params, param_sh, mesh)
  assert sh[0].mu["moe"]["wi"].spec == P("expert", None, "model")
  assert sh[0].count.is_fully_replicated

"""Mixture-of-Students distillation: the KL term vs NumPy, the student step's
loss vs the formula, the staged stop (teacher no longer run), config errors."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import partitioning
from moe_jax.layers.moe_config import MoeConfig
from moe_jax.models import SparseLayout, T5Config, build_model
from moe_jax.models import config as model_config_lib
from moe_jax.training import distillation, experiment, loop, optimizers
from moe_jax.training import train_state, train_step

VOCAB, LENGTH, BATCH = 32, 8, 8


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_kl(teacher, student, t):
  lp, lq = _np_log_softmax(teacher / t), _np_log_softmax(student / t)
  return (np.exp(lp) * (lp - lq)).sum(-1)


def test_kl_term_matches_numpy_on_hand_logits():
  teacher = np.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]], np.float32)
  student = np.array([[[0.0, 1.0, 0.0], [3.0, -2.0, 0.0]]], np.float32)
  weights = np.array([[1.0, 0.0]], np.float32)
  for t in (1.0, 2.0):
    kl = np.asarray(distillation.kl_divergence(teacher, student, t))
    # Hand formula, token 0: sum_i p_i (log p_i - log q_i).
    p = np.exp(teacher[0, 0] / t) / np.exp(teacher[0, 0] / t).sum()
    q = np.exp(student[0, 0] / t) / np.exp(student[0, 0] / t).sum()
    assert kl[0, 0] == pytest.approx(float((p * np.log(p / q)).sum()), rel=1e-5)
    np.testing.assert_allclose(kl, _np_kl(teacher, student, t), rtol=1e-5)
    total = float(distillation.distillation_loss_sum(teacher, student, weights, t))
    assert total == pytest.approx(t * t * kl[0, 0], rel=1e-5)   # padding token ignored
  same = np.asarray(distillation.kl_divergence(teacher, teacher, 3.0))
  np.testing.assert_allclose(same, 0.0, atol=1e-6)
  assert float(distillation.mix(2.0, 6.0, 0.25)) == pytest.approx(0.75 * 2 + 0.25 * 6)


def test_config_errors_say_what_to_fix(tmp_path):
  with pytest.raises(ValueError, match="teacher_checkpoint is not set"):
    distillation.DistillationConfig()
  with pytest.raises(ValueError, match="weight"):
    distillation.DistillationConfig(teacher_checkpoint="/x", weight=1.5)
  with pytest.raises(ValueError, match="temperature"):
    distillation.DistillationConfig(teacher_checkpoint="/x", temperature=0.0)
  bad = str(tmp_path / "no_such_teacher")
  cfg = distillation.DistillationConfig(teacher_checkpoint=bad)
  with pytest.raises(FileNotFoundError, match="no_such_teacher"):
    distillation.resolve(cfg, _config(1))
  # Through the gin entry point: a ConfigError naming the path, before any data.
  with pytest.raises(experiment.ConfigError, match="no_such_teacher"):
    experiment.build_experiment(_config(1), "unused_task", {"inputs": 8, "targets": 8},
                                batch_size=8, train_steps=1, distillation=cfg)


def _config(num_layers: int) -> T5Config:
  # Group = one example, capacity = group: nothing dropped in train or eval.
  moe = MoeConfig(num_experts=4, num_selected_experts=1, d_ff=32, group_size=LENGTH,
                  capacity_factor_train=4.0, capacity_factor_eval=4.0,
                  min_expert_capacity=LENGTH)
  layout = SparseLayout(kind="every", every=2) if num_layers > 1 else SparseLayout(kind="all")
  return T5Config(vocab_size=VOCAB, d_model=16, num_heads=2, d_kv=8, d_ff=32,
                  num_encoder_layers=num_layers, num_decoder_layers=num_layers,
                  dropout_rate=0.0, moe=moe, encoder_layout=layout,
                  decoder_layout=layout)


def _batch(seed):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, VOCAB, (BATCH, LENGTH)).astype(np.int32)
  weights = (rng.random((BATCH, LENGTH)) > 0.25).astype(np.float32)
  return {"encoder_input_tokens": tokens[:, ::-1].copy(),
          "decoder_input_tokens": np.concatenate(
              [np.zeros((BATCH, 1), np.int32), tokens[:, :-1]], 1),
          "decoder_target_tokens": tokens, "decoder_loss_weights": weights}


def _logits_fn(model):
  """Jitted one-device teacher-forced logits (the reference forward)."""
  def f(params, batch):
    args, kwargs = train_state.model_inputs(batch)
    return model.apply({"params": params}, *args, **kwargs, enable_dropout=False)
  jitted = jax.jit(f)
  return lambda params, batch: np.asarray(jitted(params, batch))


def _partitioner(n):
  return partitioning.Partitioner.create({"data": n}, devices=jax.devices()[:n])


SHAPES = train_state.dummy_batch(BATCH, {"inputs": LENGTH, "targets": LENGTH})
NO_AUX = train_step.LossConfig(z_loss=0.0, aux_loss_factor=0.0, router_z_loss_factor=0.0)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A 2+2-layer MoE teacher's train state saved by the CheckpointManager."""
  from moe_jax.checkpoints.manager import CheckpointManager
  path = str(tmp_path_factory.mktemp("teacher"))
  model = build_model(_config(2))
  state, _ = train_state.init_train_state(model, optimizers.make_optimizer("adamw"),
                                          _partitioner(1), SHAPES, seed=7)
  with CheckpointManager(path, save_interval_steps=1, async_save=False) as mgr:
    mgr.save(5, state, {}, force=True)
    mgr.wait_until_finished()
  return path, jax.device_get(state.params)


class _Writer:
  def __init__(self):
    self.rows = {}

  def write_scalars(self, step, scalars):
    self.rows[step] = dict(scalars)

  def flush(self):
    pass


def test_student_loss_matches_formula_then_plain_ce_after_stop_step(teacher_dir, monkeypatch):
  """Through the training loop (2 devices, 2 microbatches): steps 0-1 distil
  with ``(1-w) CE + w T^2 KL`` (checked against NumPy on the initial params),
  the teacher runs exactly twice, and step 2 is plain cross-entropy."""
  path, teacher_params = teacher_dir
  runs = []
  original = distillation.TeacherForward.logits

  def counted(self, batch):
    out = original(self, batch)
    jax.debug.callback(lambda: runs.append(1))   # once per executed teacher pass
    return out

  monkeypatch.setattr(distillation.TeacherForward, "logits", counted)
  w, t = 0.7, 2.0
  cfg = distillation.DistillationConfig(teacher_checkpoint=path, teacher_config=_config(2),
                                        temperature=t, weight=w, stop_step=2)
  student = build_model(_config(1))
  tx = optimizers.make_optimizer(
      "adamw", optimizers.make_schedule("constant", 3e-2, warmup_steps=0))
  batch = _batch(0)
  writer, lines = _Writer(), []
  loop_cfg = loop.LoopConfig(train_steps=3, log_period=1, checkpoint_period=None,
                             num_microbatches=2, seed=1)
  layout = train_state.StateLayout.create(student, tx, _partitioner(2), SHAPES)
  result = loop.train(layout, iter([batch] * 3), loop_cfg,
                      loss_cfg=NO_AUX, writers=(writer, None), log_fn=lines.append,
                      distillation=cfg)
  jax.effects_barrier()
  assert int(result.state.step) == 3
  assert len(runs) == 2 * 2                   # steps 0 and 1 only, 2 microbatches each

  # Reference for step 0: the loop's initial params (same seed), one device.
  init, _ = train_state.init_train_state(student, tx, _partitioner(1), SHAPES, seed=1)
  s_logits = _logits_fn(student)(jax.device_get(init.params), batch)
  t_logits = _logits_fn(build_model(_config(2)))(teacher_params, batch)
  weights = batch["decoder_loss_weights"]
  n = weights.sum()
  ce = -np.take_along_axis(_np_log_softmax(s_logits),
                           batch["decoder_target_tokens"][..., None], -1)[..., 0]
  kd = t * t * _np_kl(t_logits, s_logits, t)
  first = writer.rows[1]
  assert first["cross_entropy"] == pytest.approx((ce * weights).sum() / n, rel=1e-4)
  assert first["distillation_kl"] == pytest.approx((kd * weights).sum() / n, rel=1e-4)
  assert first["loss"] == pytest.approx(
      ((1 - w) * (ce * weights).sum() + w * (kd * weights).sum()) / n, rel=1e-4)
  second = writer.rows[2]
  assert second["loss"] == pytest.approx((1 - w) * second["cross_entropy"]
                                         + w * second["distillation_kl"], rel=1e-5)
  assert second["distillation_kl"] < first["distillation_kl"]   # moved toward the teacher
  last = writer.rows[3]
  assert "distillation_kl" not in last
  assert last["loss"] == pytest.approx(last["cross_entropy"], rel=1e-6)
  assert any("Distillation stopped at step 2" in line for line in lines)


def test_teacher_config_found_next_to_checkpoint(teacher_dir, tmp_path):
  """``model_config.json`` in the teacher's MODEL_DIR is found from a step
  directory and read (without gin) into the teacher's ``T5Config``."""
  path, _ = teacher_dir
  want = dataclasses.replace(_config(2), num_decoder_layers=3)
  json_file = os.path.join(path, model_config_lib.CONFIG_FILE)
  model_config_lib.save_json(want, json_file)
  try:
    cfg = distillation.DistillationConfig(teacher_checkpoint=os.path.join(path, "5"))
    assert distillation.find_teacher_config(cfg.teacher_checkpoint) == json_file
    teacher = distillation.teacher_model_config(cfg)
  finally:
    os.remove(json_file)
  assert isinstance(teacher, T5Config) and teacher == want
  assert teacher.num_decoder_layers == 3
  with pytest.raises(FileNotFoundError, match="missing.json"):
    distillation.teacher_model_config(distillation.DistillationConfig(
        teacher_checkpoint=path, teacher_config_file=str(tmp_path / "missing.json")))
  with pytest.raises(FileNotFoundError, match="model_config.json"):
    distillation.teacher_model_config(distillation.DistillationConfig(
        teacher_checkpoint=path))

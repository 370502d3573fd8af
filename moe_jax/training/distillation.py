"""Mixture-of-Students (MoS) knowledge distillation (DeepSpeed-MoE).

Rajbhandari et al. 2022 (DeepSpeed-MoE, section 5) train a smaller or
shallower MoE *student* against a frozen MoE *teacher*: the token loss is a
mix of the ordinary cross-entropy and the KL divergence from the teacher's
softened distribution to the student's, and the distillation is *staged* --
it stops after a given step and training goes on with cross-entropy alone.

Per real target token (``weights > 0``)::

    loss = (1 - w) * CE(student, target)
           + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))

summed over tokens and divided by the batch's number of real target tokens
(the same normalization as the cross-entropy, so microbatching is exact).
The output z-loss and the MoE auxiliary losses are added unchanged.

The teacher is a checkpoint of this project (``moe-train`` or
``moe-upcycle`` output). Its model comes from its own configuration: a
``T5Config`` given directly, a JSON file (``teacher_config_file``), or --
when neither is given -- the ``model_config.json`` that ``moe-train`` and
``moe-upcycle`` write into their output directory, found next to the
checkpoint (no gin is parsed: the student's gin configuration is live). The teacher runs deterministically (no
dropout), outside the step schedule, and no gradient flows into it.

Stopping: the loop compiles two steps. Steps ``s < stop_step`` run the
distillation step ``step(state, batch, teacher_params)``; from
``stop_step`` on the loop switches to the plain compiled step, which has no
teacher in its program, and drops its reference to the teacher's params (a
run resumed at or after ``stop_step`` never loads the teacher).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from moe_jax.layers import schedule as step_schedule
from moe_jax.models import config as model_config_lib
from moe_jax.training import train_state as train_state_lib


@dataclasses.dataclass(frozen=True)
class DistillationConfig:
  """Mixture-of-Students settings (gin: ``train.distillation = @DistillationConfig()``).

  Attributes:
    teacher_checkpoint: the teacher's checkpoint: a ``moe-train`` model
      directory (latest step), one step directory, or a ``moe-upcycle``
      output directory.
    teacher_config_file: the teacher's model config as JSON
      (``model_config.json``, written by ``moe-train`` / ``moe-upcycle``).
      Default: ``model_config.json`` found in the checkpoint directory or its
      parent.
    teacher_config: the teacher's ``T5Config`` itself (Python API; takes
      precedence over ``teacher_config_file``).
    temperature: softmax temperature ``T`` of both distributions (1.0).
    weight: ``w``, the share of the KL term; the cross-entropy gets ``1 - w``
      (0.5: CE and KD weighted equally, as in DeepSpeed's MoS runs; see
      docs/distillation.md).
    stop_step: distil while ``step < stop_step`` (DeepSpeed's staged KD), then
      plain cross-entropy; ``None`` distils for the whole run.
  """
  teacher_checkpoint: Optional[str] = None
  teacher_config_file: Optional[str] = None
  teacher_config: Any = None
  temperature: float = 1.0
  weight: float = 0.5
  stop_step: Optional[int] = None

  def __post_init__(self):
    if not self.teacher_checkpoint:
      raise ValueError(
          "DistillationConfig.teacher_checkpoint is not set: give the teacher's "
          "checkpoint directory, e.g. DistillationConfig.teacher_checkpoint = "
          "'/tmp/teacher_run'.")
    if not self.temperature > 0:
      raise ValueError(f"DistillationConfig.temperature={self.temperature} must be > 0 "
                       "(1.0 is plain softmax).")
    if not 0.0 <= self.weight <= 1.0:
      raise ValueError(f"DistillationConfig.weight={self.weight} must be in [0, 1]: "
                       "the KL term's share, the cross-entropy gets 1 - weight.")
    if self.stop_step is not None and self.stop_step < 0:
      raise ValueError(f"DistillationConfig.stop_step={self.stop_step} must be >= 0 "
                       "or None (distil for the whole run).")

  def active_at(self, step: int) -> bool:
    """Whether training step ``step`` (0-based, before its update) distils."""
    return self.stop_step is None or step < self.stop_step


# ----------------------------------------------------------------------------
# The loss term
# ----------------------------------------------------------------------------
def kl_divergence(teacher_logits: jax.Array, student_logits: jax.Array,
                  temperature: float = 1.0) -> jax.Array:
  """``KL(softmax(teacher/T) || softmax(student/T))`` per token.

  Args:
    teacher_logits, student_logits: ``<float>[batch, length, vocab]``.
    temperature: ``T`` > 0.

  Returns:
    ``<float32>[batch, length]`` (nats, >= 0).
  """
  t = teacher_logits.astype(jnp.float32) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  log_p = jax.nn.log_softmax(t, axis=-1)
  log_q = jax.nn.log_softmax(s, axis=-1)
  p = jnp.exp(log_p)
  return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def distillation_loss_sum(teacher_logits: jax.Array, student_logits: jax.Array,
                          weights: jax.Array, temperature: float = 1.0) -> jax.Array:
  """``<float32>[]``: ``sum_tokens weights * T^2 * KL`` (see :func:`kl_divergence`).

  ``weights``: ``<float>[batch, length]``, 0 on padding.
  """
  kl = kl_divergence(teacher_logits, student_logits, temperature)
  return temperature ** 2 * jnp.sum(kl * weights.astype(jnp.float32))


def mix(cross_entropy: jax.Array, distillation: jax.Array, weight: float) -> jax.Array:
  """``(1 - w) * cross_entropy + w * distillation`` (both token sums)."""
  return (1.0 - weight) * cross_entropy + weight * distillation


@dataclasses.dataclass(frozen=True)
class TeacherForward:
  """The frozen teacher inside a traced train step.

  Attributes:
    model: the teacher's flax module; params: its (traced) params.
    temperature, weight: from :class:`DistillationConfig`.
  """
  model: nn.Module
  params: Any
  temperature: float
  weight: float

  def logits(self, batch) -> jax.Array:
    """``<float>[batch, length, vocab]``: teacher-forced, no dropout, no gradient.

    Run outside the training-step schedule, so step-annealed layers of the
    teacher use their end-of-schedule (eval) behaviour.
    """
    args, kwargs = train_state_lib.model_inputs(batch)
    params = jax.lax.stop_gradient(self.params)
    with step_schedule.training_step(None):
      out = self.model.apply({"params": params}, *args, **kwargs,
                             enable_dropout=False)
    return jax.lax.stop_gradient(out)

  def loss_sum(self, batch, student_logits: jax.Array, weights: jax.Array) -> jax.Array:
    """``<float32>[]`` token sum of ``T^2 KL(teacher || student)``."""
    return distillation_loss_sum(self.logits(batch), student_logits, weights,
                                 self.temperature)


# ----------------------------------------------------------------------------
# Finding and loading the teacher
# ----------------------------------------------------------------------------
def checkpoint_exists_or_raise(path: str) -> None:
  """Raises ``FileNotFoundError`` naming ``path`` when no checkpoint is there."""
  from moe_jax.checkpoints import restore  # pylint: disable=g-import-not-at-top
  try:
    restore.resolve_state_dir(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f"DistillationConfig.teacher_checkpoint={path!r}: no teacher checkpoint "
        f"there ({e}) Point it at the teacher run's MODEL_DIR, one of its step "
        "directories, or a moe-upcycle output directory.") from e


def find_teacher_config(checkpoint: str) -> Optional[str]:
  """``model_config.json`` in ``checkpoint`` or its parent, or ``None``."""
  here = os.path.abspath(checkpoint)
  for directory in (here, os.path.dirname(here)):
    candidate = os.path.join(directory, model_config_lib.CONFIG_FILE)
    if os.path.isfile(candidate):
      return candidate
  return None


def teacher_model_config(cfg: DistillationConfig) -> Any:
  """The teacher's ``T5Config`` (see :class:`DistillationConfig`).

  Raises:
    FileNotFoundError: no config file given or found next to the checkpoint.
    ValueError: the file holds no model config.
  """
  if cfg.teacher_config is not None:
    return cfg.teacher_config
  path = cfg.teacher_config_file or find_teacher_config(cfg.teacher_checkpoint)
  if path is None:
    raise FileNotFoundError(
        f"No teacher model config: DistillationConfig.teacher_config_file is unset "
        f"and there is no {model_config_lib.CONFIG_FILE} in "
        f"{cfg.teacher_checkpoint!r} or its parent (moe-train and moe-upcycle "
        "write one into their output directory). Set "
        "DistillationConfig.teacher_config_file to the teacher's model_config.json.")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"DistillationConfig.teacher_config_file={path!r} does not exist; give the "
        f"teacher run's {model_config_lib.CONFIG_FILE}.")
  try:
    return model_config_lib.load_json(path)
  except ValueError as e:
    raise ValueError(f"Could not read the teacher's model config: {e}") from e


def resolve(cfg: DistillationConfig, student_config: Any) -> DistillationConfig:
  """Checks the teacher before anything is compiled; returns ``cfg`` with
  ``teacher_config`` filled in.

  Raises:
    FileNotFoundError: no checkpoint at ``teacher_checkpoint`` (named), or no
      teacher config to be found.
    ValueError: the teacher's vocabulary differs from the student's.
  """
  checkpoint_exists_or_raise(cfg.teacher_checkpoint)
  teacher = teacher_model_config(cfg)
  if teacher.vocab_size != student_config.vocab_size:
    raise ValueError(
        f"Teacher vocab_size={teacher.vocab_size} != student vocab_size="
        f"{student_config.vocab_size}: distillation compares distributions over "
        "the same vocabulary. Use a teacher trained with the student's vocabulary.")
  if teacher.decoder_only != student_config.decoder_only:
    raise ValueError("Teacher and student must both be encoder-decoder or both "
                     "decoder-only (they read the same batches).")
  return dataclasses.replace(cfg, teacher_config=teacher)


@dataclasses.dataclass
class Teacher:
  """A loaded teacher: its module, params (placed with their shardings), settings."""
  model: nn.Module
  params: Any
  shardings: Any
  config: DistillationConfig


def load_teacher(cfg: DistillationConfig, partitioner, batch_shapes) -> Teacher:
  """Builds the teacher model and restores its params, sharded like training.

  Args:
    cfg: resolved config (:func:`resolve`), or one with ``teacher_config``.
    partitioner: the training mesh and logical-axis rules
      (:class:`moe_jax.partitioning.Partitioner`).
    batch_shapes: global batch shapes (``train_state.dummy_batch``).
  """
  from moe_jax import models  # pylint: disable=g-import-not-at-top
  from moe_jax.checkpoints import restore  # pylint: disable=g-import-not-at-top
  checkpoint_exists_or_raise(cfg.teacher_checkpoint)
  model = models.build_model(teacher_model_config(cfg))
  layout = train_state_lib.StateLayout.create(model, optax.identity(), partitioner,
                                              batch_shapes)
  params = restore.restore_params(cfg.teacher_checkpoint, layout.abstract.params,
                                  layout.shardings.params)
  return Teacher(model=model, params=params, shardings=layout.shardings.params,
                 config=cfg)

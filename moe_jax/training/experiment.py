"""One configured training run: validated up front, then run.

:func:`build_experiment` takes the T5X-style settings (what ``train.*`` gin
bindings provide), checks them against the devices *before* any data is
read or anything compiled (mesh sizes, batch divisibility, experts per
expert shard) and returns an :class:`Experiment`. ``Experiment.run()`` reads
the data and trains; ``Experiment.init_and_step()`` initializes the sharded
state and runs one step on a synthetic batch (config smoke tests).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
import optax

from moe_jax import models, partitioning
from moe_jax.data import pipeline, train_iterator
from moe_jax.training import distillation as distillation_lib
from moe_jax.training import loop, metrics, offload as offload_lib, optimizers, param_counts
from moe_jax.training import train_state, train_step


class ConfigError(ValueError):
  """A setting that cannot work with these devices; the message says what to change."""


@dataclasses.dataclass
class Experiment:
  model_config: Any
  model: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  loss_config: train_step.LossConfig
  loop_config: loop.LoopConfig
  partitioner: partitioning.Partitioner
  batch_size: int
  task_feature_lengths: dict
  batch_shapes: dict
  mixture_or_task_name: str
  model_type: str
  model_dir: Optional[str] = None
  initial_checkpoint_path: Optional[str] = None
  pack: bool = True
  data_seed: int = 0
  measure_peak_flops: bool = True
  tensorboard: bool = True
  decode_eval: bool = False
  distillation: Optional[distillation_lib.DistillationConfig] = None
  offload: offload_lib.OffloadConfig = offload_lib.OffloadConfig()

  @property
  def mesh(self):
    return self.partitioner.mesh

  @property
  def rules(self):
    return self.partitioner.rules

  @functools.cached_property
  def layout(self) -> train_state.StateLayout:
    """The abstract train state and its shardings (traced once, no arrays)."""
    return train_state.StateLayout.create(self.model, self.tx, self.partitioner,
                                          self.batch_shapes, offload=self.offload)

  # -- the compiled program -------------------------------------------------------
  def _jitted_step(self, teacher: Optional[distillation_lib.Teacher] = None):
    """The jitted train step: the one factory, so ``moe-train``'s loop and
    ``lower_step`` / ``moe-compile`` reach the identical program. With a
    loaded distillation ``teacher``, the distillation step."""
    return train_step.jitted_train_step(
        self.layout, self.loss_config, self.schedule,
        self.loop_config.num_microbatches, teacher)

  def lower_step(self) -> Any:
    """Traces and lowers (no compile, no run) the sharded train step.

    Reads no data and allocates no arrays: the state and batch are abstract
    (``jax.ShapeDtypeStruct`` with their shardings), so it also works on
    compile-only devices (``jax.experimental.topologies``). Returns the
    ``jax.stages.Lowered``; ``.compile()`` it for memory/cost analysis.
    """
    layout, step = self.layout, self._jitted_step()
    with self.partitioner.activate():
      return step.lower(layout.placed_abstract(), self.batch_shapes)

  def init_and_step(self) -> dict[str, float]:
    """Sharded init + one jitted train step on a synthetic batch; metrics."""
    state = self.layout.init(seed=self.loop_config.seed)
    step = self._jitted_step()
    rng = np.random.default_rng(0)
    vocab = self.model_config.vocab_size
    local = {k: rng.integers(1, vocab, v.shape).astype(np.int32)
             for k, v in self.batch_shapes.items()}
    local["decoder_loss_weights"] = np.ones_like(local["decoder_loss_weights"])
    with self.partitioner.activate():
      _, m = step(state, self.partitioner.global_batch(local))
    return metrics.to_host(m)

  def memory_settings(self) -> dict[str, Any]:
    """Where the train state and activations live: the offload macros, the
    remat policy and ZeRO sharding (the start-up line and moe-compile's JSON)."""
    return {**self.offload.as_dict(),
            "remat_policy": self.model_config.remat_policy,
            "zero_sharding": self.partitioner.zero_sharding}

  def active_params(self) -> int:
    """Parameters a token passes through (experts count ``k/E`` of their stack)."""
    return param_counts.active(self.layout.abstract.params, self.layout.param_axes,
                               self.model_config)

  # -- the run ------------------------------------------------------------------
  def run(self, log_fn: Callable[[str], None] = print,
          on_start: Optional[Callable[[], None]] = None) -> loop.LoopResult:
    """Reads data (this process's shard) and trains; see :func:`loop.train`
    (``on_start`` runs once the state is restored or initialized)."""
    cfg = self.loop_config
    train_data = train_iterator.get_train_iterator(
        self.mixture_or_task_name, self.task_feature_lengths, self.batch_size,
        seed=self.data_seed, pack=self.pack, model_type=self.model_type)
    eval_data = None
    if cfg.eval_period:
      max_examples = None if cfg.eval_steps is None else cfg.eval_steps * self.batch_size
      evals = pipeline.get_eval_datasets(
          self.mixture_or_task_name, self.task_feature_lengths, self.batch_size,
          model_type=self.model_type, max_examples=max_examples)
      eval_data = lambda: (b for ev in evals.values() for b, _ in ev.batches())
    decode_eval_fn = None
    if cfg.eval_period and self.decode_eval and self.model_type == "encdec":
      # The same decode-and-score path as moe-eval (BLEU/chrF/accuracy).
      from moe_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
      max_examples = None if cfg.eval_steps is None else cfg.eval_steps * self.batch_size
      decode_eval_fn = evaluator.make_training_eval_fn(
          self.model, self.partitioner, self.mixture_or_task_name,
          self.task_feature_lengths, self.batch_size, max_examples=max_examples,
          output_dir=(os.path.join(self.model_dir, "eval_decode")
                      if self.model_dir else None))
      if self.offload.params:  # decoding reads device params
        decode_eval_fn = functools.partial(_with_device_params, decode_eval_fn,
                                           self.layout.device_shardings.params)

    abstract = self.layout.abstract
    active = self.active_params()
    peak = metrics.measure_matmul_peak() if self.measure_peak_flops else None
    primary = jax.process_index() == 0
    if primary:
      lengths = {k: v.shape[1] for k, v in self.batch_shapes.items()
                 if k in ("encoder_input_tokens", "decoder_target_tokens")}
      log_fn(f"moe-train: {param_counts.total(abstract.params):,} params "
             f"({active:,} active per token), mesh {dict(self.mesh.shape)}, "
             f"batch {self.batch_size} x {lengths}, {cfg.train_steps} steps"
             + (f", matmul peak {peak / 1e9:.1f} GFLOP/s" if peak else "")
             + ", " + " ".join(f"{k}={v}" for k, v in self.memory_settings().items()))
    writers = metrics.create_writers(self.model_dir if self.tensorboard else None,
                                     primary)
    return loop.train(
        self.layout, train_data, cfg, loss_cfg=self.loss_config,
        schedule=self.schedule, eval_data=eval_data,
        model_dir=self.model_dir, initial_checkpoint_path=self.initial_checkpoint_path,
        writers=writers, flops_per_token=metrics.train_flops_per_token(active),
        peak_flops=peak, log_fn=log_fn, decode_eval_fn=decode_eval_fn,
        distillation=self.distillation, step_factory=self._jitted_step,
        on_start=on_start)


def _with_device_params(fn, shardings, step, params):
  """``fn(step, params)`` with host-memory params copied to the device first."""
  return fn(step, jax.device_put(params, shardings))


def validate(model_config, mesh, batch_size: int, num_microbatches: int) -> None:
  """Raises :class:`ConfigError` for settings these devices cannot run."""
  shards = partitioning.mesh_axis_size(mesh, partitioning.BATCH_MESH_AXES)
  if batch_size % shards:
    raise ConfigError(
        f"BATCH_SIZE={batch_size} is not divisible by the batch-sharding mesh axes "
        f"data*fsdp*expert = {shards} (mesh {dict(mesh.shape)}). Use a multiple of "
        f"{shards} (e.g. --gin.BATCH_SIZE={shards * max(1, batch_size // shards)}) "
        "or change MESH_DATA / MESH_FSDP / MESH_EXPERT.")
  if (num_microbatches < 1 or batch_size % num_microbatches
      or (batch_size // num_microbatches) % shards):
    raise ConfigError(
        f"NUM_MICROBATCHES={num_microbatches} must split BATCH_SIZE={batch_size} into "
        f"microbatches whose size is a multiple of {shards} (the batch shards).")
  if not model_config.has_moe:
    return
  expert_shards = partitioning.mesh_axis_size(mesh, "expert")
  try:
    for moe in model_config.moe_configs():  # one per stack (T5Config.stack_moe)
      moe.validate(num_expert_shards=expert_shards)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  for stack, layout, n in (("encoder", model_config.encoder_layout,
                            model_config.num_encoder_layers),
                           ("decoder", model_config.decoder_layout,
                            model_config.num_decoder_layers)):
    stack_moe = model_config.stack_moe(stack)
    default = stack_moe.num_experts if stack_moe else 0
    for layer, e in layout.experts_per_layer(n, default).items():
      if e % expert_shards:
        raise ConfigError(
            f"{stack} layer {layer} has {e} experts, not divisible by MESH_EXPERT="
            f"{expert_shards}; change MESH_EXPERT or the expert counts.")


def build_experiment(
    model_config: Any,
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    batch_size: int,
    train_steps: int,
    model_dir: Optional[str] = None,
    mixture_or_task_module: Optional[str] = None,
    eval_period: int = 0,
    eval_steps: Optional[int] = 20,
    checkpoint_period: Optional[int] = 1000,
    keep_checkpoints: int = 3,
    on_damaged_checkpoint: str = "fall_back",
    initial_checkpoint_path: Optional[str] = None,
    mesh_shape: Optional[Mapping[str, int]] = None,
    dcn_mesh_shape: Optional[Mapping[str, int]] = None,
    fsdp_params: bool = True,
    zero_sharding: bool = False,
    offload_optimizer_state: bool = False,
    offload_params: bool = False,
    optimizer_update_on_host: bool = False,
    num_microbatches: int = 1,
    log_period: int = 100,
    seed: int = 0,
    data_seed: Optional[int] = None,
    pack: bool = True,
    optimizer: Optional[optax.GradientTransformation] = None,
    schedule: Optional[optax.Schedule] = None,
    loss_config: Optional[train_step.LossConfig] = None,
    measure_peak_flops: bool = True,
    tensorboard: bool = True,
    decode_eval: bool = False,
    distillation: Optional[distillation_lib.DistillationConfig] = None,
    devices: Optional[Sequence[Any]] = None) -> Experiment:
  """Validates the settings against the devices and assembles the run.

  Args mirror T5X's run macros (``MODEL_DIR``, ``TRAIN_STEPS``, ...);
  ``mesh_shape`` / ``dcn_mesh_shape`` are ``{'data', 'fsdp', 'expert',
  'model'}`` sizes (one ``-1`` allowed). ``optimizer`` defaults to T5's
  Adafactor on ``schedule`` (default rsqrt). ``decode_eval`` adds, at every
  eval, the decode-and-score evaluation of ``moe-eval`` (BLEU, chrF, ...).
  ``on_damaged_checkpoint``: ``"fall_back"`` (resume from the newest
  checkpoint that restores, keeping a damaged one as ``<step>.damaged``) or
  ``"refuse"`` (stop with an error). ``distillation`` trains this model as a
  Mixture-of-Students student of a
  teacher checkpoint (:mod:`moe_jax.training.distillation`); the smoke
  helpers ``init_and_step`` / ``lower_step`` use the plain step. ``devices``
  (default ``jax.devices()``) builds the mesh from other devices, e.g. the
  compile-only TPU devices of ``moe-compile``. ``zero_sharding`` shards the
  non-expert weights and their optimizer state over every batch axis
  (:func:`moe_jax.partitioning.standard_logical_rules`);
  ``offload_optimizer_state`` / ``offload_params`` (gin macros
  ``OFFLOAD_OPTIMIZER_STATE`` / ``OFFLOAD_PARAMS``) keep those trees in host
  memory between steps (:mod:`moe_jax.training.offload`);
  ``optimizer_update_on_host`` (``OPTIMIZER_UPDATE_ON_HOST``) runs the
  update of the offloaded optimizer state on the host CPU.

  Raises:
    ConfigError: mesh sizes that do not match the devices, a batch that does
      not divide over the batch axes, experts that do not divide over the
      expert axis, a distillation teacher that is missing or does not fit
      -- before any data is read or anything compiled.
  """
  if mixture_or_task_module:
    importlib.import_module(mixture_or_task_module)
  try:
    partitioner = partitioning.Partitioner.create(
        mesh_shape, dcn_mesh_shape, devices=devices, fsdp_params=fsdp_params,
        zero_sharding=zero_sharding)
  except ValueError as e:
    count = jax.device_count() if devices is None else len(devices)
    raise ConfigError(f"{e} (there are {count} devices.)") from e
  validate(model_config, partitioner.mesh, batch_size, num_microbatches)
  shards = partitioning.mesh_axis_size(partitioner.mesh, partitioning.BATCH_MESH_AXES)
  if zero_sharding and model_config.d_model % shards:
    raise ConfigError(
        f"train.zero_sharding=True shards d_model={model_config.d_model} over "
        f"data*fsdp*expert = {shards} devices, which does not divide it; set "
        "--gin.train.zero_sharding=False (or MESH_FSDP for FSDP over fewer devices), "
        "or change the mesh.")
  try:
    offload = offload_lib.OffloadConfig(optimizer_state=bool(offload_optimizer_state),
                                        params=bool(offload_params),
                                        update_on_host=bool(optimizer_update_on_host))
    offload_lib.check_supported(offload, list(partitioner.mesh.devices.flat),
                                model_config.remat_policy)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if train_steps < 1:
    raise ConfigError(f"TRAIN_STEPS={train_steps} must be >= 1.")
  if on_damaged_checkpoint not in ("fall_back", "refuse"):
    raise ConfigError(f"train.on_damaged_checkpoint={on_damaged_checkpoint!r}: use "
                      "'fall_back' or 'refuse'.")
  model_type = "decoder" if model_config.decoder_only else "encdec"
  lengths = pipeline.model_feature_lengths(task_feature_lengths, model_type, pack)
  feature_lengths = {"targets": lengths["decoder_target_tokens"]}
  if "encoder_input_tokens" in lengths:
    feature_lengths["inputs"] = lengths["encoder_input_tokens"]
  if distillation is not None:
    try:
      distillation = distillation_lib.resolve(distillation, model_config)
    except (FileNotFoundError, ValueError) as e:
      raise ConfigError(str(e)) from e
  schedule = schedule or optimizers.make_schedule("rsqrt")
  tx = optimizer or optimizers.make_optimizer("adafactor", schedule)
  if model_dir and jax.process_index() == 0:
    os.makedirs(model_dir, exist_ok=True)
  return Experiment(
      model_config=model_config, model=models.build_model(model_config), tx=tx,
      schedule=schedule, loss_config=loss_config or train_step.LossConfig(),
      loop_config=loop.LoopConfig(
          train_steps=train_steps, log_period=log_period, eval_period=eval_period,
          eval_steps=eval_steps, checkpoint_period=checkpoint_period,
          keep_checkpoints=keep_checkpoints,
          on_damaged_checkpoint=on_damaged_checkpoint,
          num_microbatches=num_microbatches,
          seed=seed),
      partitioner=partitioner, batch_size=batch_size, task_feature_lengths=dict(task_feature_lengths),
      batch_shapes=train_state.dummy_batch(batch_size, feature_lengths),
      mixture_or_task_name=mixture_or_task_name, model_type=model_type,
      model_dir=model_dir, initial_checkpoint_path=initial_checkpoint_path,
      pack=pack, data_seed=seed if data_seed is None else data_seed,
      decode_eval=decode_eval, distillation=distillation,
      measure_peak_flops=measure_peak_flops, tensorboard=tensorboard,
      offload=offload)

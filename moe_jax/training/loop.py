"""The training loop: init/restore, step, log, evaluate, checkpoint, stop.

Data comes in as an iterator of *process-local* numpy batches (this
process's rows of the global batch; feature names as T5X's
``EncDecFeatureConverter``). Each is turned into one global, batch-sharded
``jax.Array`` by the run's :class:`~moe_jax.partitioning.Partitioner`. An
iterator with ``save(directory)`` / ``restore(directory)``
(:class:`moe_jax.data.iterator.DataIterator`) has each process's position
checkpointed with the state (restoring costs the same at any step); one with
only ``get_state()`` / ``set_state()`` has a JSON position.

Resuming takes the newest checkpoint that restores
(``LoopConfig.on_damaged_checkpoint``). Preemption: with ``jax.distributed``
every process asks ``CheckpointManager.reached_preemption`` at every step
(the JAX preemption service owns SIGTERM); a single process installs the
SIGTERM handler of :mod:`moe_jax.checkpoints.preemption`. Either way the
step is saved and the loop returns ``stopped_early``.

The jitted train step comes from one factory
(:func:`moe_jax.training.train_step.jitted_train_step`, or the
``step_factory`` the caller passes, e.g. ``Experiment._jitted_step``), the
same one ``moe-compile`` lowers.

Non-finite losses stop the run (:class:`NonFiniteLossError`) before a
checkpoint of the broken state can be written: step ``s``'s loss is checked
when step ``s+1`` has been dispatched (so the host does not stall the
device), and always before a save.

With a :class:`~moe_jax.training.distillation.DistillationConfig` the loop
loads the frozen teacher (unless the run starts at or after ``stop_step``),
runs the distillation step while ``step < stop_step`` and then switches to
the plain compiled step, releasing the teacher's params.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import jax
import numpy as np
import optax

from moe_jax import partitioning
from moe_jax.training import distillation as distillation_lib
from moe_jax.training import metrics as metrics_lib
from moe_jax.training import train_state as train_state_lib
from moe_jax.training import train_step as train_step_lib

logger = logging.getLogger("moe_jax.train")


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or Inf."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """Schedule of one training run.

  Attributes:
    train_steps: total optimizer steps (T5X's ``TRAIN_STEPS``: absolute, so a
      resumed run stops at the same step).
    log_period: console/TensorBoard every this many steps.
    eval_period: teacher-forced evaluation every this many steps (0: never).
    eval_steps: batches per evaluation (``None``: the whole eval iterator).
    checkpoint_period: save every this many steps (0: only at the end when a
      model directory is given; ``None``: never).
    keep_checkpoints: how many recent checkpoints to keep.
    on_damaged_checkpoint: when the newest checkpoint does not restore:
      ``"fall_back"`` to the newest one that does (the damaged one is kept as
      ``<step>.damaged``), or ``"refuse"`` to stop
      (:meth:`moe_jax.checkpoints.manager.CheckpointManager.restore_latest`).
    num_microbatches: gradient-accumulation microbatches per step.
    seed: parameter / dropout / routing RNG seed.
  """
  train_steps: int = 1000
  log_period: int = 100
  eval_period: int = 0
  eval_steps: Optional[int] = 20
  checkpoint_period: Optional[int] = 1000
  keep_checkpoints: int = 3
  on_damaged_checkpoint: str = "fall_back"
  num_microbatches: int = 1
  seed: int = 0


@dataclasses.dataclass
class LoopResult:
  state: Any
  losses: list[float]                 # per step, in order
  eval_history: list[tuple[int, dict]]
  stopped_early: bool = False


def _check_finite(step: int, metrics: Mapping[str, Any]) -> float:
  """Returns step ``step``'s loss; raises if it or the updated params are not finite."""
  loss = float(np.asarray(jax.device_get(metrics["loss"])))
  param_norm = float(np.asarray(jax.device_get(metrics.get("param_norm", 0.0))))
  if not (math.isfinite(loss) and math.isfinite(param_norm)):
    what = (f"Training loss became {loss}" if not math.isfinite(loss)
            else f"The parameters became non-finite (norm {param_norm})")
    raise NonFiniteLossError(
        f"{what} at step {step}; stopping before any "
        "checkpoint of this state is written. Lower the learning rate, set "
        "make_optimizer.max_grad_norm, use float32 activations, or check the "
        "input data.")
  return loss


def _open_checkpoints(model_dir: Optional[str], cfg: LoopConfig):
  """The ckpt manager (``moe_jax.checkpoints``) or ``None`` when disabled."""
  if not model_dir or cfg.checkpoint_period is None:
    return None
  from moe_jax.checkpoints.manager import CheckpointManager  # pylint: disable=g-import-not-at-top
  period = cfg.checkpoint_period or cfg.train_steps
  return CheckpointManager(model_dir, save_interval_steps=max(1, period),
                           max_to_keep=cfg.keep_checkpoints)


def _signal_handler():
  """The SIGTERM handler, unless the JAX preemption service owns SIGTERM.

  With ``jax.distributed`` (multi-host: TPU pods, multi-task SLURM jobs) the
  JAX runtime catches the preemption notice and agrees on a step, read with
  ``CheckpointManager.reached_preemption``; installing a Python handler
  would take SIGTERM from it. Single processes use the Python handler.
  """
  from moe_jax.checkpoints import preemption  # pylint: disable=g-import-not-at-top
  if preemption.jax_preemption_service_active():
    return None
  try:
    return preemption.PreemptionHandler().install()
  except (RuntimeError, ValueError):  # not on the main thread
    return None


def _loud(is_primary: bool) -> Callable[[str], None]:
  """Lines that must be seen (damaged checkpoints): stderr, primary process."""
  def say(line: str) -> None:
    if is_primary:
      print(f"moe-train: {line}", file=sys.stderr, flush=True)
  return say


def evaluate(eval_step, params, batches: Iterable[Mapping[str, np.ndarray]],
             partitioner: partitioning.Partitioner,
             max_batches: Optional[int]) -> dict[str, float]:
  """Token-weighted eval loss/accuracy over ``batches``."""
  totals: dict[str, float] = {}
  n = 0
  for local in batches:
    if max_batches is not None and n >= max_batches:
      break
    sums = metrics_lib.to_host(eval_step(params, partitioner.global_batch(local)))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + v
    n += 1
  if not n:
    return {}
  tokens = max(totals.get("num_tokens", 0.0), 1.0)
  out = {"loss": (totals["cross_entropy_sum"] + totals["z_loss_sum"]) / tokens,
         "cross_entropy": totals["cross_entropy_sum"] / tokens,
         "accuracy": totals["correct_sum"] / tokens,
         "num_tokens": totals["num_tokens"]}
  out.update({k: v / n for k, v in totals.items() if k.startswith("moe/")})
  return out


def _eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def train(layout: train_state_lib.StateLayout,
          train_data: Iterator[Mapping[str, np.ndarray]],
          cfg: LoopConfig,
          loss_cfg: train_step_lib.LossConfig = train_step_lib.LossConfig(),
          schedule: Optional[optax.Schedule] = None,
          eval_data: Optional[Callable[[], Iterable[Mapping[str, np.ndarray]]]] = None,
          model_dir: Optional[str] = None,
          initial_checkpoint_path: Optional[str] = None,
          writers=None,
          flops_per_token: Optional[float] = None,
          peak_flops: Optional[float] = None,
          log_fn: Callable[[str], None] = print,
          decode_eval_fn: Optional[Callable[[int, Any], Mapping[str, float]]] = None,
          distillation: Optional[distillation_lib.DistillationConfig] = None,
          step_factory: Optional[Callable[..., Any]] = None,
          on_start: Optional[Callable[[], None]] = None
          ) -> LoopResult:
  """Runs training to ``cfg.train_steps`` (resuming from MODEL_DIR if saved).

  Args:
    layout: the model, optimizer, partitioner (mesh + rules), *global* batch
      shapes and the train state's shardings
      (:class:`~moe_jax.training.train_state.StateLayout`).
    train_data: iterator of process-local batches.
    schedule: the learning rate (for logging).
    eval_data: returns a fresh iterable of process-local eval batches.
    model_dir: checkpoints (and, via ``writers``, TensorBoard) go here.
    initial_checkpoint_path: when nothing is saved in ``model_dir`` yet, load
      the parameters (only) from this checkpoint, cast to the model's
      parameter dtypes (finetuning); the optimizer starts fresh.
    writers: ``(train_writer, eval_writer)`` clu writers, or ``None``.
    flops_per_token, peak_flops: for the MFU estimate.
    log_fn: where console lines go (primary process only).
    distillation: Mixture-of-Students settings (teacher checkpoint, weight,
      temperature, stop step); ``None`` trains on cross-entropy alone.
    step_factory: ``step_factory(teacher=None)`` -> the jitted train step
      (default: :func:`train_step.jitted_train_step` of ``layout``).
    on_start: called once the state is restored or initialized, before the
      first step (``moe-train`` writes ``config.gin`` then, so a run that
      stops at a damaged checkpoint changes nothing in MODEL_DIR).
  """
  is_primary = jax.process_index() == 0
  say = log_fn if is_primary else (lambda _: None)
  partitioner = layout.partitioner
  abstract, shardings = layout.abstract, layout.shardings
  if step_factory is None:
    step_factory = functools.partial(train_step_lib.jitted_train_step, layout,
                                     loss_cfg, schedule, cfg.num_microbatches)

  ckpt = _open_checkpoints(model_dir, cfg)
  checkpointed_iterator = train_data if hasattr(train_data, "restore") else None
  state = None
  if ckpt is not None:
    restored = ckpt.restore_latest(abstract, shardings,
                                   data_iterator=checkpointed_iterator,
                                   on_damage=cfg.on_damaged_checkpoint,
                                   log=_loud(is_primary))
    if restored is not None:
      state, data_state = restored
      state = state.replace(tx=layout.tx)
      resumed_at = int(jax.device_get(state.step))
      iterator_restored = (checkpointed_iterator is not None and
                           ckpt.has_data_iterator(resumed_at))
      if data_state and not iterator_restored and hasattr(train_data, "set_state"):
        train_data.set_state(data_state)   # JSON-only positions (older checkpoints)
      say(f"Resumed from {model_dir} at step {resumed_at}.")
  if state is None:
    state = layout.init(seed=cfg.seed)
    if initial_checkpoint_path:
      from moe_jax.checkpoints import restore  # pylint: disable=g-import-not-at-top
      params = restore.restore_params(initial_checkpoint_path, abstract.params,
                                      shardings.params)
      state = state.replace(params=params)
      say(f"Loaded parameters from {initial_checkpoint_path}.")

  if on_start is not None:
    on_start()
  step_fn = step_factory()
  teacher = None
  distill_fn = None
  start = int(jax.device_get(state.step))
  if start >= cfg.train_steps:
    say(f"Already at step {start} of TRAIN_STEPS={cfg.train_steps}: nothing to "
        "train. Raise TRAIN_STEPS (it counts from step 0) to train on.")
  if distillation is not None and distillation.active_at(start):
    teacher = distillation_lib.load_teacher(distillation, partitioner,
                                            layout.batch_shapes)
    distill_fn = step_factory(teacher)
    say(f"Distilling from {distillation.teacher_checkpoint} (weight "
        f"{distillation.weight}, temperature {distillation.temperature}"
        + (f", until step {distillation.stop_step})" if distillation.stop_step
           is not None else ")"))
  eval_fn = jax.jit(train_step_lib.make_eval_step(layout.model, loss_cfg),
                    in_shardings=(shardings.params, partitioner.batch_sharding))
  train_writer, eval_writer = writers if writers is not None else (None, None)
  tokens_per_step = int(np.prod(layout.batch_shapes["decoder_target_tokens"].shape))
  throughput = metrics_lib.Throughput(flops_per_token or 0.0, peak_flops)

  losses: list[float] = []
  eval_history: list[tuple[int, dict]] = []
  pending: Optional[tuple[int, dict]] = None
  preemption = _signal_handler() if ckpt is not None else None
  stopped_early = False
  t_start = time.perf_counter()
  try:
    with partitioner.activate():
      for step in range(start, cfg.train_steps):
        try:
          local = next(train_data)
        except StopIteration:
          say(f"Training data ran out after step {step}; stopping.")
          stopped_early = True
          break
        if teacher is not None and not distillation.active_at(step):
          say(f"Distillation stopped at step {step}; cross-entropy only from here.")
          teacher = distill_fn = None  # the plain step has no teacher in it
        batch = partitioner.global_batch(local)
        if teacher is not None:
          state, m = distill_fn(state, batch, teacher.params)
        else:
          state, m = step_fn(state, batch)
        if pending is not None:
          losses.append(_check_finite(*pending))
        pending = (step + 1, m)
        throughput.add(tokens_per_step)
        done = step + 1

        if done % cfg.log_period == 0 or done == cfg.train_steps:
          losses.append(_check_finite(*pending))
          pending = None
          host = {**metrics_lib.to_host(m), **throughput.read()}
          rate = (done - start) / max(time.perf_counter() - t_start, 1e-9)
          say(metrics_lib.format_console(done, host)
              + f"  [{done}/{cfg.train_steps} {100.0 * done / cfg.train_steps:.0f}%"
              f" eta {_eta((cfg.train_steps - done) / max(rate, 1e-9))}]")
          for line in metrics_lib.format_moe_layers(host):
            say(line)
          if train_writer is not None:
            train_writer.write_scalars(done, host)

        if cfg.eval_period and eval_data is not None and done % cfg.eval_period == 0:
          ev = evaluate(eval_fn, state.params, eval_data(), partitioner, cfg.eval_steps)
          if decode_eval_fn is not None:
            ev = dict(ev or {}, **decode_eval_fn(done, state.params))
          eval_history.append((done, ev))
          if ev:
            say(metrics_lib.format_console(done, ev, prefix="eval"))
            if eval_writer is not None:
              eval_writer.write_scalars(done, ev)
          throughput.read()  # eval time is not training throughput

        if ckpt is not None:
          last = done == cfg.train_steps
          # Every process asks the JAX preemption service at every step.
          preempted = ckpt.reached_preemption(done)
          preempted = (preemption is not None and preemption.should_stop(done)) or preempted
          if last or preempted or ckpt.should_save(done):
            if pending is not None:
              losses.append(_check_finite(*pending))
              pending = None
            if hasattr(train_data, "save"):
              ckpt.save(done, state, force=last or preempted, data_iterator=train_data)
            else:
              data_state = (train_data.get_state()
                            if hasattr(train_data, "get_state") else None)
              ckpt.save(done, state, data_state, force=last or preempted)
          if preempted:
            say(f"Preempted: saved step {done}; exiting.")
            stopped_early = True
            break
      if pending is not None:
        losses.append(_check_finite(*pending))
  finally:
    if ckpt is not None:
      ckpt.wait_until_finished()
      ckpt.close()
    if preemption is not None:
      preemption.uninstall()
    for w in (train_writer, eval_writer):
      if w is not None:
        w.flush()
  return LoopResult(state=state, losses=losses, eval_history=eval_history,
                    stopped_early=stopped_early)

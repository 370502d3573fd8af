"""Sharded, asynchronous train-state checkpoints on Orbax.

One step directory per saved step::

    model_dir/
      1000/
        state/          Orbax pytree (OCDBT + tensorstore): params, optimizer
                        state, step, RNG key data. Every process writes only
                        the shards it owns (``ocdbt.process_<i>``).
        data_state/     JSON: the data position's settings (process 0's).
        data_iterator/  process_<i>-of-<n>/: each process's input-pipeline
                        position (its tf.data iterator checkpoint;
                        :mod:`moe_jax.checkpoints.data_iterator`).
      2000/ ...

Saves are committed atomically: Orbax writes into
``<step>.orbax-checkpoint-tmp-*`` and renames it to ``<step>`` only after all
processes finished writing, so a process killed mid-save leaves the previous
step the latest readable one; leftover tmp directories are ignored, and
removed when the next manager opens the directory.

A step that does not restore (a truncated or missing file, a missing item,
an unreadable data position) is *damaged*. :meth:`CheckpointManager.
restore_latest` then, by default, falls back to the newest step that
restores, saying which step it skipped and why, and moves the damaged one
aside to ``<step>.damaged`` (never deleting it) so the run can write that
step again; ``on_damage="refuse"`` stops instead. A checkpoint that does
not fit the model or the data settings is not damage: that error is raised
at once.

Typical use in a train loop::

  ckpt = CheckpointManager(model_dir, save_interval_steps=1000, max_to_keep=3)
  restored = ckpt.restore_latest(abstract_state, state_shardings,
                                 data_iterator=train_data)
  if restored is not None:
    state, data_state = restored
  for step in ...:
    state = train_step(state, batch)
    ckpt.save(step, state, data_iterator=train_data)   # no-op off-interval
  ckpt.close()
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from moe_jax.checkpoints import data_iterator as data_iterator_lib
from moe_jax.checkpoints import restore as restore_lib
from moe_jax.checkpoints import tree_paths

STATE_ITEM = restore_lib.STATE_ITEM
DATA_STATE_ITEM = restore_lib.DATA_STATE_ITEM
DATA_ITERATOR_ITEM = "data_iterator"
DAMAGE_POLICIES = ("fall_back", "refuse")
DAMAGED_SUFFIX = ".damaged"
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
logger = logging.getLogger(__name__)


class CheckpointDamagedError(RuntimeError):
  """One step directory does not restore (a file is missing, truncated, ...).

  Attributes:
    step, step_dir: the damaged step; reason: a one-line description.
  """

  def __init__(self, step: int, step_dir: str, reason: str):
    self.step, self.step_dir, self.reason = step, step_dir, reason
    super().__init__(f"Checkpoint {step_dir} (step {step}) is damaged: {reason}")


class NoUsableCheckpointError(RuntimeError):
  """Every saved step is damaged (or the policy refuses a damaged one)."""


def _as_float(value: Any, name: str) -> float:
  try:
    out = float(value)
  except (TypeError, ValueError) as e:
    raise ValueError(
        f"Checkpoint metric {name!r} must be a scalar number, got {value!r}."
    ) from e
  return out


_TENSORSTORE_KINDS = (("OUT_OF_RANGE", "a file is shorter than recorded (truncated?)"),
                      ("DATA_LOSS", "a file is corrupt"),
                      ("NOT_FOUND", "a file is missing"))
_LOCAL_FILE = re.compile(r'local file "([^"]+)"')


def _first_line(error: BaseException, limit: int = 240) -> str:
  """A one-line reason: the kind of damage and the file, else the error's start."""
  texts = []
  e: Optional[BaseException] = error
  while e is not None and len(texts) < 5:
    texts.append(str(e))
    e = e.__cause__ or e.__context__
  text = "\n".join(texts)
  kind = next((k for code, k in _TENSORSTORE_KINDS if code in text), None)
  if kind is None and isinstance(error, FileNotFoundError):
    kind = "a file is missing"
  paths = _LOCAL_FILE.findall(text)
  files = [f for f in paths if not f.endswith("/")]
  if kind and files:
    return f"{kind}: {files[-1]}"
  if kind and paths:
    return f"{kind}: in {paths[-1]}"
  lines = str(error).strip().splitlines()
  line = lines[0] if lines else type(error).__name__
  line = line if len(line) <= limit else line[:limit] + " ..."
  return f"{kind}: {line}" if kind else line


def _drop_closed_loop_noise(unraisable) -> None:
  """``sys.unraisablehook`` that drops one harmless message: when a restore
  fails part-way, tensorstore completes the aborted reads after Orbax closed
  its event loop, and each completion reports ``Event loop is closed``."""
  if (isinstance(unraisable.exc_value, RuntimeError)
      and "Event loop is closed" in str(unraisable.exc_value)):
    logger.debug("Dropped a late read completion of a failed restore.")
    return
  _ORIGINAL_UNRAISABLEHOOK(unraisable)


_ORIGINAL_UNRAISABLEHOOK = sys.unraisablehook


def _is_config_mismatch(error: BaseException) -> bool:
  """Errors that mean "this checkpoint is fine, but not for this run"."""
  return (isinstance(error, restore_lib.CheckpointMismatchError)
          or getattr(error, "config_mismatch", False))


def _all_processes_ok(ok: bool) -> bool:
  """Whether every process succeeded (a tiny all-gather when multi-process)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.asarray(int(ok), np.int32))
  return bool(np.all(flags))


class CheckpointManager:
  """Saves and restores ``(train_state, data_state)`` every N steps.

  Args:
    directory: the model directory (created if missing). Local paths and any
      path Orbax/etils understands (``gs://...``).
    save_interval_steps: :meth:`save` writes only at multiples of this
      (``force=True`` overrides, e.g. on preemption or at the last step).
    max_to_keep: keep the last ``max_to_keep`` steps (``None``: keep all).
    keep_best_metric: name of a metric passed to :meth:`save`; the best step
      by it is kept in addition to the last ``max_to_keep``.
    best_mode: ``"min"`` (losses) or ``"max"`` (accuracy, BLEU) for
      ``keep_best_metric``.
    async_save: write in a background thread; :meth:`save` then returns once
      the arrays are copied off the accelerators.
  """

  def __init__(self, directory: str, save_interval_steps: int = 1000,
               max_to_keep: Optional[int] = 3,
               keep_best_metric: Optional[str] = None,
               best_mode: str = "min", async_save: bool = True):
    if save_interval_steps < 1:
      raise ValueError(
          f"save_interval_steps must be >= 1, got {save_interval_steps}.")
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(
          f"max_to_keep must be >= 1 or None (keep all), got {max_to_keep}.")
    if best_mode not in ("min", "max"):
      raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}.")
    self.directory = os.fspath(directory)
    self.keep_best_metric = keep_best_metric
    self.best_mode = best_mode
    policies = [ocp_policies.LatestN(n=max_to_keep)]
    if keep_best_metric is not None:
      policies.append(ocp_policies.BestN(
          get_metric_fn=lambda m: m[keep_best_metric],
          reverse=(best_mode == "min"), n=1,
          keep_checkpoints_without_metrics=False))
    # No InitialSavePolicy: the first save also waits for the interval.
    save_policy = ocp_policies.AnySavePolicy([
        ocp_policies.FixedIntervalPolicy(save_interval_steps),
        ocp_policies.PreemptionCheckpointingPolicy()])
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=save_policy,
        # best_fn makes Orbax store the metrics with each step.
        best_fn=((lambda m: m[keep_best_metric]) if keep_best_metric else None),
        best_mode=best_mode,
        preservation_policy=ocp_policies.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=(STATE_ITEM, DATA_STATE_ITEM, DATA_ITERATOR_ITEM))

  # -- queries ---------------------------------------------------------------

  def latest_step(self) -> Optional[int]:
    """The newest committed step, or ``None`` for an empty directory."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Committed steps, oldest first."""
    return sorted(self._manager.all_steps())

  def best_step(self) -> Optional[int]:
    """The kept step with the best ``keep_best_metric`` (``None`` if unset)."""
    if self.keep_best_metric is None:
      return None
    return self._manager.best_step()

  def is_saving_in_progress(self) -> bool:
    """Whether an asynchronous save is still being written."""
    return self._manager.is_saving_in_progress()

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def step_directory(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def reached_preemption(self, step: int) -> bool:
    """Whether all processes reached the JAX preemption sync point at ``step``.

    The JAX distributed runtime turns a preemption notice (SIGTERM on any
    process, Cloud TPU maintenance events) into one agreed step; every
    process must call this at every step. Always ``False`` without
    ``jax.distributed`` (single process: use the SIGTERM handler).
    """
    return self._manager.reached_preemption(step)

  # -- save ------------------------------------------------------------------

  def save(self, step: int, state: Any, data_state: Optional[Mapping] = None,
           metrics: Optional[Mapping[str, Any]] = None,
           force: bool = False, data_iterator: Any = None) -> bool:
    """Starts saving ``state`` and the data position as ``step`` if it is due.

    Args:
      step: the step number (the directory name).
      state: the train state pytree (sharded ``jax.Array`` leaves; typed PRNG
        keys are stored as their key data).
      data_state: JSON-serializable dict, the data position (default:
        ``data_iterator.get_state()``).
      metrics: scalars stored with the step; ``keep_best_metric`` among them
        decides which step is the best.
      force: save even off-interval (preemption, last step).
      data_iterator: an iterator with ``save(directory)`` (e.g.
        :class:`moe_jax.data.iterator.DataIterator`): every process writes its
        own position into the ``data_iterator`` item, before this returns.

    Returns:
      Whether a save was started. With ``async_save`` the train state is
      written in the background; it may be donated to the next step at once.
    """
    if data_state is None and data_iterator is not None:
      data_state = data_iterator.get_state()
    data_state = dict(data_state or {})
    try:
      json.dumps(data_state)
    except TypeError as e:
      raise ValueError(
          "data_state must be JSON-serializable (ints, floats, strings, lists, "
          f"dicts); convert NumPy scalars with int()/float(): {e}") from e
    if metrics is not None:
      metrics = {k: _as_float(v, k) for k, v in metrics.items()}
      if (self.keep_best_metric is not None and
          self.keep_best_metric not in metrics):
        raise ValueError(
            f"keep_best_metric {self.keep_best_metric!r} is not among the "
            f"metrics passed to save(): {sorted(metrics)}.")
      bad = [k for k, v in metrics.items() if not math.isfinite(v)]
      if bad:
        raise ValueError(f"Non-finite checkpoint metrics {bad}: {metrics}.")
    if not force and not self._manager.should_save(step):
      return False
    if step in self._manager.all_steps():
      return False  # e.g. the first step after a resume re-offers the same step
    encoded, _ = tree_paths.encode_prng_keys(state)
    items = {STATE_ITEM: ocp.args.StandardSave(encoded),
             DATA_STATE_ITEM: ocp.args.JsonSave(data_state)}
    if data_iterator is not None:
      items[DATA_ITERATOR_ITEM] = data_iterator_lib.DataIteratorSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items),
                              metrics=metrics, force=force)

  def wait_until_finished(self) -> None:
    """Blocks until any background save has been committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's resources."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- restore ---------------------------------------------------------------

  def saved_items(self, step: int) -> list[str]:
    """The items Orbax recorded for ``step`` (from its step metadata file).

    Raises:
      CheckpointDamagedError: that file is missing or unreadable.
    """
    path = os.path.join(self.step_directory(step), _STEP_METADATA_FILE)
    try:
      with open(path) as f:
        return sorted(json.load(f)["item_handlers"])
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise CheckpointDamagedError(
          step, self.step_directory(step),
          f"its Orbax metadata file {_STEP_METADATA_FILE} is missing or "
          f"unreadable ({_first_line(e)})") from e

  def has_data_iterator(self, step: int) -> bool:
    """Whether ``step`` holds the per-process data positions (newer checkpoints)."""
    return DATA_ITERATOR_ITEM in self.saved_items(step)

  def restore(self, step: int, abstract_state: Any, shardings: Any = None,
              data_iterator: Any = None) -> tuple[Any, dict]:
    """Restores ``(state, data_state)`` of ``step`` onto ``shardings``.

    Args:
      step: a committed step.
      abstract_state: the train state's structure with ``ShapeDtypeStruct``
        (or array) leaves; typed PRNG key leaves come back as typed keys.
      shardings: matching tree of ``jax.sharding.Sharding`` for the current
        mesh (any mesh: the checkpoint is resharded on read). ``None`` uses
        each abstract leaf's ``.sharding``.
      data_iterator: an iterator with ``restore(directory)``: when the step
        holds a ``data_iterator`` item, this process's position is restored
        into it (in place).

    Raises:
      CheckpointMismatchError: a leaf is missing, extra, or has another shape
        (the message names it and both shapes); the data settings differ.
      CheckpointDamagedError: a file or item of the step is missing or does
        not read (the message names the step directory and what failed).
    """
    step_dir = self.step_directory(step)
    items = self.saved_items(step)
    for item in items:
      if not os.path.isdir(os.path.join(step_dir, item)):
        raise CheckpointDamagedError(step, step_dir, f"its {item}/ item is missing")
    if STATE_ITEM not in items or DATA_STATE_ITEM not in items:
      missing = [i for i in (STATE_ITEM, DATA_STATE_ITEM) if i not in items]
      raise CheckpointDamagedError(step, step_dir, f"it has no {missing} item")
    if data_iterator is not None and DATA_ITERATOR_ITEM not in items:
      logger.info("Step %d has no data_iterator item (an older checkpoint): the "
                  "data position comes from data_state alone.", step)
    shardings = restore_lib.leaf_shardings(abstract_state, shardings)
    target = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_state, shardings)
    target, impls = tree_paths.encode_prng_keys(target)
    try:
      stored = restore_lib.stored_metadata(os.path.join(step_dir, STATE_ITEM))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointDamagedError(
          step, step_dir, f"state/ metadata does not read ({_first_line(e)})") from e
    restore_lib.check_compatible(
        tree_paths.flatten_with_paths(target), stored, allow_unused=False,
        what=f"checkpoint {step_dir}")
    args = {STATE_ITEM: ocp.args.StandardRestore(target),
            DATA_STATE_ITEM: ocp.args.JsonRestore()}
    if data_iterator is not None and DATA_ITERATOR_ITEM in items:
      args[DATA_ITERATOR_ITEM] = data_iterator_lib.DataIteratorRestore(data_iterator)
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # pylint: disable=broad-except
      if _is_config_mismatch(e):
        raise
      raise CheckpointDamagedError(step, step_dir, _first_line(e)) from e
    state = tree_paths.decode_prng_keys(out[STATE_ITEM], impls)
    return state, dict(out[DATA_STATE_ITEM] or {})

  def restore_latest(self, abstract_state: Any, shardings: Any = None,
                     data_iterator: Any = None, on_damage: str = "fall_back",
                     log: Optional[Callable[[str], None]] = None
                     ) -> Optional[tuple[Any, dict]]:
    """The newest step that restores (see :meth:`restore`), or ``None`` if none is saved.

    Args:
      abstract_state, shardings, data_iterator: as for :meth:`restore`.
      on_damage: ``"fall_back"`` (default): skip a damaged step, saying which
        and why, and try the one before; once one restores, the skipped ones
        are moved to ``<step>.damaged`` (kept, never deleted). ``"refuse"``:
        raise :class:`NoUsableCheckpointError` at the first damaged step.
      log: where the loud lines go (default ``logging.warning``).

    Raises:
      NoUsableCheckpointError: every step is damaged (nothing is moved or
        written then), or the first is and ``on_damage="refuse"``.
      CheckpointMismatchError: the newest step does not fit the model/data.
    """
    if on_damage not in DAMAGE_POLICIES:
      raise ValueError(f"on_damage={on_damage!r}; use one of {DAMAGE_POLICIES}.")
    say = log or logger.warning
    sys.unraisablehook = _drop_closed_loop_noise   # stays: late completions
    damaged: list[CheckpointDamagedError] = []
    for step in reversed(self.all_steps()):
      error = None
      try:
        restored = self.restore(step, abstract_state, shardings, data_iterator)
      except CheckpointDamagedError as e:
        error = e
      if not _all_processes_ok(error is None) and error is None:
        error = CheckpointDamagedError(step, self.step_directory(step),
                                       "it does not restore on another process")
      ok = error is None
      if ok:
        if damaged:
          self._set_aside(damaged, step, say)
        return restored
      damaged.append(error)
      if on_damage == "refuse":
        raise NoUsableCheckpointError(
            f"{error} Refusing to go on (on_damage='refuse'). Repair or move "
            f"that step directory away, or allow falling back to the newest "
            "intact step (train.on_damaged_checkpoint = 'fall_back').") from error
      say(f"WARNING: skipping damaged checkpoint step {step} "
          f"({self.step_directory(step)}): {error.reason}")
    if damaged:
      raise NoUsableCheckpointError(
          f"No checkpoint in {self.directory} restores; every step is damaged:\n  "
          + "\n  ".join(str(e) for e in damaged)
          + "\nNothing was changed. Restore the files (e.g. from a backup), or "
          "start over in a new MODEL_DIR.")
    return None

  def _set_aside(self, damaged: list[CheckpointDamagedError], resumed_step: int,
                 say: Callable[[str], None]) -> None:
    """Moves damaged steps to ``<step>.damaged[.N]`` (process 0) so that they
    are kept and the run can save those steps again."""
    for error in damaged:
      target = error.step_dir + DAMAGED_SUFFIX
      n = 1
      while os.path.exists(target):
        n += 1
        target = f"{error.step_dir}{DAMAGED_SUFFIX}.{n}"
      if jax.process_index() == 0:
        os.rename(error.step_dir, target)
      say(f"WARNING: kept damaged checkpoint step {error.step} as {target} (not "
          f"deleted); resuming from step {resumed_step}.")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("moe_jax_set_aside_damaged_checkpoints")
    self._manager.reload()

  def restore_or_none(self, abstract_state: Any, shardings: Any = None,
                      data_iterator: Any = None) -> Optional[tuple[Any, dict]]:
    """:meth:`restore_latest` with the default policy (fall back to an intact step)."""
    return self.restore_latest(abstract_state, shardings, data_iterator)

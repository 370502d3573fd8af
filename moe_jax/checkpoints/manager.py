"""Sharded, asynchronous train-state checkpoints on Orbax.

One step directory per saved step::

    model_dir/
      1000/
        state/        Orbax pytree (OCDBT + tensorstore): params, optimizer
                      state, step, RNG key data. Every process writes only
                      the shards it owns (``ocdbt.process_<i>``).
        data_state/   JSON: the data iterator position.
      2000/ ...

Saves are committed atomically: Orbax writes into
``<step>.orbax-checkpoint-tmp-*`` and renames it to ``<step>`` only after all
processes finished writing, so a process killed mid-save leaves the previous
step the latest readable one; leftover tmp directories are ignored, and
removed when the next manager opens the directory.

Typical use in a train loop::

  ckpt = CheckpointManager(model_dir, save_interval_steps=1000, max_to_keep=3)
  restored = ckpt.restore_or_none(abstract_state, state_shardings)
  if restored is not None:
    state, data_state = restored
  for step in ...:
    state = train_step(state, batch)
    ckpt.save(step, state, data_iterator_position)   # no-op off-interval
  ckpt.close()
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from moe_jax.checkpoints import restore as restore_lib
from moe_jax.checkpoints import tree_paths

STATE_ITEM = restore_lib.STATE_ITEM
DATA_STATE_ITEM = restore_lib.DATA_STATE_ITEM


def _as_float(value: Any, name: str) -> float:
  try:
    out = float(value)
  except (TypeError, ValueError) as e:
    raise ValueError(
        f"Checkpoint metric {name!r} must be a scalar number, got {value!r}."
    ) from e
  return out


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
        item_names=(STATE_ITEM, DATA_STATE_ITEM))

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

  # -- save ------------------------------------------------------------------

  def save(self, step: int, state: Any, data_state: Optional[Mapping] = None,
           metrics: Optional[Mapping[str, Any]] = None,
           force: bool = False) -> bool:
    """Starts saving ``state`` and ``data_state`` as ``step`` if it is due.

    Args:
      step: the step number (the directory name).
      state: the train state pytree (sharded ``jax.Array`` leaves; typed PRNG
        keys are stored as their key data).
      data_state: JSON-serializable dict, the data iterator position.
      metrics: scalars stored with the step; ``keep_best_metric`` among them
        decides which step is the best.
      force: save even off-interval (preemption, last step).

    Returns:
      Whether a save was started. With ``async_save`` it finishes in the
      background; the state may be donated to the next step immediately.
    """
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
    return self._manager.save(
        step,
        args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardSave(encoded),
            DATA_STATE_ITEM: ocp.args.JsonSave(data_state),
        }),
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

  def restore(self, step: int, abstract_state: Any, shardings: Any = None
              ) -> tuple[Any, dict]:
    """Restores ``(state, data_state)`` of ``step`` onto ``shardings``.

    Args:
      step: a committed step.
      abstract_state: the train state's structure with ``ShapeDtypeStruct``
        (or array) leaves; typed PRNG key leaves come back as typed keys.
      shardings: matching tree of ``jax.sharding.Sharding`` for the current
        mesh (any mesh: the checkpoint is resharded on read). ``None`` uses
        each abstract leaf's ``.sharding``.

    Raises:
      CheckpointMismatchError: a leaf is missing, extra, or has another shape
        (the message names it and both shapes).
    """
    shardings = restore_lib.leaf_shardings(abstract_state, shardings)
    target = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_state, shardings)
    target, impls = tree_paths.encode_prng_keys(target)
    stored = restore_lib.stored_metadata(
        os.path.join(self.step_directory(step), STATE_ITEM))
    restore_lib.check_compatible(
        tree_paths.flatten_with_paths(target), stored, allow_unused=False,
        what=f"checkpoint {self.step_directory(step)}")
    out = self._manager.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardRestore(target),
        DATA_STATE_ITEM: ocp.args.JsonRestore(),
    }))
    state = tree_paths.decode_prng_keys(out[STATE_ITEM], impls)
    return state, dict(out[DATA_STATE_ITEM] or {})

  def restore_or_none(self, abstract_state: Any, shardings: Any = None
                      ) -> Optional[tuple[Any, dict]]:
    """``restore(latest_step(), ...)``, or ``None`` when nothing is saved."""
    step = self.latest_step()
    if step is None:
      return None
    return self.restore(step, abstract_state, shardings)

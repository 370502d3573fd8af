"""The training data iterator and its checkpointed position.

A :class:`DataIterator` yields this host's rows of each global batch
(``dict[str, np.ndarray]`` of ``<int32>[per_host_batch, length]``) from the
seqio pipeline of :func:`moe_jax.data.pipeline.build_dataset`. Its position
is the state of the tf.data iterator itself (``tf.train.Checkpoint``, as
T5X checkpoints its input pipeline), written per host::

  it.save(directory)      # directory/state.json + directory/tf_iterator.*
  it = DataIterator(config); it.restore(directory)   # the same next batches

Restoring reads that state back: its cost does not grow with the number of
batches consumed (nothing is replayed), packing buffers, mixture sampling
and shuffle positions included. The sources shuffle by index
(:func:`moe_jax.data.task_builders.examples_dataset`), so the state is a few
megabytes (the seqio shuffle and prefetch buffers), whatever the corpus.

``state.json`` holds the data settings and ``batches_consumed``; a restore
checks them against this iterator's settings first, so a state from a
differently configured pipeline (other batch size, lengths, seed, mixture,
host count or shard) fails with a message naming the setting.
:meth:`DataIterator.get_state` is that JSON (what the checkpoint's
``data_state`` item records). Checkpoints written before this format
(``moe_jax.data.iterator/1``: JSON only) are still accepted by
:meth:`DataIterator.set_state`, which replays the consumed batches once.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import tensorflow as tf

from moe_jax.data import pipeline

STATE_FORMAT = "moe_jax.data.iterator/2"
LEGACY_STATE_FORMAT = "moe_jax.data.iterator/1"   # JSON position only (replayed)
STATE_FILE = "state.json"
TF_CHECKPOINT = "tf_iterator"
logger = logging.getLogger(__name__)


class DataStateError(ValueError):
  """A saved data position that does not read (missing or damaged files)."""


class DataSettingsError(ValueError):
  """A saved data position of a differently configured pipeline.

  Not damage: the position is intact but belongs to other data settings
  (checkpoint code tells the two apart by ``config_mismatch``).
  """
  config_mismatch = True


def plain_json(value: Any) -> Any:
  """``value`` with plain JSON types only (tuples -> lists, ...)."""
  return json.loads(json.dumps(value))


def check_settings(saved: Mapping[str, Any], mine: Mapping[str, Any], what: str,
                   ignore: Iterable[str] = ()) -> None:
  """Raises :class:`DataSettingsError` naming the first setting that differs.

  Args:
    saved: the settings recorded with the state.
    mine: this pipeline's settings (JSON types).
    what: how the message calls the state, e.g. ``"Data iterator state"``.
    ignore: keys not compared.
  """
  for key, value in mine.items():
    if key in ignore:
      continue
    if saved.get(key) != value:
      raise DataSettingsError(
          f"{what} has {key}={saved.get(key)!r} but this pipeline has "
          f"{key}={value!r}: it was saved by a differently configured pipeline. "
          "Resume with the data settings it was saved with (BATCH_SIZE, "
          "TASK_FEATURE_LENGTHS, MIXTURE_OR_TASK_NAME, seed, curriculum, host "
          "count), or start the data from scratch in a new MODEL_DIR.")


def write_state(directory: str, state: Mapping[str, Any]) -> None:
  with open(os.path.join(directory, STATE_FILE), "w") as f:
    json.dump(state, f, indent=1, sort_keys=True)


def read_state(directory: str) -> dict:
  """The ``state.json`` in ``directory``.

  Raises:
    DataStateError: it is missing or not valid JSON.
  """
  path = os.path.join(directory, STATE_FILE)
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise DataStateError(f"No data iterator state at {path}.") from e
  except (OSError, json.JSONDecodeError) as e:
    raise DataStateError(f"Unreadable data iterator state {path}: {e}") from e


class DataIterator:
  """Per-host numpy batches of one seqio Task/Mixture, checkpointable.

  Args:
    config: the data settings (:func:`moe_jax.data.train_iterator.
      get_train_iterator` builds them): ``mixture_or_task_name``,
      ``task_feature_lengths``, ``per_host_batch_size``, ``seed``,
      ``shard_index``, ``num_shards``, ``pack``, ``model_type``, ``split``,
      ``shuffle``, ``num_epochs``.
  """

  def __init__(self, config: Mapping[str, Any]):
    self._config = dict(config)
    self._batches_consumed = 0
    self._iterator: Optional[Any] = None   # the tf.data iterator, made lazily

  @property
  def config(self) -> dict:
    return dict(self._config)

  @property
  def batches_consumed(self) -> int:
    return self._batches_consumed

  def _new_iterator(self):
    c = self._config
    ds = pipeline.build_dataset(
        c["mixture_or_task_name"], c["task_feature_lengths"],
        c["per_host_batch_size"], c["seed"], c["shard_index"], c["num_shards"],
        pack=c["pack"], model_type=c["model_type"], split=c["split"],
        shuffle=c["shuffle"], num_epochs=c["num_epochs"])
    return iter(ds.prefetch(tf.data.AUTOTUNE))

  def __iter__(self) -> "DataIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self._new_iterator()
    batch = next(self._iterator)
    self._batches_consumed += 1
    return {k: v.numpy() for k, v in batch.items()}

  # -- position ---------------------------------------------------------------

  def get_state(self) -> dict:
    """The position's JSON: format, data settings and ``batches_consumed``."""
    return plain_json({"format": STATE_FORMAT,
                       "batches_consumed": self._batches_consumed, **self._config})

  def save(self, directory: str) -> None:
    """Writes this host's position into ``directory`` (created if missing)."""
    os.makedirs(directory, exist_ok=True)
    state = self.get_state()
    state["tf_checkpoint"] = self._iterator is not None
    if self._iterator is not None:
      tf.train.Checkpoint(iterator=self._iterator).write(
          os.path.join(directory, TF_CHECKPOINT))
    write_state(directory, state)  # last: its presence marks a complete write

  def restore(self, directory: str) -> None:
    """Moves to the position :meth:`save` wrote into ``directory``.

    Raises:
      DataStateError: the state is missing or unreadable.
      DataSettingsError: it came from a differently configured pipeline (the
        message names the setting).
    """
    state = read_state(directory)
    if state.get("format") != STATE_FORMAT:
      raise DataSettingsError(
          f"{directory} holds no plain data iterator state (format="
          f"{state.get('format')!r}, expected {STATE_FORMAT!r}); was the run "
          "saved with another data setup (e.g. a curriculum)?")
    check_settings(state, plain_json(self._config), "Data iterator state")
    iterator = self._new_iterator()
    if state.get("tf_checkpoint"):
      try:
        tf.train.Checkpoint(iterator=iterator).read(
            os.path.join(directory, TF_CHECKPOINT)).assert_consumed()
      except Exception as e:  # pylint: disable=broad-except  (tf raises many kinds)
        raise DataStateError(
            f"Cannot read the tf.data iterator checkpoint in {directory}: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    elif state["batches_consumed"]:
      raise DataStateError(f"{directory}: state.json records "
                           f"{state['batches_consumed']} batches but no iterator "
                           "checkpoint.")
    self._iterator = iterator
    self._batches_consumed = int(state["batches_consumed"])

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Moves to a JSON-only position of the legacy format by replaying it.

    Checkpoints of format ``moe_jax.data.iterator/1`` recorded only the
    settings and ``batches_consumed``; the batches are re-read once (slow at
    large steps). Every host consumed batches in lock-step, so process 0's
    state is valid for all hosts: only the shard index may differ.

    Raises:
      DataStateError: not a legacy state.
      DataSettingsError: another pipeline's.
    """
    if state.get("format") == STATE_FORMAT:
      raise DataStateError(
          "This data state was saved with its per-host tf.data iterator "
          "checkpoint; restore it with DataIterator.restore(directory) (the "
          "checkpoint's data_iterator item).")
    if state.get("format") != LEGACY_STATE_FORMAT:
      raise DataStateError(f"Not a data iterator state (format="
                           f"{state.get('format')!r}, expected {STATE_FORMAT!r}).")
    check_settings(state, plain_json(self._config), "Data iterator state",
                   ignore=("shard_index",))
    n = int(state["batches_consumed"])
    logger.warning("Data state of an older checkpoint (JSON position only): "
                   "replaying %d batches once to reach it.", n)
    iterator = self._new_iterator()
    for _ in range(n):
      next(iterator)
    self._iterator, self._batches_consumed = iterator, n

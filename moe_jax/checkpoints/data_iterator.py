"""Orbax item for the data iterators' positions, one per process.

Every process's input pipeline reads its own shard, so every process saves
its own position: the item directory holds one subdirectory per process,
``process_<i>-of-<n>/``, written by that process through the iterator's
``save(directory)`` and read back by its ``restore(directory)`` (the
protocol of :class:`moe_jax.data.iterator.DataIterator` and
:class:`~moe_jax.data.curriculum.CurriculumIterator`). Orbax writes the
item inside the step's temporary directory, so it is committed together
with the train state or not at all.

Use with Orbax's composite args::

  ocp.args.Composite(state=..., data_iterator=DataIteratorSave(it))
  ocp.args.Composite(state=..., data_iterator=DataIteratorRestore(it))
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath


class DataIteratorItemError(ValueError):
  """This process's data position is missing from the checkpoint.

  ``config_mismatch`` is set when the item holds the positions of another
  process count (the run's settings changed; the checkpoint is intact).
  """

  def __init__(self, message: str, config_mismatch: bool = False):
    super().__init__(message)
    self.config_mismatch = config_mismatch


def process_dir_name(index: Optional[int] = None, count: Optional[int] = None) -> str:
  """``process_<i>-of-<n>`` (default: this process)."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  return f"process_{index}-of-{count}"


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves/restores this process's iterator position (module docstring)."""

  def save(self, directory: epath.Path, args: "DataIteratorSave") -> None:
    target = os.path.join(os.fspath(directory), process_dir_name())
    args.iterator.save(target)

  def restore(self, directory: epath.Path,
              args: Optional["DataIteratorRestore"] = None) -> dict:
    """Restores ``args.iterator`` in place; returns its JSON position.

    Raises:
      DataIteratorItemError: this process's subdirectory is missing (the
        message lists the ones present, e.g. written by another host count).
    """
    if args is None or args.iterator is None:
      raise ValueError("DataIteratorRestore(iterator) is required: the position "
                       "is restored into the iterator.")
    root = os.fspath(directory)
    target = os.path.join(root, process_dir_name())
    if not os.path.isdir(target):
      present = sorted(os.listdir(root)) if os.path.isdir(root) else []
      other_count = any(name.startswith("process_") for name in present)
      raise DataIteratorItemError(
          f"No data position for this process ({process_dir_name()}) in {root}; "
          f"it holds {present or 'nothing'}."
          + (" The run was saved by another number of processes: resume with "
             "that many (every process reads its own input shard)."
             if other_count else ""),
          config_mismatch=other_count)
    args.iterator.restore(target)
    return args.iterator.get_state()


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  """``iterator``: has ``save(directory)`` (and ``get_state()``)."""
  iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  """``iterator``: has ``restore(directory)``; restored in place."""
  iterator: Any = None

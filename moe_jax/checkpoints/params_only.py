"""Params-only Orbax checkpoints: reading a run's stored params, writing new ones.

A params-only checkpoint is an Orbax pytree ``{"params": params}`` in one
directory; ``moe-eval --gin.CHECKPOINT_PATH=DIR`` (and every other reader
built on :func:`moe_jax.checkpoints.restore.restore_params`) loads it like a
train state's step directory. ``moe-prune`` and ``moe-average`` write them.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from moe_jax.checkpoints import restore, tree_paths


def save_params_checkpoint(path: str, params: Any) -> str:
  """Writes ``{"params": params}`` as an Orbax pytree at ``path``; returns the
  absolute path. Orbax writes under a temporary name and renames the
  directory when every array is on disk, so a crash leaves no ``path`` that
  reads as a checkpoint."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, {"params": params}, force=True)
  ckptr.wait_until_finished()
  return path


def read_stored_params(path: str) -> tuple[dict[str, np.ndarray], str]:
  """``({slash path: numpy array}, item dir)``: the params of a checkpoint
  exactly as stored (stored dtypes; a scanned stack stays stacked).

  ``path``: a train state's step directory, its ``state`` item, a run
  directory (its latest step) or a params-only checkpoint.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import SingleDeviceSharding  # pylint: disable=g-import-not-at-top
  item_dir = restore.resolve_state_dir(path)
  stored = {k[len("params/"):]: m for k, m in restore.stored_metadata(item_dir).items()
            if k.startswith("params/")}
  if not stored:
    raise restore.CheckpointMismatchError(
        f"The checkpoint at {item_dir} has no 'params' subtree: it is neither a "
        "moe-train state nor a params-only checkpoint.")
  device = SingleDeviceSharding(jax.local_devices()[0])
  names = sorted(stored)
  abstract = {n: jax.ShapeDtypeStruct(tuple(stored[n].shape), stored[n].dtype)
              for n in names}
  loaded = restore.restore_params(item_dir, abstract, {n: device for n in names})
  return {n: np.asarray(loaded[n]) for n in names}, item_dir


def unflatten(flat: dict[str, Any]) -> dict:
  """``{"a/b": x}`` -> ``{"a": {"b": x}}``."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return traverse_util.unflatten_dict(flat, sep=tree_paths.SEP)

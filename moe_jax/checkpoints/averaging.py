"""Checkpoint averaging: the element-wise mean of several checkpoints' params.

The mean of the last few checkpoints of a run (Vaswani et al. 2017 average
the last 5 or 20; fairseq's ``average_checkpoints.py``) is a cheap ensemble
that usually decodes a little better than any one of them. Only the params
are averaged; the result is a params-only checkpoint
(:mod:`moe_jax.checkpoints.params_only`) for ``moe-eval``/``moe-infer`` or
as a finetuning start, not a train state to resume.

Every checkpoint must hold the same parameters with the same shapes and
dtypes (one run, or runs of one model); anything else is refused, naming the
parameter. Floating-point leaves are averaged in float64 and stored back in
their dtype; integer leaves must be equal in every checkpoint.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from moe_jax.checkpoints import params_only, restore
from moe_jax.checkpoints.restore import CheckpointMismatchError


def run_steps(model_dir: str) -> list[int]:
  """Steps of ``model_dir`` with a committed checkpoint, ascending."""
  return restore.committed_steps(model_dir) if os.path.isdir(model_dir) else []


def choose_steps(model_dir: str, last: int = 0, steps: Sequence[int] = ()) -> list[int]:
  """The steps to average: ``steps`` (each must be saved) or the ``last`` saved.

  Raises:
    ValueError: neither or both given, a step not saved, fewer than ``last``
      saved (the message lists what the run has).
  """
  saved = run_steps(model_dir)
  if bool(last) == bool(steps):
    raise ValueError("Give the number of last checkpoints to average (--last=N) "
                     "or the steps (--steps=3000,3500), not both or neither.")
  if steps:
    missing = sorted(set(steps) - set(saved))
    if missing:
      raise ValueError(f"{model_dir} has no committed checkpoint for steps {missing}; "
                       f"it has {saved}.")
    return sorted(set(steps))
  if last < 1 or len(saved) < last:
    raise ValueError(f"Asked to average the last {last} checkpoints of {model_dir}, "
                     f"which has {len(saved)} committed: {saved}. Lower --last or keep "
                     "more checkpoints (train.keep_checkpoints).")
  return saved[-last:]


def _is_float(x: np.ndarray) -> bool:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return bool(jnp.issubdtype(x.dtype, jnp.floating))  # bfloat16 too (numpy: no)


def average_params(paths: Sequence[str]) -> dict[str, np.ndarray]:
  """``{slash path: mean array}`` of the params of the checkpoints at ``paths``.

  One checkpoint's params and the running float64 sum are in host memory at
  a time.

  Raises:
    CheckpointMismatchError: a parameter missing from one checkpoint, or with
      another shape or dtype, or an integer leaf that differs.
  """
  if not paths:
    raise ValueError("No checkpoints to average.")
  total: dict[str, np.ndarray] = {}
  first: dict[str, np.ndarray] = {}
  for i, path in enumerate(paths):
    params, _ = params_only.read_stored_params(path)
    if i == 0:
      first = dict(params)
      total = {n: v.astype(np.float64) for n, v in params.items() if _is_float(v)}
      continue
    missing, extra = sorted(set(first) - set(params)), sorted(set(params) - set(first))
    if missing or extra:
      raise CheckpointMismatchError(
          f"{path} does not hold the parameters of {paths[0]}: missing {missing[:5]}, "
          f"extra {extra[:5]}. Average checkpoints of one model only.")
    for name, value in params.items():
      ref = first[name]
      if value.shape != ref.shape or value.dtype != ref.dtype:
        raise CheckpointMismatchError(
            f"{name}: {path} has {value.dtype}{list(value.shape)}, {paths[0]} has "
            f"{ref.dtype}{list(ref.shape)}. Average checkpoints of one model only.")
      if name in total:
        total[name] += value
      elif not np.array_equal(value, ref):
        raise CheckpointMismatchError(
            f"{name}: the integer parameter differs between {paths[0]} and {path}; "
            "it cannot be averaged.")
  n = len(paths)
  return {name: (total[name] / n).astype(ref.dtype) if name in total else ref
          for name, ref in first.items()}


def write_average(paths: Sequence[str], output: str) -> str:
  """Averages ``paths`` and writes the params-only checkpoint ``output``."""
  return params_only.save_params_checkpoint(
      output, params_only.unflatten(average_params(paths)))


def step_paths(model_dir: str, steps: Sequence[int]) -> list[str]:
  return [os.path.join(model_dir, str(s)) for s in steps]


def describe(model_dir: str, steps: Sequence[int], output: str,
             config: Optional[str]) -> dict:
  """What ``moe-average`` writes to ``OUTPUT/averaging.json``."""
  return {"model_dir": os.path.abspath(model_dir), "steps": list(steps),
          "checkpoint": os.path.abspath(output), "run_config": config}

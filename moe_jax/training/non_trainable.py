"""Non-trainable parameters: state that lives in ``params`` but not in the optimizer.

The auxiliary-loss-free balancing bias of DeepSeek-V3
(``.../moe/expert_bias``, ``layers/selection.py``) is moved by a rule, not by
gradients: after every training step, ``bias += rate * sign(mean_load -
load)``. It is kept among the parameters, so checkpoints, restore, eval,
inference, pruning and upcycling carry it with no extra plumbing, and kept
out of the optimizer:

* :func:`exclude_from_optimizer` wraps the optimizer in
  ``optax.multi_transform`` so these leaves get ``optax.set_to_zero()``: no
  optimizer state (no Adam/Adafactor moments) and no weight decay. Models
  without such leaves keep their optimizer (and its state layout) unchanged.
* Layers report the step as a sown value (``moe_metrics`` entries with
  ``param_update``); :func:`sown_updates` collects them by the path of the
  parameter they move, :func:`apply_updates` adds them after the optimizer
  update. With gradient accumulation the train step averages the
  microbatches' steps.

(MaxText keeps the same bias in a separate variable collection; here it is a
parameter with a frozen optimizer slot, which needs no change to the train
state, the checkpoints or the callers of ``model.apply``.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from moe_jax.layers import moe_metrics as mm

UPDATE_PREFIX = "param_update/"


def _non_trainable_names() -> set[str]:
  return {m.param_update for m in mm.REGISTRY.values() if m.param_update}


def labels(params: Any) -> Any:
  """``"frozen"`` for non-trainable leaves, ``"trainable"`` for the others."""
  names = _non_trainable_names()
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {k: "frozen" if k[-1] in names else "trainable" for k in flat})


def has_non_trainable(params: Any) -> bool:
  names = _non_trainable_names()
  return any(k[-1] in names for k in traverse_util.flatten_dict(params))


def exclude_from_optimizer(tx: optax.GradientTransformation,
                           params: Any) -> optax.GradientTransformation:
  """``tx`` for the trainable leaves, nothing (no state, no decay) for the
  non-trainable ones; ``tx`` itself when there are none."""
  if not has_non_trainable(params):
    return tx
  return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()},
                               labels)


def sown_updates(intermediates: Any) -> dict[str, jax.Array]:
  """``{UPDATE_PREFIX + parameter path: step}`` from the sown intermediates.

  A value sown as ``.../moe/expert_bias_update`` moves the parameter
  ``.../moe/expert_bias`` (same module path; stacked alike under ``nn.scan``).
  """
  targets = {m.name: m.param_update for m in mm.REGISTRY.values() if m.param_update}
  out = {}
  for path, leaf in traverse_util.flatten_dict(intermediates or {}).items():
    if path and path[-1] in targets:
      out[UPDATE_PREFIX + "/".join(path[:-1] + (targets[path[-1]],))] = (
          leaf[0] if isinstance(leaf, tuple) else leaf)
  return out


def is_update(metric_name: str) -> bool:
  """Whether a metric is a sown step of a non-trainable parameter."""
  return metric_name.startswith(UPDATE_PREFIX)


def apply_updates(params: Any, metrics: dict[str, jax.Array]) -> tuple[Any, dict]:
  """``(params moved by the sown steps, metrics without them)``.

  Raises:
    ValueError: a step for a parameter the model does not have.
  """
  steps = {k[len(UPDATE_PREFIX):]: v for k, v in metrics.items()
           if k.startswith(UPDATE_PREFIX)}
  if not steps:
    return params, metrics
  flat = traverse_util.flatten_dict(params, sep="/")
  for name, step in steps.items():
    if name not in flat:
      raise ValueError(f"A layer reported a step for the parameter {name!r}, which "
                       "the model does not have.")
    flat[name] = (flat[name] + step.astype(jnp.float32)).astype(flat[name].dtype)
  rest = {k: v for k, v in metrics.items() if not k.startswith(UPDATE_PREFIX)}
  return traverse_util.unflatten_dict(flat, sep="/"), rest


"""Parameter counts: total, and *active* per token (the MFU numerator).

An expert weight is found by its logical axes, not its name or shape: the
dimension named ``expert`` holds the experts of one layer, of which a token
reaches ``k`` (``num_selected_experts`` of *that stack's* MoE config, so
encoder and decoder may differ); bi-level routing's ``expert_outer``
dimension holds groups of which a token reaches one. So a leaf of size ``n``
with an ``expert`` axis of size ``E`` counts ``n * k / E``, one that also has
an ``expert_outer`` axis of size ``G`` counts ``n * k / (E * G)``; scanned
stacks (a leading layer axis) and pyramid layouts (``E`` per layer) need no
special case. For experts-choose routing ``k`` is the average number of
experts a token reaches (``MoeConfig.num_selected_experts``); for the
dense-to-sparse gate it is eval's top-k (training reaches more).
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import PartitionSpec

EXPERT_AXIS = "expert"
EXPERT_GROUP_AXIS = "expert_outer"  # bi-level routing's outer level (layers/bilevel.py)
STACKS = ("encoder", "decoder")


def _leaves_with_axes(params: Any, param_axes: Any):
  """``(top-level name, leaf, logical axis names)`` per parameter."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  axes = jax.tree_util.tree_leaves(
      param_axes, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)
  if len(axes) != len(leaves):
    raise ValueError(f"param_axes has {len(axes)} leaves but params {len(leaves)}; "
                     "pass the axes of the same params tree (StateLayout.param_axes).")
  for (path, leaf), names in zip(leaves, axes):
    top = jax.tree_util.keystr(path[:1], simple=True) if path else ""
    yield top, leaf, tuple(names or ())


def active_fraction(shape: tuple[int, ...], axes: tuple, k: int) -> float:
  """Share of a leaf a token passes through (1 for non-expert weights)."""
  fraction = 1.0
  for size, name in zip(shape, axes):
    if name == EXPERT_AXIS:
      fraction *= min(1.0, k / size)
    elif name == EXPERT_GROUP_AXIS:
      fraction /= size
  return fraction


def by_stack(params: Any, param_axes: Any, model_config: Any) -> dict[str, dict[str, int]]:
  """``{"encoder"|"decoder"|"shared": {"total": n, "active": n}}``.

  Args:
    params: params tree (leaves need ``.shape``: arrays or ShapeDtypeStructs).
    param_axes: the same tree's logical axis names
      (:attr:`moe_jax.training.train_state.StateLayout.param_axes`).
    model_config: the ``T5Config`` (its ``stack_moe`` gives each stack's ``k``).
  """
  out = {s: {"total": 0, "active": 0.0} for s in STACKS + ("shared",)}
  for top, leaf, axes in _leaves_with_axes(params, param_axes):
    stack = top if top in STACKS else "shared"
    moe = model_config.stack_moe(stack) if stack in STACKS else None
    size = math.prod(leaf.shape)
    k = moe.num_selected_experts if moe is not None else 1
    out[stack]["total"] += size
    out[stack]["active"] += size * active_fraction(tuple(leaf.shape), axes, k)
  return {s: {"total": c["total"], "active": int(round(c["active"]))}
          for s, c in out.items()}


def total(params: Any) -> int:
  """Number of parameters."""
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def active(params: Any, param_axes: Any, model_config: Any) -> int:
  """Parameters a token passes through, over the whole model (module docstring)."""
  return sum(c["active"] for c in by_stack(params, param_axes, model_config).values())


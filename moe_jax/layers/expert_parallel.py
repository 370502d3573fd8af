"""Mesh axes of expert parallelism, read from the logical-axis rules.

The ``shard_map`` computes (dropless, local experts) need literal mesh axis
names for their specs and collectives. They come from the active logical
rules (``nn.logical_axis_rules``; the project's standard rules when none are
active), so a user who maps ``expert`` or ``mlp`` elsewhere gets consistent
programs:

* ``batch``  -- mesh axes of the logical ``batch`` axis (tokens);
* ``expert`` -- mesh axes of the logical ``expert`` axis (expert weights);
* ``model``  -- mesh axes of the logical ``mlp`` axis (expert hidden units).

Expert weights enter ``shard_map`` with ``embed`` replicated (an FSDP-sharded
``embed`` is gathered at the boundary, as the dense path gathers it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from moe_jax import partitioning


def mesh_axes(rules, logical: str, default=()) -> tuple[str, ...]:
  """The mesh axes the first rule for ``logical`` maps it to (a tuple, maybe
  empty); ``default`` when no rule names it."""
  for name, axes in rules:
    if name == logical:
      if axes is None:
        return ()
      return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)
  return tuple(default)


@dataclasses.dataclass(frozen=True)
class ExpertParallelAxes:
  """Mesh axes (tuples of names, possibly empty) of tokens, experts, hidden."""
  batch: tuple[str, ...]
  expert: tuple[str, ...]
  model: tuple[str, ...]

  @classmethod
  def from_rules(cls, rules=None) -> "ExpertParallelAxes":
    rules = rules or nn.get_logical_axis_rules() or partitioning.standard_logical_rules()
    return cls(mesh_axes(rules, "batch"), mesh_axes(rules, "expert"),
               mesh_axes(rules, "mlp"))

  def sizes(self, mesh: Optional[Any]) -> tuple[int, int]:
    """``(expert shards, model shards)`` on ``mesh``."""
    return (partitioning.mesh_axis_size(mesh, self.expert),
            partitioning.mesh_axis_size(mesh, self.model))

  def token_spec(self) -> P:
    """Spec of per-token arrays ``[T, ...]``: tokens over the batch axes."""
    return P(self.collective_axis(self.batch), None)

  def weight_specs(self, weights: dict) -> dict:
    """Specs of stacked expert weights: experts over ``expert``, hidden over
    ``model`` (``wi*``: [E, D, F]; ``wo``: [E, F, D])."""
    expert, model = self.collective_axis(self.expert), self.collective_axis(self.model)
    return {name: (P(expert, model, None) if name == "wo" else P(expert, None, model))
            for name in weights}

  @staticmethod
  def collective_axis(axes: tuple[str, ...]):
    """One spec entry / ``lax`` axis-name argument: None, a name or a tuple."""
    if not axes:
      return None
    return axes[0] if len(axes) == 1 else axes


def platform(mesh: Optional[Any]) -> str:
  """Platform (``"cpu"``, ``"tpu"``, ``"gpu"``) of ``mesh``'s devices.

  Kernels and strategies are chosen by this, not ``jax.default_backend()``:
  under ``moe-compile`` the default backend is the host CPU while the program
  being compiled is a TPU's. Without a mesh: the default backend.
  """
  if mesh is None:
    return jax.default_backend()
  device = getattr(mesh, "abstract_device", None)
  if device is not None and getattr(device, "platform", None):
    return device.platform
  return mesh.devices.flat[0].platform

"""Device mesh construction and logical-axis partitioning rules.

Every parameter and activation in moe_jax carries *logical* axis names
(``batch``, ``length``, ``embed``, ``mlp``, ``heads``, ``kv``, ``vocab``,
``expert``, ``expert_group``, ``unmodeled``). A table of rules maps them onto
the four *mesh* axes ``data``, ``fsdp``, ``expert``, ``model``. ``jax.jit``
with the resulting ``NamedSharding``s lets XLA insert every collective,
including the expert-parallel all-to-all.

The mesh axes play these roles:

* ``data``   -- pure data parallelism (params replicated).
* ``fsdp``   -- data parallelism whose large non-expert weights are sharded
  (ZeRO-3 / FSDP); gathered per layer by XLA.
* ``expert`` -- expert parallelism. Non-expert layers are *also* data-parallel
  over this axis, so activations are batch-sharded over
  ``('data', 'fsdp', 'expert')``; expert weights shard their leading expert
  dimension over it. Token groups move from batch-sharded (logical
  ``batch``) to expert-sharded (logical ``expert``, with the group dimension
  ``expert_group`` over ``('data', 'fsdp')``): that reshard is the all-to-all.
* ``model``  -- tensor (Megatron) parallelism over ``mlp``/``heads``/``vocab``.

This module imports nothing from the model code.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "model")
BATCH_MESH_AXES = ("data", "fsdp", "expert")

LogicalRules = Sequence[tuple[str, Any]]


def standard_logical_rules(fsdp_params: bool = True) -> tuple[tuple[str, Any], ...]:
  """The default logical -> mesh axis rules.

  Args:
    fsdp_params: shard the ``embed`` dimension of non-expert weights over the
      ``fsdp`` mesh axis (FSDP). Activations are unaffected: their batch
      dimension claims ``fsdp`` first, and a mesh axis is used once per array.

  Order matters: flax assigns each mesh axis to the first logical axis (in
  rule order) of an array that asks for it, so ``batch`` precedes ``embed``.
  """
  rules = [
      ("batch", BATCH_MESH_AXES),
      ("expert", "expert"),
      # Bi-level routing (layers/bilevel.py): the outer expert level lives on
      # the outermost (cross-host / dcn) mesh axis.
      ("expert_outer", "data"),
      ("expert_group", ("data", "fsdp")),
      ("vocab", "model"),
      ("mlp", "model"),
      ("heads", "model"),
      ("kv", None),
      ("length", None),
      ("unmodeled", None),
  ]
  rules.append(("embed", "fsdp" if fsdp_params else None))
  return tuple(rules)


def _as_tuple(x) -> tuple:
  if x is None:
    return ()
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def make_mesh(
    axis_sizes: Optional[Mapping[str, int]] = None,
    devices: Optional[Sequence[jax.Device]] = None,
    dcn_axis_sizes: Optional[Mapping[str, int]] = None,
) -> Mesh:
  """Builds a 4-axis ``('data', 'fsdp', 'expert', 'model')`` mesh.

  Args:
    axis_sizes: sizes per mesh axis (within a slice / host group); missing
      axes are 1. At most one axis may be ``-1``, meaning "all remaining
      devices".
    devices: devices to use (default: ``jax.devices()``).
    dcn_axis_sizes: multi-slice sizes per axis (across slices over the data
      center network). The full size of an axis is ``ici * dcn``.

  Returns:
    A mesh with ``AxisType.Auto`` axes (GSPMD-style sharding propagation).

  Raises:
    ValueError: unknown axis names, or sizes that do not multiply to the
      device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  axis_sizes = dict(axis_sizes or {})
  dcn_axis_sizes = dict(dcn_axis_sizes or {})
  for name in list(axis_sizes) + list(dcn_axis_sizes):
    if name not in MESH_AXES:
      raise ValueError(
          f"Unknown mesh axis {name!r}; the mesh axes are {MESH_AXES}.")
  dcn = [int(dcn_axis_sizes.get(a, 1)) for a in MESH_AXES]
  n_dcn = math.prod(dcn)
  if len(devices) % n_dcn:
    raise ValueError(
        f"dcn mesh sizes {dict(zip(MESH_AXES, dcn))} multiply to {n_dcn}, "
        f"which does not divide the {len(devices)} devices.")
  per_slice = len(devices) // n_dcn
  ici = [int(axis_sizes.get(a, 1)) for a in MESH_AXES]
  if ici.count(-1) > 1:
    raise ValueError("At most one mesh axis size may be -1.")
  if -1 in ici:
    known = math.prod(s for s in ici if s != -1)
    if per_slice % known:
      raise ValueError(
          f"Mesh sizes {dict(zip(MESH_AXES, ici))} cannot fill {per_slice} "
          "devices per slice.")
    ici[ici.index(-1)] = per_slice // known
  if math.prod(ici) != per_slice:
    raise ValueError(
        f"Mesh axis sizes {dict(zip(MESH_AXES, ici))} multiply to "
        f"{math.prod(ici)} but there are {per_slice} devices"
        + (f" per slice ({len(devices)} in {n_dcn} slices)" if n_dcn > 1 else "")
        + ". Change the sizes (e.g. --gin.MESH_DATA=...) so their product is "
        f"{per_slice}, or set one of them to -1.")
  shape = [i * d for i, d in zip(ici, dcn)]
  if n_dcn > 1:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    try:
      dev_array = mesh_utils.create_hybrid_device_mesh(
          ici, dcn, devices=devices, allow_split_physical_axes=True)
    except (ValueError, AttributeError, TypeError):
      dev_array = np.asarray(devices).reshape(shape)
  else:
    try:
      from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
      dev_array = mesh_utils.create_device_mesh(
          shape, devices=devices, allow_split_physical_axes=True)
    except Exception:  # pylint: disable=broad-except
      dev_array = np.asarray(devices).reshape(shape)
  return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def parse_mesh_spec(spec: str) -> dict[str, int]:
  """Parses ``"data=2,expert=4"`` into ``{'data': 2, 'expert': 4}``."""
  out = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    if "=" not in part:
      raise ValueError(f"Mesh spec part {part!r} must look like 'expert=4'.")
    k, v = part.split("=", 1)
    out[k.strip()] = int(v)
  return out


def mesh_axis_size(mesh: Optional[Any], axes) -> int:
  """Product of the sizes of ``axes`` (names or tuple of names) in ``mesh``."""
  if mesh is None:
    return 1
  shape = dict(mesh.shape)
  return math.prod(shape.get(a, 1) for a in _as_tuple(axes))


def current_mesh() -> Optional[Any]:
  """The mesh set by ``with mesh:``/``jax.set_mesh``, or ``None``."""
  try:
    m = jax.sharding.get_abstract_mesh()
    if m is not None and not m.empty:
      return m
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    from jax._src import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
    m = mesh_lib.thread_resources.env.physical_mesh
    if m is not None and not m.empty:
      return m
  except Exception:  # pylint: disable=broad-except
    pass
  return None


def logical_to_spec(logical_axes: Sequence[Optional[str]],
                    rules: LogicalRules) -> P:
  """Maps logical axis names to a ``PartitionSpec`` with the given rules."""
  return nn.logical_to_mesh_axes(tuple(logical_axes), rules)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[Optional[str]],
                     rules: LogicalRules) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, rules))


def params_shardings(mesh: Mesh, abstract_variables: Any,
                     rules: LogicalRules) -> Any:
  """``NamedSharding`` tree for a (possibly boxed) flax variable tree.

  ``abstract_variables`` is typically ``jax.eval_shape(model.init, ...)``; its
  leaves may be ``nn.LogicallyPartitioned`` boxes (from
  ``nn.with_logical_partitioning``) or plain arrays (replicated).
  The returned tree has the structure of ``nn.unbox(abstract_variables)``.
  """
  specs = nn.get_partition_spec(abstract_variables)
  specs = nn.logical_to_mesh(specs, rules)

  def to_sharding(spec):
    return NamedSharding(mesh, spec if isinstance(spec, P) else P())

  return jax.tree_util.tree_map(
      to_sharding, specs, is_leaf=lambda x: isinstance(x, P) or x is None)


@contextlib.contextmanager
def axis_rules(rules: LogicalRules):
  """Context in which ``nn.with_logical_constraint`` uses ``rules``."""
  with nn.logical_axis_rules(rules):
    yield


def with_sharding(mesh: Mesh, rules: LogicalRules):
  """Context manager: the mesh *and* logical rules active together."""
  stack = contextlib.ExitStack()
  stack.enter_context(jax.sharding.use_mesh(mesh) if hasattr(jax.sharding, "use_mesh")
                      else jax.set_mesh(mesh))
  stack.enter_context(nn.logical_axis_rules(rules))
  return stack

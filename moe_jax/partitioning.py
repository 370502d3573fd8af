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
  With ``zero_sharding`` (:func:`standard_logical_rules`) the non-expert
  weights -- and with them their optimizer state -- are sharded over *all*
  batch axes ``('data', 'fsdp', 'expert')`` instead (ZeRO-3 over every
  data-parallel replica), gathered per layer; expert weights stay on
  ``expert`` (and ``fsdp``).
* ``expert`` -- expert parallelism. Non-expert layers are *also* data-parallel
  over this axis, so activations are batch-sharded over
  ``('data', 'fsdp', 'expert')``; expert weights shard their leading expert
  dimension over it. Token groups move from batch-sharded (logical
  ``batch``) to expert-sharded (logical ``expert``, with the group dimension
  ``expert_group`` over ``('data', 'fsdp')``): that reshard is the all-to-all.
* ``model``  -- tensor (Megatron) parallelism over ``mlp``/``heads``/``vocab``.

:class:`Partitioner` carries the mesh and its rules as one object, with the
shardings derived from them (a batch's, a parameter tree's); programs build
it once and pass it where both are needed.

This module imports nothing from the model code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "model")
BATCH_MESH_AXES = ("data", "fsdp", "expert")

LogicalRules = Sequence[tuple[str, Any]]


def standard_logical_rules(fsdp_params: bool = True,
                           zero_sharding: bool = False) -> tuple[tuple[str, Any], ...]:
  """The default logical -> mesh axis rules.

  Args:
    fsdp_params: shard the ``embed`` dimension of non-expert weights over the
      ``fsdp`` mesh axis (FSDP). Activations are unaffected: their batch
      dimension claims ``fsdp`` first, and a mesh axis is used once per array.
    zero_sharding: shard the ``embed`` dimension of non-expert weights over
      every batch axis ``('data', 'fsdp', 'expert')`` (ZeRO-3: no replica
      keeps a whole copy of them or of their optimizer state; XLA gathers
      each layer's weights before use). Expert weights ``[expert, embed,
      mlp]`` have ``expert`` taken already, so that rule does not apply to
      them and their ``embed`` falls through to ``fsdp`` (with
      ``fsdp_params``). Activations are unaffected, as above.

  Order matters: flax assigns each mesh axis to the first logical axis (in
  rule order) of an array that asks for it, so ``batch`` precedes ``embed``;
  of two rules for one logical axis the first whose mesh axes are all
  still free applies.
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
  if zero_sharding:
    rules.append(("embed", BATCH_MESH_AXES))
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


def abstract_params(module: nn.Module, mesh: Mesh, rules: LogicalRules,
                    *inputs: Any) -> Any:
  """``module.init(key, *inputs)``'s variables as ``jax.ShapeDtypeStruct``
  leaves carrying their ``NamedSharding`` (no arrays are made): what lowering
  for a mesh of compile-only devices needs, where no eager op can run."""
  key = jax.random.key(1)  # eager, so outside the mesh (compile-only devices cannot run it)
  with with_sharding(mesh, rules):
    boxed = jax.eval_shape(module.init, key, *inputs)
  shardings = params_shardings(mesh, boxed, rules)
  return jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      nn.unbox(boxed), shardings)


def with_sharding(mesh: Mesh, rules: LogicalRules):
  """Context manager: the mesh *and* logical rules active together."""
  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(mesh))
  stack.enter_context(nn.logical_axis_rules(rules))
  return stack


@dataclasses.dataclass(frozen=True)
class Partitioner:
  """A device mesh, its logical-axis rules, and the shardings they give.

  Attributes:
    mesh: the ``('data', 'fsdp', 'expert', 'model')`` mesh (:func:`make_mesh`).
    rules: logical -> mesh axis rules (:func:`standard_logical_rules`).
  """
  mesh: Mesh
  rules: tuple

  def __post_init__(self):
    object.__setattr__(self, "rules", tuple(tuple(r) for r in self.rules))

  @classmethod
  def create(cls, mesh_shape: Optional[Mapping[str, int]] = None,
             dcn_mesh_shape: Optional[Mapping[str, int]] = None,
             devices: Optional[Sequence[jax.Device]] = None,
             fsdp_params: bool = True,
             zero_sharding: bool = False) -> "Partitioner":
    """:func:`make_mesh` (default: every device on ``data``) + the standard rules
    (``fsdp_params``, ``zero_sharding``: :func:`standard_logical_rules`).

    Raises:
      ValueError: mesh sizes that do not fit the devices (from :func:`make_mesh`).
    """
    mesh = make_mesh(mesh_shape or {"data": -1}, devices=devices,
                     dcn_axis_sizes=dcn_mesh_shape)
    return cls(mesh, standard_logical_rules(fsdp_params=fsdp_params,
                                            zero_sharding=zero_sharding))

  def activate(self):
    """Context manager: the mesh and the rules active (:func:`with_sharding`)."""
    return with_sharding(self.mesh, self.rules)

  def sharding(self, logical_axes: Sequence[Optional[str]]) -> NamedSharding:
    """``NamedSharding`` of an array with these logical axis names."""
    return logical_sharding(self.mesh, logical_axes, self.rules)

  @property
  def zero_sharding(self) -> bool:
    """Whether the rules shard non-expert weights over every batch axis."""
    return ("embed", BATCH_MESH_AXES) in self.rules

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch_sharding(self) -> NamedSharding:
    """A batch's sharding: leading (logical ``batch``) dimension over the batch
    mesh axes (``data``, ``fsdp``, ``expert``), the others replicated; fits
    any rank."""
    return self.sharding(("batch",))

  @property
  def num_batch_shards(self) -> int:
    """How many shards the batch dimension is split into."""
    spec = self.batch_sharding.spec
    return mesh_axis_size(self.mesh, spec[0] if len(spec) else None)

  def global_batch(self, local_batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """This process's rows -> global batch-sharded ``jax.Array`` per feature.

    Each process passes its own ``<int>[rows, ...]`` (the same ``rows`` on
    every process); the result is ``<int>[rows * processes, ...]``.

    Raises:
      ValueError: the global batch does not divide over the batch shards.
    """
    sharding = self.batch_sharding
    out = {}
    for name, value in local_batch.items():
      value = np.asarray(value)
      rows = value.shape[0] * jax.process_count()
      if rows % self.num_batch_shards:
        raise ValueError(
            f"Feature {name!r}: global batch {rows} is not divisible by the "
            f"{self.num_batch_shards} batch shards of the mesh {dict(self.mesh.shape)}; "
            "make the batch size a multiple of data*fsdp*expert.")
      out[name] = jax.make_array_from_process_local_data(sharding, value)
    return out

  def params_shardings(self, abstract_variables: Any) -> Any:
    """:func:`params_shardings` of a (boxed) variable tree on this mesh."""
    return params_shardings(self.mesh, abstract_variables, self.rules)

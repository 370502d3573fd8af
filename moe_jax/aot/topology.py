"""TPU topology names -> topology descriptors -> compile-only devices.

Names follow Cloud TPU's accelerator types, whose number counts TensorCores
for generations with two per chip (v4, v5p: ``v5p-128`` is 64 chips) and
chips for those with one (v5e, v6e: ``v5litepod-16`` / ``v5e-16`` and
``v6e-256`` are 16 and 256 chips). An explicit ``generation:shape``
(``v5p:4x4x4``, ``v5e:4x4``) names the chip grid directly.

:func:`parse` gives a :class:`Topology`; :func:`compile_only_devices` asks
libtpu (``jax.experimental.topologies``) for one compile-only device per chip
-- no TPU needed -- over ``num_slices`` slices (multi-slice: the slices talk
over the data-center network, the ``DCN_MESH_*`` axes).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

from moe_jax.aot import chips, platforms

INSTALL_HINT = ('pip install -e ".[tpu]"  (or: pip install "jax[tpu]==0.10.2"); '
                "no TPU is needed, libtpu compiles for TPUs on any Linux machine")


class TopologyError(ValueError):
  """A topology name that cannot be resolved; the message says what to type."""


class LibtpuMissingError(RuntimeError):
  """libtpu is not installed; the message says how to install it."""


@dataclasses.dataclass(frozen=True)
class Topology:
  """A slice shape of one TPU generation, repeated over ``num_slices`` slices.

  Attributes:
    chip: the generation's :class:`~moe_jax.aot.chips.ChipSpec`.
    shape: chips along each torus dimension, e.g. ``(4, 4, 4)``.
    num_slices: identical slices joined over the data-center network.
  """
  chip: chips.ChipSpec
  shape: tuple[int, ...]
  num_slices: int = 1

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.shape)

  @property
  def num_chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def name(self) -> str:
    """libtpu's topology name, e.g. ``"v5p:4x4x4"``."""
    return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"

  @property
  def accelerator_type(self) -> str:
    """Cloud TPU's accelerator type of one slice, e.g. ``"v5p-128"``."""
    prefix = "v5litepod" if self.chip.generation == "v5e" else self.chip.generation
    return f"{prefix}-{self.chips_per_slice * self.chip.cores_per_chip}"

  def describe(self) -> str:
    """``"v5p-128 (v5p:4x4x4, 64 chips)"``, with ``" x 2 slices"`` when multi-slice."""
    chips_text = "1 chip" if self.chips_per_slice == 1 else f"{self.chips_per_slice} chips"
    text = f"{self.accelerator_type} ({self.name}, {chips_text})"
    if self.num_slices > 1:
      text += f" x {self.num_slices} slices = {self.num_chips} chips"
    return text


def default_shape(num_chips: int, dims: int) -> tuple[int, ...]:
  """Cloud TPU's default slice shape for ``num_chips`` chips.

  3D tori (v4, v5p) start at ``2x2x1`` (4 chips) and double one dimension at
  a time, keeping the shape as cubic as possible (``2x2x2``, ``2x2x4``,
  ``2x4x4``, ``4x4x4``, ``4x4x8`` ...); 2D tori (v5e, v6e) are ``1x1``,
  ``2x2``, ``2x4``, ``4x4``, ``4x8`` ... ``16x16``.

  Raises:
    TopologyError: a chip count with no default shape (not a power of two,
      or under 4 chips on a 3D torus); the message says to give the shape.
  """
  power = num_chips >= 1 and (num_chips & (num_chips - 1)) == 0
  if not power or (dims == 3 and num_chips < 4):
    example = "v5p:16x16x24" if dims == 3 else "v5e:4x8"
    raise TopologyError(
        f"{num_chips} chips have no default {dims}D slice shape; give the shape "
        f"explicitly, e.g. --topology={example}.")
  if dims == 2:
    a = 2 ** (int(math.log2(num_chips)) // 2)
    return (a, num_chips // a)
  if num_chips == 4:
    return (2, 2, 1)
  shape = [1, 2, 2]
  while math.prod(shape) < num_chips:
    if len(set(shape)) == 1:
      shape[-1] *= 2
    else:
      i = max(j for j, s in enumerate(shape) if s < max(shape))
      shape[i] *= 2
  return tuple(shape)


def parse(name: str, num_slices: int = 1) -> Topology:
  """Resolves ``--topology`` (and ``--num_slices``).

  Args:
    name: an accelerator type (``v4-32``, ``v5litepod-16``, ``v5e-16``,
      ``v5p-128``, ``v6e-256``) or ``generation:shape`` (``v5p:4x4x4``).
    num_slices: identical slices (multi-slice), >= 1.

  Raises:
    TopologyError: what is wrong with the name and what to type instead.
  """
  text = name.strip().lower()
  if num_slices < 1:
    raise TopologyError(f"--num_slices={num_slices} must be >= 1.")
  explicit = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", text)
  typed = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
  if not (explicit or typed):
    raise TopologyError(
        f"--topology={name!r} is not a TPU topology; use an accelerator type "
        "(v4-32, v5litepod-16 / v5e-16, v5p-128, v6e-256) or generation:shape "
        "(v5p:4x4x4, v5e:4x4).")
  match = explicit or typed
  try:
    spec = chips.chip(match.group(1))
  except ValueError as e:
    raise TopologyError(str(e)) from None
  if explicit:
    shape = tuple(int(s) for s in match.group(2).split("x"))
    if len(shape) != spec.dims or min(shape) < 1:
      example = "4x4x4" if spec.dims == 3 else "4x4"
      raise TopologyError(
          f"TPU {spec.generation} slices are {spec.dims}D; write e.g. "
          f"--topology={spec.generation}:{example} (got {name!r}).")
  else:
    count = int(match.group(2))
    if count % spec.cores_per_chip:
      raise TopologyError(
          f"{name!r}: {spec.generation} accelerator types count TensorCores, "
          f"{spec.cores_per_chip} per chip, so the number must be even (e.g. "
          f"{spec.generation}-{count + 1}).")
    shape = default_shape(count // spec.cores_per_chip, spec.dims)
  topo = Topology(spec, shape, num_slices)
  if topo.chips_per_slice > spec.max_slice_chips:
    raise TopologyError(
        f"{name!r} has {topo.chips_per_slice} chips; one {spec.generation} slice "
        f"has at most {spec.max_slice_chips}. Use --num_slices for more chips.")
  return topo


def _topology_kwargs(topo: Topology) -> dict[str, Any]:
  host = tuple(min(s, h) for s, h in zip(topo.shape + (1,) * (3 - len(topo.shape)),
                                         (2, 2, 1)))
  return {"chip_config_name": "megacore" if topo.chip.cores_per_chip == 2 else "default",
          "chips_per_host_bounds": host, "num_slices": topo.num_slices}


def compile_only_devices(topo: Topology) -> Sequence[Any]:
  """One compile-only ``jax.Device`` per chip of ``topo`` (all slices).

  Multi-slice devices carry ``slice_index``, which
  :func:`moe_jax.partitioning.make_mesh` uses for the ``DCN_MESH_*`` axes.

  Raises:
    LibtpuMissingError: libtpu is not installed (the message says how).
    TopologyError: libtpu rejects the topology.
  """
  if not platforms.libtpu_installed():
    raise LibtpuMissingError(f"Compiling for TPUs needs libtpu: {INSTALL_HINT}.")
  platforms.quiet_libtpu_without_tpu(topo.accelerator_type)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.name,
                                        **_topology_kwargs(topo))
  except Exception as e:  # pylint: disable=broad-except  (JaxRuntimeError)
    raise TopologyError(f"libtpu cannot build topology {topo.name} x "
                        f"{topo.num_slices} slice(s): {e}") from e
  devices = list(desc.devices)
  if len(devices) != topo.num_chips:
    raise TopologyError(
        f"libtpu gave {len(devices)} devices for {topo.describe()}; expected one "
        "per chip.")
  return devices

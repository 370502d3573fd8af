"""Host offload of the train state: where each tree lives between steps.

Two switches (gin macros ``OFFLOAD_OPTIMIZER_STATE`` and ``OFFLOAD_PARAMS``,
``runs/pretrain.gin``) put trees of the train state in host memory (memory
kind ``pinned_host``) between steps:

* **optimizer state**: the optax state's arrays rest on the host; the train
  step streams them to the device for the update and back, leaf by leaf
  (XLA overlaps the copies with the update). A leaf is copied whole: with
  ``scan_layers=True`` one leaf is a whole layer stack, so its device copies
  and new values occupy HBM temporaries during the update (measured in
  docs/offload.md). Scalars (step counts) stay on the device.
* **parameters**: the float32 master parameters rest on the host. Layers of
  a ``LayerStack`` fetch their own parameters when they run
  (:mod:`moe_jax.models.host_offload`: per scanned block with
  ``scan_layers=True``, so the expert weights -- the bulk of an MoE model --
  move one block at a time and their gradients go back to host memory as
  the backward pass produces them); the remaining parameters (embeddings,
  final norms, relative position biases) are copied to the device at the
  start of the step. Each layer casts its copy to the compute dtype as it
  would cast a device parameter, so the numbers do not change.

The state's *values* do not depend on where they live: checkpoints store
values, and a restore places them by the current run's shardings, so a run
saved with offload restores without it and vice versa.

A third switch, ``OPTIMIZER_UPDATE_ON_HOST`` (with the optimizer state
offloaded), runs the optimizer update itself on the host CPU
(``jax.experimental.compute_on("device_host")``), as DeepSpeed's
ZeRO-Offload runs CPU-Adam: the gradients go to host memory, the update
reads and writes the host-resident state in place, and only the new
parameters come back (if they rest on the device). The accelerator then
holds no copy of the optimizer state at any point of the step, at the cost
of host compute (elementwise, a few FLOPs per parameter) and the gradient
transfer.

Activation offload is a remat policy (``T5Config.remat_policy="offload"``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
from jax.experimental import compute_on
from jax.sharding import NamedSharding

from moe_jax.models import host_offload

HOST = "pinned_host"
DEVICE = "device"


@dataclasses.dataclass(frozen=True)
class OffloadConfig:
  """Which train-state trees rest in host memory between steps.

  Attributes:
    optimizer_state: the optax state (``OFFLOAD_OPTIMIZER_STATE``).
    params: the parameters (``OFFLOAD_PARAMS``).
    update_on_host: run the optimizer update on the host CPU
      (``OPTIMIZER_UPDATE_ON_HOST``; needs ``optimizer_state``).
  """
  optimizer_state: bool = False
  params: bool = False
  update_on_host: bool = False

  def __post_init__(self):
    if self.update_on_host and not self.optimizer_state:
      raise ValueError(
          "OPTIMIZER_UPDATE_ON_HOST=True updates the optimizer state where it rests, "
          "in host memory; set OFFLOAD_OPTIMIZER_STATE=True too (or turn it off).")

  @property
  def any(self) -> bool:
    return self.optimizer_state or self.params

  def as_dict(self) -> dict[str, bool]:
    """``{"OFFLOAD_OPTIMIZER_STATE": ..., "OFFLOAD_PARAMS": ...,
    "OPTIMIZER_UPDATE_ON_HOST": ...}`` (the macros)."""
    return {"OFFLOAD_OPTIMIZER_STATE": bool(self.optimizer_state),
            "OFFLOAD_PARAMS": bool(self.params),
            "OPTIMIZER_UPDATE_ON_HOST": bool(self.update_on_host)}

  def describe(self) -> str:
    """``"optimizer state, params"``-style list of what is offloaded, or ``"none"``."""
    parts = [name for name, on in (("optimizer state", self.optimizer_state),
                                   ("params", self.params),
                                   ("optimizer update on the host", self.update_on_host))
             if on]
    return ", ".join(parts) or "none"


def check_supported(config: OffloadConfig, devices: Sequence[Any],
                    remat_policy: str = "none") -> None:
  """Raises ``ValueError`` when a switch needs a memory kind ``devices`` lack.

  Args:
    config: the offload switches.
    devices: the mesh's devices.
    remat_policy: ``T5Config.remat_policy`` (``"offload"`` needs host memory
      too).
  """
  wanted = [macro for macro, on in config.as_dict().items() if on]
  if remat_policy == "offload":
    wanted.append("T5Config.remat_policy='offload'")
  if not wanted:
    return
  device = devices[0]
  try:
    kinds = sorted(m.kind for m in device.addressable_memories())
  except Exception:  # pylint: disable=broad-except  (backends without memories)
    kinds = []
  if HOST not in kinds:
    fixes = ", ".join(f"--gin.{w}=False" if w.isupper() else "--gin.T5Config.remat_policy="
                      "\"'none'\"" for w in wanted)
    raise ValueError(
        f"{' and '.join(wanted)} keep(s) arrays in host memory (memory kind {HOST!r}), "
        f"but the {device.platform} devices here offer memory kinds {kinds or 'none'}. "
        f"Turn it off ({fixes}) or run on a backend with host memory (TPU, GPU, CPU).")


def _host_sharding(abstract_leaf: Any, sharding: NamedSharding) -> NamedSharding:
  """Host placement for arrays; scalars (step counts) stay on the device."""
  if not getattr(abstract_leaf, "ndim", 0):
    return sharding
  return sharding.with_memory_kind(HOST)


def host_shardings(abstract: Any, shardings: Any) -> Any:
  """``shardings`` with every non-scalar leaf in host memory (``pinned_host``)."""
  return jax.tree_util.tree_map(_host_sharding, abstract, shardings)


def device_shardings(shardings: Any) -> Any:
  """``shardings`` with every leaf in device memory."""
  return jax.tree_util.tree_map(lambda s: s.with_memory_kind(DEVICE), shardings)


def to_device(tree: Any) -> Any:
  """Inside a jitted step: every host-memory leaf copied to the device."""
  return host_offload.fetch_if_host(tree)


def place_like(new: Any, old: Any) -> Any:
  """Inside a jitted step: each leaf of ``new`` moved to the memory space of
  the matching leaf of ``old`` (host or device) where it is not there yet."""
  def place(n, o):
    if host_offload.on_host(n) == host_offload.on_host(o):
      return n
    return jax.device_put(n, jax.memory.Space.Host if host_offload.on_host(o)
                          else jax.memory.Space.Device)
  return jax.tree_util.tree_map(place, new, old)


def on_host_cpu(fn, *trees):
  """Inside a jitted step: ``fn(*trees)`` computed by the host CPU.

  Every leaf of ``trees`` is moved to host memory first (leaves already
  there are not copied); ``fn``'s outputs are in host memory.
  """
  to_host = lambda x: x if host_offload.on_host(x) else jax.device_put(
      x, jax.memory.Space.Host)
  trees = jax.tree_util.tree_map(to_host, trees)
  try:
    with compute_on.compute_on("device_host"):
      return jax.jit(fn)(*trees)
  except ValueError as e:
    if "memory_space" not in str(e):
      raise
    raise ValueError(
        "OPTIMIZER_UPDATE_ON_HOST=True: this optimizer's update makes device "
        "constants (e.g. jnp.where/zeros) that JAX cannot mix with host-memory "
        f"arrays ({str(e).splitlines()[0]}). AdamW/Adam/SGD updates run on the host; "
        "use --gin.make_optimizer.name=\"'adamw'\" or --gin.OPTIMIZER_UPDATE_ON_HOST=False."
    ) from e


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def params_for_model(params: Any) -> Any:
  """Inside a jitted step: the params to apply the model with.

  Host leaves outside the layer stacks are copied to the device; host
  leaves inside them stay on the host for the layers to fetch
  (:func:`moe_jax.models.host_offload.is_streamed`). Device leaves are
  returned as they are.
  """
  def place(path, x):
    if host_offload.on_host(x) and not host_offload.is_streamed(_names(path)):
      return jax.device_put(x, jax.memory.Space.Device)
    return x
  return jax.tree_util.tree_map_with_path(place, params)

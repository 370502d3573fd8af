"""Keep CPU-only runs from probing for TPUs when libtpu is installed.

With libtpu installed (``pip install -e ".[tpu]"``, for ``moe-compile``) and
``JAX_PLATFORMS`` unset, jax tries to start a TPU backend on first use even
on a machine with no TPU: libtpu prints start-up errors and the first
``jax.devices()`` takes longer. :func:`default_to_cpu_without_accelerators`
sets ``JAX_PLATFORMS=cpu`` in exactly that case -- libtpu importable, no TPU
chip on the PCI bus, no GPU device node, ``JAX_PLATFORMS`` unset -- so every
entry point (``moe-train`` on CPU, the benchmarks) behaves as it did without
libtpu. On a TPU or GPU machine, or when ``JAX_PLATFORMS`` is set (even to
``""``), nothing changes.

This module imports nothing from jax: it runs from ``moe_jax/__init__.py``
before jax reads its configuration.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

_GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of Google's PCI functions that are not TPUs on Compute Engine
# VMs (gVNIC network card, NVMe disk). Any other Google device counts as a
# TPU, so a TPU generation newer than this file is never taken for "no TPU".
_GOOGLE_NON_TPU_DEVICES = frozenset({"0x0042", "0x001f"})
_GPU_DEVICE_NODES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return ""


def tpu_chips_attached() -> int:
  """Google accelerator PCI functions on this machine (0 on a CPU or GPU box)."""
  count = 0
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    if _read(vendor) != _GOOGLE_PCI_VENDOR:
      continue
    device = _read(os.path.join(os.path.dirname(vendor), "device"))
    if device not in _GOOGLE_NON_TPU_DEVICES:
      count += 1
  return count + len(glob.glob("/dev/accel[0-9]*"))


def gpu_attached() -> bool:
  return any(os.path.exists(p) for p in _GPU_DEVICE_NODES)


def libtpu_installed() -> bool:
  if os.environ.get("TPU_LIBRARY_PATH"):
    return True
  try:
    return importlib.util.find_spec("libtpu") is not None
  except (ImportError, ValueError):
    return False


def default_to_cpu_without_accelerators() -> bool:
  """Sets ``JAX_PLATFORMS=cpu`` when libtpu is installed but no accelerator is.

  Returns:
    Whether it set it. It does nothing once jax has started a backend, when
    ``JAX_PLATFORMS`` is already in the environment, or on a machine with a
    TPU or GPU.
  """
  if "JAX_PLATFORMS" in os.environ or not libtpu_installed():
    return False
  if tpu_chips_attached() or gpu_attached():
    return False
  jax = sys.modules.get("jax")
  if jax is not None:  # imported already: its config has read the environment
    try:
      from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
      if xla_bridge.backends_are_initialized() or jax.config.jax_platforms:
        return False
      jax.config.update("jax_platforms", "cpu")
    except (ImportError, AttributeError):
      return False
  os.environ["JAX_PLATFORMS"] = "cpu"
  return True


def quiet_libtpu_without_tpu(accelerator_type: str) -> None:
  """Environment defaults for libtpu on a machine with no TPU: no start-up
  errors (it looks for TPU worker hostnames and the accelerator type in the
  VM metadata), and several compiling processes at once (libtpu otherwise
  takes a machine-wide lock file, /tmp/libtpu_lockfile, meant for the chips
  there are none of). Only defaults: values already set are kept.

  Args:
    accelerator_type: e.g. ``"v5p-128"`` (the topology being compiled for).
  """
  if tpu_chips_attached():
    return
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

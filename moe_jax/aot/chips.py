"""Published per-chip figures of Cloud TPU generations (for fit and roofline).

Each figure is taken from the generation's Cloud TPU documentation page
(``source``), "key specifications" table:

* v4  -- https://cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16 per chip,
  HBM2 32 GiB, 1200 GB/s. Two TensorCores per chip, used as one JAX device
  (megacore).
* v5e -- https://cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, HBM2
  16 GB, 819 GB/s. One TensorCore per chip.
* v5p -- https://cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, HBM2e
  95 GiB, 2765 GB/s. Two TensorCores per chip (megacore).
* v6e -- https://cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, HBM
  32 GB, 1638 GB/s. One TensorCore per chip.

Host memory and the host link (for host offload, ``pinned_host``):

* host RAM per chip is the TPU VM's RAM over its chips, from the same pages:
  v5e 512 GiB and v6e 1536 GiB per 8-chip host; v5p 448 GB per 4-chip VM.
  The v4 page gives none (0: unknown).
* host <-> HBM bandwidth per chip (PCIe, each way) is not on the Cloud TPU
  pages; it is from "How to Scale Your Model" (Austin et al., Google
  DeepMind, https://jax-ml.github.io/scaling-book/tpus/): about 1.5e10
  bytes/s per chip, 16 GB/s each way on v4, 32 GB/s on v6e.

HBM sizes are taken as GiB (2**30 bytes): that is the unit XLA reports in
its out-of-memory errors (e.g. ``available HBM (15.75G)`` for a v5e chip,
slightly below 16 GiB because the runtime reserves some). Bandwidths are
decimal (GB/s = 1e9 bytes/s), as the pages give them.
"""

from __future__ import annotations

import dataclasses

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """One TPU generation's per-chip figures.

  Attributes:
    generation: ``"v4"``, ``"v5e"``, ``"v5p"``, ``"v6e"``.
    device_kind: ``jax.Device.device_kind`` of its (compile-only) devices.
    peak_bf16_flops: peak dense bf16 FLOP/s per chip.
    hbm_bytes: HBM capacity per chip.
    hbm_bytes_per_s: HBM bandwidth per chip.
    cores_per_chip: TensorCores per chip (accelerator-type names count
      cores for generations with 2, chips for those with 1).
    dims: 3 for a 3D torus (``AxBxC``), 2 for a 2D torus (``AxB``).
    max_slice_chips: the largest single slice.
    source: the documentation page the figures come from.
    host_memory_bytes: host RAM per chip (0: not published).
    host_bytes_per_s: host <-> HBM bandwidth per chip, each way.
  """
  generation: str
  device_kind: str
  peak_bf16_flops: float
  hbm_bytes: int
  hbm_bytes_per_s: float
  cores_per_chip: int
  dims: int
  max_slice_chips: int
  source: str
  host_memory_bytes: int = 0
  host_bytes_per_s: float = 0.0


CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec("v4", "TPU v4", 275e12, 32 * GIB, 1200e9, 2, 3, 4096,
                   "https://cloud.google.com/tpu/docs/v4",
                   host_bytes_per_s=16e9),
    "v5e": ChipSpec("v5e", "TPU v5 lite", 197e12, 16 * GIB, 819e9, 1, 2, 256,
                    "https://cloud.google.com/tpu/docs/v5e",
                    host_memory_bytes=512 * GIB // 8, host_bytes_per_s=1.5e10),
    "v5p": ChipSpec("v5p", "TPU v5", 459e12, 95 * GIB, 2765e9, 2, 3, 6144,
                    "https://cloud.google.com/tpu/docs/v5p",
                    host_memory_bytes=448 * 10**9 // 4, host_bytes_per_s=1.5e10),
    "v6e": ChipSpec("v6e", "TPU v6 lite", 918e12, 32 * GIB, 1638e9, 1, 2, 256,
                    "https://cloud.google.com/tpu/docs/v6e",
                    host_memory_bytes=1536 * GIB // 8, host_bytes_per_s=32e9),
}

# Names users type for a generation (Cloud TPU's accelerator types use
# "v5litepod" for v5e).
ALIASES = {"v4": "v4", "v5e": "v5e", "v5litepod": "v5e", "v5lite": "v5e",
           "v5p": "v5p", "v6e": "v6e"}


def chip(generation: str) -> ChipSpec:
  """The :class:`ChipSpec` of ``generation`` (or an alias such as ``v5litepod``).

  Raises:
    ValueError: an unknown generation (the message lists the known ones).
  """
  key = ALIASES.get(generation.lower())
  if key is None:
    raise ValueError(f"Unknown TPU generation {generation!r}; use one of "
                     f"{sorted(ALIASES)}.")
  return CHIPS[key]

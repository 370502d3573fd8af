"""Multi-process setup: ``jax.distributed.initialize`` from flags or environment.

Where the coordinator comes from, in order:

1. explicit arguments (``--coordinator_address``, ``--num_processes``,
   ``--process_id``), e.g. several processes on one machine (127.0.0.1);
2. ``MOE_JAX_COORDINATOR_ADDRESS`` / ``MOE_JAX_NUM_PROCESSES`` /
   ``MOE_JAX_PROCESS_ID`` in the environment (what ``launch/`` scripts set);
3. a SLURM job step with more than one task (``SLURM_NTASKS > 1``) or a Cloud
   TPU pod: ``jax.distributed.initialize()`` detects them itself;
4. otherwise a single process: nothing to do.

On CPU the cross-process collectives use gloo. Each process then feeds only
its slice of the global batch (:func:`process_batch_slice`).
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Optional

import jax

logger = logging.getLogger("moe_jax.train")

_ENV_PREFIX = "MOE_JAX_"


def _from_env(env: Mapping[str, str], name: str) -> Optional[str]:
  return env.get(_ENV_PREFIX + name) or None


def detect_cluster(coordinator_address: Optional[str] = None,
                   num_processes: Optional[int] = None,
                   process_id: Optional[int] = None,
                   env: Optional[Mapping[str, str]] = None) -> Optional[dict]:
  """Keyword arguments for ``jax.distributed.initialize``, or ``None``.

  ``None`` means single-process. An empty dict means "let JAX auto-detect"
  (SLURM, Cloud TPU pods).

  Raises:
    ValueError: an incomplete explicit setup (naming the missing flag).
  """
  env = os.environ if env is None else env
  coordinator_address = coordinator_address or _from_env(env, "COORDINATOR_ADDRESS")
  if num_processes is None and _from_env(env, "NUM_PROCESSES"):
    num_processes = int(_from_env(env, "NUM_PROCESSES"))
  if process_id is None and _from_env(env, "PROCESS_ID"):
    process_id = int(_from_env(env, "PROCESS_ID"))
  explicit = (coordinator_address, num_processes, process_id)
  if any(x is not None for x in explicit):
    if num_processes == 1 and coordinator_address is None:
      return None
    missing = [flag for flag, v in zip(
        ("--coordinator_address", "--num_processes", "--process_id"), explicit) if v is None]
    if missing:
      raise ValueError(
          f"Multi-process setup is incomplete: missing {', '.join(missing)}. Give "
          "all three (e.g. --coordinator_address=127.0.0.1:12345 --num_processes=2 "
          "--process_id=0), or none to auto-detect SLURM / TPU pods.")
    if not 0 <= process_id < num_processes:
      raise ValueError(
          f"--process_id={process_id} must be in [0, --num_processes={num_processes}).")
    return {"coordinator_address": coordinator_address,
            "num_processes": num_processes, "process_id": process_id}
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
    return {}
  if env.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1:
    return {}
  return None


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               initialization_timeout: int = 300) -> bool:
  """Starts ``jax.distributed`` when more than one process is configured.

  Must run before any other JAX call that touches devices.

  Returns:
    Whether ``jax.distributed.initialize`` was called.
  """
  kwargs = detect_cluster(coordinator_address, num_processes, process_id)
  if kwargs is None:
    return False
  # Cross-process collectives of the CPU backend (CPU-only clusters, tests);
  # accelerator backends are unaffected.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logger.info("jax.distributed.initialize(%s)", kwargs or "auto-detect")
  jax.distributed.initialize(initialization_timeout=initialization_timeout, **kwargs)
  return True


def process_batch_slice(global_batch_size: int) -> slice:
  """Rows of the global batch this process loads (contiguous, in order).

  Raises:
    ValueError: the batch does not split evenly over processes.
  """
  n, i = jax.process_count(), jax.process_index()
  if global_batch_size % n:
    raise ValueError(
        f"BATCH_SIZE={global_batch_size} is not divisible by the {n} processes; "
        f"use a multiple of {n}.")
  per = global_batch_size // n
  return slice(i * per, (i + 1) * per)

"""The train step of a gin configuration, compiled for a TPU topology.

The path ``moe-compile`` takes (:func:`run`): parse gin like ``moe-train``
(:func:`parse_config`), build the same
:class:`~moe_jax.training.experiment.Experiment` with its mesh on libtpu's
compile-only devices (:func:`build_experiment`), lower the very jitted step
``moe-train`` runs (:func:`lower_train_step`: ``Experiment.lower_step()``,
abstract state and batch, no data, no arrays), compile it, and report
(:mod:`moe_jax.aot.report`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

# Macros moe-train requires that compiling does not use.
_UNUSED_REQUIRED = {"MODEL_DIR": None, "MIXTURE_OR_TASK_NAME": "(none: moe-compile reads no data)"}


def _is_required(value: Any) -> bool:
  return repr(value) == "%gin.REQUIRED"


def parse_config(gin_files: Sequence[str], bindings: Sequence[str],
                 search_paths: Sequence[str] = ()) -> None:
  """Parses gin like ``moe-train``, filling the required macros compiling
  does not use (``MODEL_DIR``, ``MIXTURE_OR_TASK_NAME``) when left unset."""
  import gin  # pylint: disable=g-import-not-at-top
  from moe_jax import gin_utils  # pylint: disable=g-import-not-at-top
  gin_utils.parse_gin(gin_files, bindings, search_paths, finalize=False)
  for macro, value in _UNUSED_REQUIRED.items():
    if _is_required(gin_utils.query_macro(macro)):
      gin.bind_parameter(f"{macro}/macro.value", value)
  try:
    gin.finalize()
  except (ValueError, KeyError) as e:
    raise gin_utils.UsageError(f"Bad gin configuration: {e}") from e


def build_experiment(devices: Sequence[Any]):
  """The gin-configured :class:`~moe_jax.training.experiment.Experiment` with
  its mesh on ``devices`` and no model directory (nothing is written)."""
  from moe_jax import gin_utils  # pylint: disable=g-import-not-at-top
  from moe_jax.training import experiment  # pylint: disable=g-import-not-at-top
  try:
    return gin_utils.register_configurables()["train"](devices=devices, model_dir=None)
  except experiment.ConfigError as e:
    raise gin_utils.UsageError(str(e)) from e
  except RuntimeError as e:
    if "Required bindings" not in str(e) and "REQUIRED" not in str(e):
      raise
    raise gin_utils.UsageError(
        f"{e}. Set them with --gin.NAME=VALUE or in a --gin_file.") from e


def lower_train_step(exp) -> Any:
  """The lowered train step ``moe-train`` runs for ``exp``: the one path
  ``moe-compile`` takes, ``Experiment.lower_step()`` (abstract state and
  batch, the loop's jitted-step factory; no data, no arrays)."""
  return exp.lower_step()


def compile_train_step(exp) -> tuple[Any, Any]:
  """``(lowered, compiled)``: :func:`lower_train_step`, then XLA compile.

  Raises:
    jax.errors.JaxRuntimeError: e.g. RESOURCE_EXHAUSTED when it cannot fit.
  """
  lowered = lower_train_step(exp)
  return lowered, lowered.compile()


def _per_chip_bytes(tree: Any, shardings: Any, host: bool = False) -> int:
  """Per-chip bytes of the leaves in device memory (``host``: in host memory)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  total = 0
  for leaf, sharding in zip(jax.tree_util.tree_leaves(tree),
                            jax.tree_util.tree_leaves(shardings)):
    if (getattr(sharding, "memory_kind", None) == "pinned_host") != host:
      continue
    shape = sharding.shard_shape(leaf.shape)
    total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
  return total


def host_state_bytes(exp) -> int:
  """Per-chip bytes of the train state that rests in host memory (offload)."""
  return _per_chip_bytes(exp.layout.abstract, exp.layout.shardings, host=True)


def state_and_batch_bytes(exp) -> tuple[int, int]:
  """Per-chip bytes of the sharded train state in device memory and of the
  batch shard."""
  layout = exp.layout
  state = _per_chip_bytes(layout.abstract, layout.shardings)
  batch = _per_chip_bytes(exp.batch_shapes,
                          {k: exp.partitioner.batch_sharding for k in exp.batch_shapes})
  return state, batch


@dataclasses.dataclass
class Result:
  """One compile: the report (:mod:`moe_jax.aot.report`; ``report.public``
  gives the JSON), its human summary, the experiment compiled and the
  ``jax.stages.Compiled`` (``None`` when it did not fit)."""
  report: dict[str, Any]
  summary: str
  experiment: Any
  compiled: Any = None


def run(topology_name: str, num_slices: int, gin_files: Sequence[str],
        bindings: Sequence[str], search_paths: Sequence[str] = (),
        title: str = "") -> Result:
  """Compiles the configured train step for the topology.

  Raises:
    moe_jax.gin_utils.UsageError: bad topology, configuration, or no libtpu.
  """
  from moe_jax import gin_utils  # pylint: disable=g-import-not-at-top
  from moe_jax.aot import model_flops, report, topology  # pylint: disable=g-import-not-at-top
  from moe_jax.training import param_counts  # pylint: disable=g-import-not-at-top
  try:
    topo = topology.parse(topology_name, num_slices)
    devices = topology.compile_only_devices(topo)
  except (topology.TopologyError, topology.LibtpuMissingError) as e:
    raise gin_utils.UsageError(str(e)) from e
  parse_config(gin_files, bindings, search_paths)
  exp = build_experiment(devices)
  params = exp.layout.abstract.params
  by_stack = param_counts.by_stack(params, exp.layout.param_axes, exp.model_config)
  common = dict(mesh_shape=dict(exp.mesh.shape), batch_size=exp.batch_size,
                tokens_per_step=model_flops.tokens(exp.batch_shapes)["total"],
                model_flops=model_flops.model_flops_per_step(
                    by_stack, exp.model_config, exp.batch_shapes),
                memory_settings=exp.memory_settings())
  t0 = time.perf_counter()
  compiled = None
  try:
    _, compiled = compile_train_step(exp)
  except Exception as e:  # pylint: disable=broad-except  (JaxRuntimeError)
    if not report.is_oom(e):
      raise
    state, batch = state_and_batch_bytes(exp)
    result = report.from_oom(str(e), topo, argument_bytes=state + batch,
                             state_bytes=state, compile_s=time.perf_counter() - t0,
                             host_argument_bytes=host_state_bytes(exp), **common)
  else:
    result, _ = report.from_compiled(compiled, topo, compile_s=time.perf_counter() - t0,
                                     **common)
  counts = (param_counts.total(params), sum(c["active"] for c in by_stack.values()))
  result["_detail"]["params"] = {"total": counts[0], "active": counts[1]}
  title = title or " + ".join(gin_files)
  return Result(result, report.summary(result, topo, title=title, params=counts), exp,
                compiled)



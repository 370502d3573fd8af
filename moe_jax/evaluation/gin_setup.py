"""Gin plumbing shared by ``moe-eval``, ``moe-infer`` and ``moe-prune``.

The binaries take T5X-style flags (``--gin_file``, ``--gin.NAME=VALUE``) and
read *macros* (``CHECKPOINT_PATH``, ``EVAL_OUTPUT_DIR``, ``MESH_*``, ...)
rather than binding a configurable, so the shipped run files
(``runs/eval.gin``, ``runs/infer.gin``) need no binary-specific lines. The
model comes from the ``MODEL_CONFIG`` macro of a model gin file, or, when no
file gives one, from the ``config.gin`` the training run wrote next to the
checkpoint (:func:`parse`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import gin

from moe_jax import partitioning
from moe_jax import gin_utils

_MISSING = object()


MODEL_BINDING = gin_utils.MODEL_HOOK_BINDING


def parse(gin_files: Sequence[str], bindings: Sequence[str],
          search_paths: Sequence[str] = (), checkpoint: Optional[str] = None,
          log_fn: Optional[Callable[[str], None]] = None) -> Optional[str]:
  """Parses gin like ``moe-train`` does, plus the model-config hook.

  ``MODEL_DIR`` (required by the training run files that eval/infer include)
  defaults to ``None``: these binaries write elsewhere. When no file or
  binding defines ``MODEL_CONFIG``, the run's own ``config.gin`` (or
  ``upcycled_model.gin``) next to the checkpoint (``checkpoint``, default the
  ``CHECKPOINT_PATH`` macro; a run directory or a step directory) is parsed
  after the given files: the run's model, data (``MIXTURE_OR_TASK_NAME``,
  ``TASK_FEATURE_LENGTHS``) and mesh settings replace those the run files
  (e.g. ``runs/eval.gin``'s defaults) set; command-line bindings still win.

  Returns:
    The run config file used for the model, or ``None`` (a model gin given).

  Raises:
    UsageError: no model gin and no run config next to the checkpoint.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  from moe_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  for module in pipeline.DEFAULT_TASK_MODULES:  # they add configurables: before locking
    importlib.import_module(module)
  lines = ["MODEL_DIR = None"] + list(bindings) + [MODEL_BINDING]
  gin_utils.parse_gin(gin_files, lines, search_paths, finalize=False)
  if gin_utils.query_macro("MODEL_CONFIG") is not None:
    gin.finalize()
    return None
  checkpoint = checkpoint or macro("CHECKPOINT_PATH", None)
  run_config = gin_utils.find_run_config(checkpoint) if checkpoint else None
  if run_config is None:
    raise gin_utils.UsageError(
        "No model: no gin file defines MODEL_CONFIG"
        + (f", and there is no {' or '.join(gin_utils.RUN_CONFIG_FILES)} in "
           f"{checkpoint!r} or the two directories above it" if checkpoint else "")
        + ". Give the model's gin file (e.g. --gin_file=models/tiny_switch.gin), "
        "or point the checkpoint at a moe-train run directory (or one of its "
        "step directories).")
  if log_fn is not None:
    log_fn(f"model and data settings from {run_config} (the run's config; a model "
           "--gin_file or --gin.NAME=VALUE wins)")
  gin_utils.parse_gin(list(gin_files) + [run_config], lines,
                      list(search_paths) + [os.path.dirname(run_config)])
  return run_config


def macro(name: str, default: Any = _MISSING) -> Any:
  """The value of gin macro ``name``; ``default`` if unset (else an error)."""
  try:
    value = gin.query_parameter(f"{name}/macro.value")
  except ValueError:
    value = _MISSING
  if value is _MISSING or repr(value) == "%gin.REQUIRED" or (
      type(value).__name__ == "ConfigurableReference" and "REQUIRED" in repr(value)):
    if default is _MISSING:
      raise gin_utils.UsageError(
          f"Set {name} (e.g. --gin.{name}=...) or define it in a --gin_file.")
    return default
  return value


def required(name: str) -> Any:
  value = macro(name, None)
  if value is None:
    raise gin_utils.UsageError(f"{name} is not set; pass --gin.{name}=... .")
  return value


def model_config():
  """The ``T5Config`` of the ``MODEL_CONFIG`` macro."""
  try:
    return gin_utils.configured_model()
  except (ValueError, RuntimeError) as e:
    raise gin_utils.UsageError(
        f"Could not build the model from gin ({e}); include a model file, e.g. "
        "--gin_file=models/tiny_switch.gin.") from e


def partitioner(mesh_shape: Optional[dict] = None) -> partitioning.Partitioner:
  """The mesh from ``MESH_*`` / ``DCN_MESH_*`` macros (or ``mesh_shape``) and
  the standard rules (``FSDP_PARAMS``)."""
  shape = mesh_shape or {axis: macro(f"MESH_{axis.upper()}", -1 if axis == "data" else 1)
                         for axis in partitioning.MESH_AXES}
  dcn = {axis: macro(f"DCN_MESH_{axis.upper()}", 1) for axis in partitioning.MESH_AXES}
  try:
    return partitioning.Partitioner.create(
        shape, dcn, fsdp_params=macro("FSDP_PARAMS", True))
  except ValueError as e:
    raise gin_utils.UsageError(str(e)) from e


def parse_required(prog: str, gin_files: Sequence[str], bindings: Sequence[str],
                   search_paths: Sequence[str], log_fn: Callable[[str], None],
                   *names: str) -> tuple:
  """:func:`parse` (lines prefixed with ``prog``), then the values of the
  required macros ``names``, in order."""
  parse(gin_files, bindings, search_paths, log_fn=lambda line: log_fn(f"{prog}: {line}"))
  return tuple(required(n) for n in names)


def load_model(checkpoint: str):
  """``(model, params, partitioner)``: the gin's model with ``checkpoint``'s
  parameters, placed on the gin's mesh (eval-style binaries share this)."""
  from moe_jax import models  # pylint: disable=g-import-not-at-top
  from moe_jax.evaluation import inference  # pylint: disable=g-import-not-at-top
  mesh = partitioner()
  model = models.build_model(model_config())
  return model, inference.load_params(checkpoint, model, mesh), mesh


def decode_spec(default_length: Optional[int] = None):
  """``DecodeSpec`` from ``DECODE_METHOD``, ``BEAM_SIZE``, ``DECODE_ALPHA``,
  ``MAX_DECODE_LENGTH``, ``DECODE_TEMPERATURE``, ``DECODE_TOP_K``."""
  from moe_jax.evaluation import inference  # pylint: disable=g-import-not-at-top
  try:
    return inference.DecodeSpec(
        method=macro("DECODE_METHOD", "greedy"),
        max_decode_length=macro("MAX_DECODE_LENGTH", default_length),
        beam_size=macro("BEAM_SIZE", 4), alpha=macro("DECODE_ALPHA", 0.6),
        temperature=macro("DECODE_TEMPERATURE", 1.0), top_k=macro("DECODE_TOP_K", 0),
        seed=macro("SEED", 0))
  except ValueError as e:
    raise gin_utils.UsageError(str(e)) from e


def checkpoint_step(path: str) -> int:
  """The step number of a checkpoint path (0 when it has none)."""
  import os  # pylint: disable=g-import-not-at-top
  from moe_jax.checkpoints import restore  # pylint: disable=g-import-not-at-top
  item = restore.resolve_state_dir(path)
  name = os.path.basename(os.path.dirname(os.path.normpath(item)))
  return int(name) if name.isdigit() else 0

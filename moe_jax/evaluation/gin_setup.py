"""Gin plumbing shared by ``moe-eval``, ``moe-infer`` and ``moe-prune``.

The binaries take T5X-style flags (``--gin_file``, ``--gin.NAME=VALUE``) and
read *macros* (``CHECKPOINT_PATH``, ``EVAL_OUTPUT_DIR``, ``MESH_*``, ...)
rather than binding a configurable, so the shipped run files
(``runs/eval.gin``, ``runs/infer.gin``) need no binary-specific lines. The
model comes from the ``MODEL_CONFIG`` macro of the model gin file.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import gin

from moe_jax import partitioning
from moe_jax import train as train_bin

_MISSING = object()


@gin.configurable("eval_model_config", module="moe_jax")
def _model_config(model_config=gin.REQUIRED):
  return model_config


MODEL_BINDING = "moe_jax.eval_model_config.model_config = %MODEL_CONFIG"


def parse(gin_files: Sequence[str], bindings: Sequence[str],
          search_paths: Sequence[str] = ()) -> None:
  """Parses gin like ``moe-train`` does, plus the model-config hook.

  ``MODEL_DIR`` (required by the training run files that eval/infer include)
  defaults to ``None``: these binaries write elsewhere.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  from moe_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  for module in pipeline.DEFAULT_TASK_MODULES:  # they add configurables: before locking
    importlib.import_module(module)
  train_bin.parse_gin(gin_files, ["MODEL_DIR = None"] + list(bindings) + [MODEL_BINDING],
                      search_paths)


def macro(name: str, default: Any = _MISSING) -> Any:
  """The value of gin macro ``name``; ``default`` if unset (else an error)."""
  try:
    value = gin.query_parameter(f"{name}/macro.value")
  except ValueError:
    value = _MISSING
  if value is _MISSING or repr(value) == "%gin.REQUIRED" or (
      type(value).__name__ == "ConfigurableReference" and "REQUIRED" in repr(value)):
    if default is _MISSING:
      raise train_bin.UsageError(
          f"Set {name} (e.g. --gin.{name}=...) or define it in a --gin_file.")
    return default
  return value


def required(name: str) -> Any:
  value = macro(name, None)
  if value is None:
    raise train_bin.UsageError(f"{name} is not set; pass --gin.{name}=... .")
  return value


def model_config():
  """The ``T5Config`` of the ``MODEL_CONFIG`` macro."""
  try:
    return _model_config()
  except (ValueError, RuntimeError) as e:
    raise train_bin.UsageError(
        f"Could not build the model from gin ({e}); include a model file, e.g. "
        "--gin_file=models/tiny_switch.gin.") from e


def mesh_and_rules(mesh_shape: Optional[dict] = None):
  """The mesh from ``MESH_*`` / ``DCN_MESH_*`` macros and the standard rules."""
  shape = mesh_shape or {axis: macro(f"MESH_{axis.upper()}", -1 if axis == "data" else 1)
                         for axis in ("data", "fsdp", "expert", "model")}
  dcn = {axis: macro(f"DCN_MESH_{axis.upper()}", 1)
         for axis in ("data", "fsdp", "expert", "model")}
  try:
    mesh = partitioning.make_mesh(shape, dcn_axis_sizes=dcn)
  except ValueError as e:
    raise train_bin.UsageError(str(e)) from e
  rules = partitioning.standard_logical_rules(fsdp_params=macro("FSDP_PARAMS", True))
  return mesh, rules


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
    raise train_bin.UsageError(str(e)) from e


def checkpoint_step(path: str) -> int:
  """The step number of a checkpoint path (0 when it has none)."""
  import os  # pylint: disable=g-import-not-at-top
  from moe_jax.checkpoints import restore  # pylint: disable=g-import-not-at-top
  item = restore.resolve_state_dir(path)
  name = os.path.basename(os.path.dirname(os.path.normpath(item)))
  return int(name) if name.isdigit() else 0

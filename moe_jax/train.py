r"""``moe-train``: the gin-configured training binary (T5X conventions).

  moe-train --gin_file=runs/quickstart.gin --gin.MODEL_DIR=/tmp/quickstart
  moe-train --gin_file=models/switch_base_8.gin --gin_file=runs/pretrain.gin \
      --gin.MODEL_DIR=\"/tmp/run\" --gin.TRAIN_STEPS=1000 --gin.MESH_EXPERT=8

Flags:
  --gin_file=F          repeatable; searched in the working directory,
                        ``--gin_search_paths`` and the shipped ``gin_configs/``.
  --gin.NAME=VALUE      one binding (``NAME = VALUE``); a bare word that is not
                        a gin literal is taken as a string (``/tmp/x``).
  --gin_bindings=B      repeatable raw gin binding lines.
  --gin_search_paths=P  comma-separated extra directories for gin files.
  --coordinator_address / --num_processes / --process_id   multi-process
                        (see :mod:`moe_jax.training.multihost`).

Run configs use T5X's macro names: ``MODEL_DIR``, ``TRAIN_STEPS``,
``BATCH_SIZE``, ``MIXTURE_OR_TASK_NAME``, ``MIXTURE_OR_TASK_MODULE``,
``TASK_FEATURE_LENGTHS``, ``EVAL_PERIOD``, ``CHECKPOINT_PERIOD``,
``INITIAL_CHECKPOINT_PATH``; the mesh comes from ``MESH_DATA``,
``MESH_FSDP``, ``MESH_EXPERT``, ``MESH_MODEL`` (and ``DCN_MESH_*``).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import logging
import os
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

import gin

GIN_CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "gin_configs")
logger = logging.getLogger("moe_jax.train")


class UsageError(ValueError):
  """Bad flags or gin configuration, found before training starts."""


# ----------------------------------------------------------------------------
# Gin registration
# ----------------------------------------------------------------------------
_REGISTERED: dict[str, Any] = {}


def register_configurables() -> dict[str, Any]:
  """Registers the classes/functions gin files bind (idempotent)."""
  if _REGISTERED:
    return _REGISTERED
  from moe_jax.layers import moe_config  # pylint: disable=g-import-not-at-top
  from moe_jax.models import config as model_config  # pylint: disable=g-import-not-at-top
  from moe_jax.training import experiment, optimizers, train_step  # pylint: disable=g-import-not-at-top
  for name, obj in (("T5Config", model_config.T5Config),
                    ("SparseLayout", model_config.SparseLayout),
                    ("MoeConfig", moe_config.MoeConfig),
                    ("make_optimizer", optimizers.make_optimizer),
                    ("make_schedule", optimizers.make_schedule),
                    ("LossConfig", train_step.LossConfig),
                    ("DistillationConfig", experiment.distillation_lib.DistillationConfig),
                    ("ConditionalRoutingConfig", model_config.ConditionalRoutingConfig),
                    ("train", experiment.build_experiment)):
    _REGISTERED[name] = gin.external_configurable(obj, name=name)
  return _REGISTERED


def configured_experiment():
  """The :class:`~moe_jax.training.experiment.Experiment` gin describes.

  Raises:
    UsageError: missing required settings or settings the devices cannot run.
  """
  from moe_jax.training import experiment  # pylint: disable=g-import-not-at-top
  try:
    return register_configurables()["train"]()
  except experiment.ConfigError as e:
    raise UsageError(str(e)) from e
  except RuntimeError as e:
    if "Required bindings" not in str(e) and "REQUIRED" not in str(e):
      raise
    raise UsageError(
        f"{e}. Set them with --gin.NAME=VALUE (e.g. --gin.MODEL_DIR=/tmp/run) or in "
        "a --gin_file.") from e


# ----------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------
def _gin_value(raw: str) -> str:
  """``raw`` if it is a gin value, else the quoted string."""
  text = raw.strip()
  if not text or text[0] in "@%'\"[({" or text in ("True", "False", "None"):
    return text
  try:
    ast.literal_eval(text)
    return text
  except (ValueError, SyntaxError):
    return repr(text)


def run_cli(prog: str, fn: Callable[[], Any],
            errors: tuple = (UsageError, FileNotFoundError)) -> int:
  """Runs ``fn``; a usage error prints ``prog: error: ...`` and gives exit code 2."""
  try:
    fn()
  except errors as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
  return 0


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
  """T5X-style flags; ``--gin.NAME=VALUE`` become bindings."""
  parser = argparse.ArgumentParser(
      prog="moe-train", description="Train a (sparse) T5 model configured by gin.")
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file (repeatable), e.g. runs/quickstart.gin")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="raw gin binding line (repeatable)")
  parser.add_argument("--gin_search_paths", action="append", default=[],
                      help="comma-separated directories searched for gin files")
  parser.add_argument("--coordinator_address", default=None)
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument("--log_level", default="WARNING",
                      help="Python logging level of libraries (orbax, absl); the "
                      "console progress lines are always printed")
  bindings: list[str] = []
  rest: list[str] = []
  for arg in argv:
    if arg.startswith("--gin."):
      if "=" not in arg:
        raise UsageError(f"{arg!r} needs a value: --gin.NAME=VALUE.")
      name, value = arg[len("--gin."):].split("=", 1)
      bindings.append(f"{name} = {_gin_value(value)}")
    else:
      rest.append(arg)
  args, unknown = parser.parse_known_args(rest)
  if unknown:
    raise UsageError(
        f"Unknown flags {unknown}. Use --gin_file, --gin.NAME=VALUE, --gin_bindings, "
        "--gin_search_paths, --coordinator_address, --num_processes, --process_id.")
  if not args.gin_file:
    raise UsageError("Give at least one --gin_file (e.g. --gin_file=runs/quickstart.gin).")
  args.bindings = list(args.gin_bindings) + bindings
  return args


def search_paths(extra: Sequence[str] = ()) -> list[str]:
  """``--gin_search_paths`` first, then the shipped configs, then the cwd."""
  paths = []
  for entry in extra:
    paths += [p for p in entry.split(",") if p]
  return paths + [GIN_CONFIGS_DIR, os.getcwd()]


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str],
              extra_search_paths: Sequence[str] = (), finalize: bool = True) -> None:
  """Parses gin files + bindings, with errors that say what to change."""
  register_configurables()
  gin.clear_config()
  paths = search_paths(extra_search_paths)
  for p in paths:
    gin.add_config_file_search_path(p)
  resolved = []
  for f in gin_files:
    hit = next((os.path.join(p, f) for p in paths
                if os.path.exists(os.path.join(p, f))), None)
    if hit is None and os.path.exists(f):
      hit = f
    if hit is None:
      raise UsageError(
          f"gin file {f!r} not found in {paths}. Check the name (shipped files: "
          "models/*.gin, runs/*.gin) or add its directory with --gin_search_paths.")
    resolved.append(hit)
  try:
    gin.parse_config_files_and_bindings(resolved, bindings, finalize_config=False)
    # Task modules may register gin configurables: import them before locking.
    module = _query_macro("MIXTURE_OR_TASK_MODULE")
    if module:
      importlib.import_module(module)
    if finalize:
      gin.finalize()
  except (ValueError, KeyError) as e:
    msg = str(e)
    hint = ""
    if "No configurable matching" in msg or "Unknown configurable" in msg:
      hint = (" Check the spelling; configurables are "
              f"{sorted(register_configurables())} (see gin_configs/runs/*.gin).")
    elif "Unknown parameter" in msg or "not a parameter" in msg.lower():
      hint = " That configurable has no such argument; see its docstring."
    raise UsageError(f"Bad gin configuration: {msg}{hint}") from e


def _query_macro(name: str) -> Any:
  try:
    return gin.query_parameter(f"{name}/macro.value")
  except ValueError:
    return None


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
  """Parses flags and gin, sets up processes, trains. Returns the exit code."""
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    args = parse_flags(argv)
  except UsageError as e:
    print(f"moe-train: error: {e}", file=sys.stderr)
    return 2
  level = getattr(logging, args.log_level.upper(), logging.WARNING)
  logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
  for name in ("absl", "orbax"):
    logging.getLogger(name).setLevel(level)
  import jax  # pylint: disable=g-import-not-at-top
  from moe_jax.training import loop, multihost  # pylint: disable=g-import-not-at-top
  try:
    try:
      multihost.initialize(args.coordinator_address, args.num_processes, args.process_id)
    except ValueError as e:
      raise UsageError(str(e)) from e
    parse_gin(args.gin_file, args.bindings, args.gin_search_paths)
    exp = configured_experiment()
    if exp.model_dir and jax.process_index() == 0:
      with open(os.path.join(exp.model_dir, "config.gin"), "w") as f:
        f.write(gin.config_str())
    exp.run()
  except UsageError as e:
    print(f"moe-train: error: {e}", file=sys.stderr)
    return 2
  except loop.NonFiniteLossError as e:
    print(f"moe-train: stopped: {e}", file=sys.stderr)
    return 3
  return 0


def console_main() -> None:
  sys.exit(main())


if __name__ == "__main__":
  console_main()

"""Gin plumbing shared by every entry point (``moe-train``, ``moe-eval``, ...).

* :func:`register_configurables`: the classes and functions gin files bind
  (``T5Config``, ``MoeConfig``, ``make_optimizer``, ``train``, ...).
* :func:`parse_flags`: T5X-style flags -- ``--gin_file`` (repeatable),
  ``--gin.NAME=VALUE`` (one binding; a bare word that is not a gin literal is
  taken as a string), ``--gin_bindings``, ``--gin_search_paths`` -- plus the
  multi-process flags and ``--log_level``.
* :func:`parse_gin`: gin files are looked up in ``--gin_search_paths``, the
  shipped ``gin_configs/`` and the working directory; errors say what to
  change.
* :func:`run_cli`: runs a binary's body; a :class:`UsageError` prints
  ``prog: error: ...`` and gives exit code 2.
* :func:`setup_logging`: ``--log_level`` for the libraries (absl, orbax,
  seqio, TensorFlow's C++ start-up lines); call it before jax or TensorFlow
  is imported.

Nothing here imports the training code at module level: entry points import
this module, and training code never does.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import logging
import os
import sys
from typing import Any, Callable, Optional, Sequence

import gin

DEFAULT_LIBRARY_LOG_LEVEL = "ERROR"
LIBRARY_LOGGERS = ("absl", "orbax", "jax", "tensorflow", "seqio", "etils")
# TF_CPP_MIN_LOG_LEVEL per Python level: 0 all, 1 no INFO, 2 no WARNING, 3 none.
_TF_CPP_LEVELS = {"DEBUG": "0", "INFO": "0", "WARNING": "1", "ERROR": "3",
                  "CRITICAL": "3"}
GIN_CONFIGS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin_configs")
EXIT_USAGE = 2


class UsageError(ValueError):
  """Bad flags or gin configuration, found before any work starts."""


# ----------------------------------------------------------------------------
# Configurables
# ----------------------------------------------------------------------------
_REGISTERED: dict[str, Any] = {}


def register_configurables() -> dict[str, Any]:
  """Registers the classes/functions gin files bind (idempotent).

  Returns:
    ``{gin name: the registered (gin-wrapped) object}``.
  """
  if _REGISTERED:
    return _REGISTERED
  # pylint: disable=g-import-not-at-top
  from moe_jax.layers import moe_config
  from moe_jax.models import config as model_config
  from moe_jax.training import distillation, experiment, optimizers, train_step
  # pylint: enable=g-import-not-at-top
  for name, obj in (("T5Config", model_config.T5Config),
                    ("SparseLayout", model_config.SparseLayout),
                    ("MoeConfig", moe_config.MoeConfig),
                    ("make_optimizer", optimizers.make_optimizer),
                    ("make_schedule", optimizers.make_schedule),
                    ("LossConfig", train_step.LossConfig),
                    ("DistillationConfig", distillation.DistillationConfig),
                    ("ConditionalRoutingConfig", model_config.ConditionalRoutingConfig),
                    ("train", experiment.build_experiment)):
    _REGISTERED[name] = gin.external_configurable(obj, name=name)
  return _REGISTERED


# ----------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------
def gin_value(raw: str) -> str:
  """``raw`` if it is a gin value, else the quoted string (``/tmp/x`` -> ``'/tmp/x'``)."""
  text = raw.strip()
  if not text or text[0] in "@%'\"[({" or text in ("True", "False", "None"):
    return text
  try:
    ast.literal_eval(text)
    return text
  except (ValueError, SyntaxError):
    return repr(text)


def split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """``(bindings, other args)``: every ``--gin.NAME=VALUE`` becomes ``NAME = VALUE``.

  Raises:
    UsageError: a ``--gin.NAME`` without ``=VALUE``.
  """
  bindings, rest = [], []
  for arg in argv:
    if arg.startswith("--gin."):
      if "=" not in arg:
        raise UsageError(f"{arg!r} needs a value: --gin.NAME=VALUE.")
      name, value = arg[len("--gin."):].split("=", 1)
      bindings.append(f"{name} = {gin_value(value)}")
    else:
      rest.append(arg)
  return bindings, rest


def add_gin_flags(parser: argparse.ArgumentParser) -> None:
  """``--gin_file``, ``--gin_bindings``, ``--gin_search_paths`` and ``--log_level``."""
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file (repeatable), e.g. runs/quickstart.gin")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="raw gin binding line (repeatable)")
  parser.add_argument("--gin_search_paths", action="append", default=[],
                      help="comma-separated directories searched for gin files")
  parser.add_argument("--log_level", default=DEFAULT_LIBRARY_LOG_LEVEL,
                      help="logging level of the libraries (absl, orbax, seqio, "
                      "TensorFlow): ERROR (default) shows only their errors, WARNING "
                      "their warnings too, INFO their start-up notes; moe_jax's own "
                      "progress lines and warnings are always printed")


def parse_flags(argv: Sequence[str], prog: str = "moe-train",
                description: str = "Train a (sparse) T5 model configured by gin.",
                require_gin_file: bool = True) -> argparse.Namespace:
  """T5X-style flags of ``prog``; ``args.bindings`` holds every binding line.

  Raises:
    UsageError: unknown flags, or no ``--gin_file`` when one is required.
  """
  parser = argparse.ArgumentParser(prog=prog, description=description)
  add_gin_flags(parser)
  parser.add_argument("--coordinator_address", default=None)
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  bindings, rest = split_gin_flags(argv)
  args, unknown = parser.parse_known_args(rest)
  if unknown:
    raise UsageError(
        f"Unknown flags {unknown}. Use --gin_file, --gin.NAME=VALUE, --gin_bindings, "
        "--gin_search_paths, --log_level, --coordinator_address, --num_processes, "
        "--process_id.")
  if require_gin_file and not args.gin_file:
    raise UsageError("Give at least one --gin_file (e.g. --gin_file=runs/quickstart.gin).")
  args.bindings = list(args.gin_bindings) + bindings
  return args


def setup_logging(level: str = DEFAULT_LIBRARY_LOG_LEVEL) -> None:
  """Sets the libraries' log level; moe_jax's own loggers stay at WARNING.

  Must run before TensorFlow (and jaxlib) are imported for their C++
  start-up lines (``TF_CPP_MIN_LOG_LEVEL``; an explicit environment setting
  wins).

  Raises:
    UsageError: an unknown level name.
  """
  name = level.upper()
  if name not in _TF_CPP_LEVELS:
    raise UsageError(f"--log_level={level!r}: use one of {sorted(_TF_CPP_LEVELS)}.")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", _TF_CPP_LEVELS[name])
  value = getattr(logging, name)
  logging.basicConfig(level=min(value, logging.WARNING),
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger().setLevel(value)
  for library in LIBRARY_LOGGERS:
    logging.getLogger(library).setLevel(value)
  logging.getLogger("moe_jax").setLevel(min(value, logging.WARNING))
  _import_tensorflow_quietly(show=value <= logging.INFO)


def _import_tensorflow_quietly(show: bool) -> None:
  """Imports TensorFlow with its C++ start-up lines held back (shown if ``show``).

  TensorFlow 2.21 logs them through absl before its logging is initialized,
  so ``TF_CPP_MIN_LOG_LEVEL`` does not hide them: file descriptor 2 is
  pointed elsewhere for the import. TensorFlow only runs tf.data here, so it
  is also kept off the GPUs (as T5X does), which leaves them to jax and
  avoids CUDA probing lines on machines without one.
  """
  if "tensorflow" in sys.modules:
    return
  import tempfile  # pylint: disable=g-import-not-at-top
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      tf.config.set_visible_devices([], "GPU")
    finally:
      os.dup2(saved, 2)
      os.close(saved)
    if show:
      capture.seek(0)
      sys.stderr.write(capture.read().decode(errors="replace"))


class _GinProbeFilter(logging.Filter):
  """Drops gin's ``Path not found`` lines: gin logs one at ERROR for every
  search path that does not hold an included file, also when another does."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.pathname.endswith(os.path.join("gin", "resource_reader.py"))
                and record.getMessage().startswith("Path not found"))


@contextlib.contextmanager
def _quiet_gin_probing():
  root = logging.getLogger()
  probe_filter = _GinProbeFilter()
  root.addFilter(probe_filter)
  try:
    yield
  finally:
    root.removeFilter(probe_filter)


# ----------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------
def search_paths(extra: Sequence[str] = ()) -> list[str]:
  """``--gin_search_paths`` first, then the shipped configs, then the cwd."""
  paths = []
  for entry in extra:
    paths += [p for p in entry.split(",") if p]
  return paths + [GIN_CONFIGS_DIR, os.getcwd()]


def resolve_gin_file(name: str, paths: Sequence[str]) -> str:
  """The path of gin file ``name``: the first search path holding it, else itself.

  Raises:
    UsageError: no such file (the message lists where it looked).
  """
  hit = next((os.path.join(p, name) for p in paths
              if os.path.exists(os.path.join(p, name))), None)
  if hit is None and os.path.exists(name):
    hit = name
  if hit is None:
    raise UsageError(
        f"gin file {name!r} not found in {list(paths)}. Check the name (shipped "
        "files: models/*.gin, runs/*.gin) or add its directory with "
        "--gin_search_paths.")
  return hit


# Gin files a run writes next to its checkpoints, holding its whole config.
RUN_CONFIG_FILES = ("config.gin", "upcycled_model.gin")   # moe-train, moe-upcycle


def _run_directories(checkpoint_path: str) -> list[str]:
  """The path (a run directory) and one or two levels up (``RUN/1000``,
  ``RUN/1000/state``)."""
  here = os.path.abspath(checkpoint_path)
  return [here, os.path.dirname(here), os.path.dirname(os.path.dirname(here))]


def find_run_config(checkpoint_path: str) -> Optional[str]:
  """The gin file of the run that wrote ``checkpoint_path``, or ``None``.

  ``config.gin`` (``moe-train``) or ``upcycled_model.gin`` (``moe-upcycle``)
  in the path itself (a run directory), or one or two levels up (a step
  directory ``RUN/1000``, its ``RUN/1000/state`` item).
  """
  for directory in _run_directories(checkpoint_path):
    for name in RUN_CONFIG_FILES:
      candidate = os.path.join(directory, name)
      if os.path.isfile(candidate):
        return candidate
  return None


@gin.configurable("run_model_config", module="moe_jax")
def _model_config_hook(model_config=gin.REQUIRED):
  return model_config


MODEL_HOOK_BINDING = "moe_jax.run_model_config.model_config = %MODEL_CONFIG"


def configured_model() -> Any:
  """The ``T5Config`` of the ``MODEL_CONFIG`` macro (parse with
  :data:`MODEL_HOOK_BINDING` among the bindings)."""
  return _model_config_hook()


def run_model_config(checkpoint_path: str) -> Optional[tuple[Any, str]]:
  """``(T5Config, file)`` of the run that wrote ``checkpoint_path``, or ``None``.

  ``model_config.json`` when the run wrote one (read without gin), else the
  run's gin file (:func:`find_run_config`), parsed on its own: this clears
  gin's configuration, so call it before parsing the program's own files.
  """
  from moe_jax.models import config as model_config_lib  # pylint: disable=g-import-not-at-top
  for directory in _run_directories(checkpoint_path):
    json_file = os.path.join(directory, model_config_lib.CONFIG_FILE)
    if os.path.isfile(json_file):
      return model_config_lib.load_json(json_file), json_file
  run_config = find_run_config(checkpoint_path)
  if run_config is None:
    return None
  parse_gin([run_config], [MODEL_HOOK_BINDING], [os.path.dirname(run_config)],
            finalize=False)
  try:
    return configured_model(), run_config
  finally:
    gin.clear_config()


def query_macro(name: str) -> Any:
  """The value bound to gin macro ``name``, or ``None`` when unbound."""
  try:
    return gin.query_parameter(f"{name}/macro.value")
  except ValueError:
    return None


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str],
              extra_search_paths: Sequence[str] = (), finalize: bool = True) -> None:
  """Parses gin files + bindings (after clearing gin), with errors that say what to change.

  The module named by the ``MIXTURE_OR_TASK_MODULE`` macro is imported before
  the config is locked (task modules may register configurables).

  Raises:
    UsageError: a missing file, an unknown configurable or parameter, a
      syntax error.
  """
  register_configurables()
  gin.clear_config()
  paths = search_paths(extra_search_paths)
  for p in paths:
    gin.add_config_file_search_path(p)
  resolved = [resolve_gin_file(f, paths) for f in gin_files]
  try:
    with _quiet_gin_probing():
      gin.parse_config_files_and_bindings(resolved, bindings, finalize_config=False)
    module = query_macro("MIXTURE_OR_TASK_MODULE")
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


# ----------------------------------------------------------------------------
# The CLI wrapper
# ----------------------------------------------------------------------------
def run_cli(prog: str, fn: Callable[[], Optional[int]],
            errors: tuple = (UsageError, FileNotFoundError)) -> int:
  """Runs ``fn``; one of ``errors`` prints ``prog: error: ...`` and gives exit code 2.

  Returns:
    ``fn``'s return value when it is an int, else 0.
  """
  try:
    code = fn()
  except errors as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return EXIT_USAGE
  return code if isinstance(code, int) else 0

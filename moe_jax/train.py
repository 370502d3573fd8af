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
  --log_level=L         the libraries' log level (ERROR; WARNING or INFO show
                        TensorFlow's, seqio's and orbax's notes).
  --coordinator_address / --num_processes / --process_id   multi-process
                        (see :mod:`moe_jax.training.multihost`).

A run resumes from the newest checkpoint in MODEL_DIR that restores; a
damaged one is skipped (kept as ``<step>.damaged``), or, with
``--gin.train.on_damaged_checkpoint=refuse``, stops the run. Exit codes:
0 done (or preempted and saved), 2 bad flags/config/checkpoints, 3 the loss
became non-finite.

Run configs use T5X's macro names: ``MODEL_DIR``, ``TRAIN_STEPS``,
``BATCH_SIZE``, ``MIXTURE_OR_TASK_NAME``, ``MIXTURE_OR_TASK_MODULE``,
``TASK_FEATURE_LENGTHS``, ``EVAL_PERIOD``, ``CHECKPOINT_PERIOD``,
``INITIAL_CHECKPOINT_PATH``; the mesh comes from ``MESH_DATA``,
``MESH_FSDP``, ``MESH_EXPERT``, ``MESH_MODEL`` (and ``DCN_MESH_*``).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional, Sequence

import gin

from moe_jax import gin_utils

# Re-exported for callers of the former moe_jax.train helpers (moe-compile);
# new code imports moe_jax.gin_utils.
# pylint: disable=unused-import,g-bad-import-order
from moe_jax.gin_utils import (  # noqa: F401
    GIN_CONFIGS_DIR, UsageError, parse_gin, register_configurables, run_cli,
    search_paths)
# pylint: enable=unused-import,g-bad-import-order

logger = logging.getLogger("moe_jax.train")
_gin_value = gin_utils.gin_value  # re-export (old private name)


def parse_flags(argv: Sequence[str]):
  """``moe-train``'s flags (:func:`moe_jax.gin_utils.parse_flags`)."""
  return gin_utils.parse_flags(argv, prog="moe-train")


def configured_experiment():
  """The :class:`~moe_jax.training.experiment.Experiment` gin describes.

  Raises:
    UsageError: missing required settings or settings the devices cannot run.
  """
  from moe_jax.training import experiment  # pylint: disable=g-import-not-at-top
  try:
    return gin_utils.register_configurables()["train"]()
  except experiment.ConfigError as e:
    raise UsageError(str(e)) from e
  except RuntimeError as e:
    if "Required bindings" not in str(e) and "REQUIRED" not in str(e):
      raise
    raise UsageError(
        f"{e}. Set them with --gin.NAME=VALUE (e.g. --gin.MODEL_DIR=/tmp/run) or in "
        "a --gin_file.") from e


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
  try:
    gin_utils.setup_logging(args.log_level)   # before TensorFlow and jax load
  except UsageError as e:
    print(f"moe-train: error: {e}", file=sys.stderr)
    return 2
  import jax  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from moe_jax.checkpoints import manager, restore
  from moe_jax.data import iterator as data_iterator
  from moe_jax.models import config as model_config_lib
  from moe_jax.training import loop, multihost
  # pylint: enable=g-import-not-at-top
  try:
    try:
      multihost.initialize(args.coordinator_address, args.num_processes, args.process_id)
    except ValueError as e:
      raise UsageError(str(e)) from e
    parse_gin(args.gin_file, args.bindings, args.gin_search_paths)
    exp = configured_experiment()

    def write_config():  # once the state is restored or initialized
      if exp.model_dir and jax.process_index() == 0:
        with open(os.path.join(exp.model_dir, "config.gin"), "w") as f:
          f.write(gin.config_str())
        # The model alone, readable without gin (e.g. by a distillation student).
        model_config_lib.save_json(
            exp.model_config, os.path.join(exp.model_dir, model_config_lib.CONFIG_FILE))
    exp.run(on_start=write_config)
  except (UsageError, manager.NoUsableCheckpointError,
          restore.CheckpointMismatchError, data_iterator.DataSettingsError) as e:
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

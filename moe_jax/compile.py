r"""``moe-compile``: compile ``moe-train``'s train step for a Cloud TPU topology.

  moe-compile --gin_file=models/switch_base_128.gin --gin_file=runs/pretrain.gin \
      --gin.MESH_EXPERT=16 --gin.BATCH_SIZE=256 --topology=v5p-128
  moe-compile ... --topology=v5p:2x2x1 --num_slices=2 --gin.DCN_MESH_DATA=2 --json

Takes exactly ``moe-train``'s flags and gin files (``--gin_file``,
``--gin.NAME=VALUE``, ``--gin_bindings``, ``--gin_search_paths``; the
multi-process flags are accepted and ignored), plus:

  --topology=T     accelerator type (v4-32, v5litepod-16 / v5e-16, v5p-128,
                   v6e-256: cores for v4/v5p, chips for v5e/v6e) or an
                   explicit generation:shape (v5p:4x4x4, v5e:4x4).
  --num_slices=K   K identical slices (multi-slice; the DCN_MESH_* macros
                   lay mesh axes across slices).
  --json           print one JSON object (keys: moe_jax.aot.report.KEYS)
                   instead of the summary.

It reads no data and allocates no arrays: the mesh is built from libtpu's
compile-only devices (no TPU needed) and ``Experiment.lower_step()`` lowers
the very jitted step ``moe-train`` runs -- same function, shardings and
donation -- from abstract state and batch (:mod:`moe_jax.aot.step`). ``MODEL_DIR`` and
``MIXTURE_OR_TASK_NAME`` may stay unset (nothing is written or read).

Exit codes: 0 the program fits in HBM, 1 it does not (the report says by how
much and what to try), 2 bad flags / configuration / no libtpu.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence

PROG = "moe-compile"
EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_USAGE = 0, 1, 2


def _own_flags(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(prog=PROG, add_help=False)
  parser.add_argument("--topology", default=None)
  parser.add_argument("--num_slices", type=int, default=1)
  parser.add_argument("--json", action="store_true")
  return parser.parse_known_args(list(argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Parses flags, compiles, prints the report. Returns the exit code."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if {"-h", "--help"} & set(argv):
    print(__doc__)
    return EXIT_FITS
  # Compiling runs nothing on a device: never start a local TPU/GPU backend.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow (seqio) start-up lines
  from moe_jax import gin_utils  # pylint: disable=g-import-not-at-top
  from moe_jax.aot import report, step  # pylint: disable=g-import-not-at-top
  own, rest = _own_flags(argv)
  try:
    try:
      args = gin_utils.parse_flags(
          rest, prog=PROG, description="Compile moe-train's train step for a TPU topology.")
    except gin_utils.UsageError as e:
      raise gin_utils.UsageError(f"{e} moe-compile also takes --topology, --num_slices, "
                                 "--json.") from e
    if not own.topology:
      raise gin_utils.UsageError(
          "Give --topology (e.g. --topology=v5p-128, --topology=v5litepod-16, "
          "--topology=v5p:4x4x4).")
    level = getattr(logging, args.log_level.upper(), logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    for name in ("absl", "orbax"):
      logging.getLogger(name).setLevel(level)
    done = step.run(own.topology, own.num_slices, args.gin_file, args.bindings,
                    args.gin_search_paths)
  except (gin_utils.UsageError, FileNotFoundError) as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return EXIT_USAGE
  print(json.dumps(report.public(done.report)) if own.json else done.summary)
  return EXIT_FITS if done.report["fits"] else EXIT_DOES_NOT_FIT


def console_main() -> None:
  sys.exit(main())


if __name__ == "__main__":
  console_main()
